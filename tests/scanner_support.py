"""Shared helpers for the scanner-simulator tests: small, fast phantom exports and the dciodvfy check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engines.scanner.export import ExportOptions, ExportSummary, SimulationRequest, simulate

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
