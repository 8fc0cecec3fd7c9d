"""Shared helpers for the scanner-simulator tests: small, fast phantom exports, the dciodvfy check, and copies
of simulated files stamped with a chosen patient identity and UID root (for the PHI tests)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from engines.scanner.export import ExportOptions, ExportSummary, SimulationRequest, simulate
from engines.scanner.uids import IMPLEMENTATION_CLASS_UID

#: A 60 x 60 x 9 mm box (81 x 81 x 10 voxels): the whole simulate-export-read cycle takes well under a second.
SMALL_FOV_MM = (60.0, 60.0, 9.0)
#: Round-trip geometry tolerance of the brief: affine entries within 1e-4 mm.
AFFINE_TOLERANCE_MM = 1e-4

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools' dciodvfy is not installed")


def small_request(seed: int = 7, **changes: Any) -> SimulationRequest:
    """A request for the small FOV; ``changes`` are further SimulationRequest fields."""
    return SimulationRequest(seed=seed, fov_mm=SMALL_FOV_MM, **changes)


def export_small(out_dir: Path, request: SimulationRequest | None = None, **options: Any) -> ExportSummary:
    """Simulate and export the small case into ``out_dir``."""
    return simulate(request or small_request(), ExportOptions(out_dir=out_dir, **options))


def dciodvfy(path: Path) -> tuple[int, list[str]]:
    """Run dciodvfy; returns (exit status, lines that report an Error).

    dciodvfy exits 1 only when it cannot read a file; IOD violations are printed as "Error - ..." lines with
    exit status 0, so both must be checked.
    """
    assert DCIODVFY is not None
    result = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, encoding="latin-1", check=False, timeout=60
    )
    output = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in output if "Error" in line]


@dataclass(frozen=True)
class Identity:
    """A patient identity and UID root to stamp on simulated files (PHI tests): values no real file carries."""

    family_name: str
    given_name: str
    patient_id: str
    birth_date: str  # DICOM DA, YYYYMMDD
    accession_number: str
    uid_root: str

    @property
    def patient_name(self) -> str:
        return f"{self.family_name}^{self.given_name}"

    def forbidden_texts(self) -> tuple[str, ...]:
        """Everything of this identity that must not appear in a log, message or page, lower case: the name and
        its components, the ID, the birth date as DICOM writes it and as a person does, the accession number and
        the UID root."""
        date = self.birth_date
        texts = (
            self.patient_name,
            self.family_name,
            self.given_name,
            self.patient_id,
            date,
            f"{date[:4]}-{date[4:6]}-{date[6:]}",
            self.accession_number,
            self.uid_root,
        )
        return tuple(text.lower() for text in texts)


def restamp(
    sources: Sequence[Path],
    folder: Path,
    identity: Identity,
    *,
    file_name: Callable[[int], str],
    uids: dict[str, str],
) -> list[Path]:
    """Copies of simulated files into ``folder`` with ``identity`` as the patient and every instance UID
    (study, series, SOP instance, frame of reference, in the file meta too) moved under ``identity.uid_root``.

    ``uids`` maps original to new UIDs and is shared across calls, so that series of one study keep one study
    UID. The simulator's ``2.25.`` UIDs are the instance UIDs; its implementation class UID is kept.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def remap(ds: Dataset) -> None:
        for element in ds.iterall():
            if element.VR != "UI" or not isinstance(element.value, str):
                continue
            value = element.value
            if value.startswith("2.25.") and value != IMPLEMENTATION_CLASS_UID:
                element.value = uids.setdefault(value, f"{identity.uid_root}.{len(uids) + 1}")

    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.PatientName = identity.patient_name
        ds.PatientID = identity.patient_id
        ds.PatientBirthDate = identity.birth_date
        ds.AccessionNumber = identity.accession_number
        remap(ds)
        remap(ds.file_meta)
        target = folder / file_name(index)
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
