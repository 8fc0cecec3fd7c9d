"""Bad input at the assembler: every kind of broken file gets a reason naming the attribute, the value found and
what was expected, and the series around it is unaffected.

Each bad file is made from a real scanner file (a Siemens E11 2D field-map magnitude series, 64 x 64) by
damaging one thing, then dropped into the middle of that real series as it arrives. The test holds the
assembler to two promises: the bad file is reported with its reason (never an exception out of the stage), and
the real series still ends with exactly the view it has without the bad file.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid
from real_dicom_support import SIEMENS_2D_MAGNITUDE, series_files

from agent.ingest.assembler import Assembler
from agent.ingest.header_reader import read_header
from agent.ingest.header_values import HeaderError
from agent.records import AcquisitionUpdate, AcquisitionView, ArrivedFile
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR, load_protocol
from agent.validation.rules import evaluate
from agent.vocabulary import ArrivalSource, FileOutcome, Outcome, UpdateKind

#: Ends acquisitions in these tests: nothing arrives after the series, so any positive quiet period ends it.
QUIET_PERIOD_S = 5.0


@dataclass
class Run:
    updates: list[AcquisitionUpdate]
    files: dict[str, tuple[str, str]]

    @property
    def finals(self) -> list[AcquisitionView]:
        return [u.view for u in self.updates if u.kind is not UpdateKind.IMAGES]


def run(files: list[Path]) -> Run:
    """The agent's assembler stage on these files with a clock the test moves: one flush per file, retries
    after their delay, and the quiet period at the end."""
    now = [0.0]
    updates: list[AcquisitionUpdate] = []
    outcomes: dict[str, tuple[str, str]] = {}
    assembler = Assembler(
        updates.append,
        quiet_period_s=QUIET_PERIOD_S,
        on_file=lambda f, outcome, reason, _: outcomes.__setitem__(f.path.name, (outcome, reason)),
        clock=lambda: now[0],
    )
    for file in files:
        size = file.stat().st_size
        assembler.add_file(ArrivedFile(file, size, 0, time.time(), ArrivalSource.EVENT))
        assembler.flush()
        now[0] += 0.01
        assembler.tick()
    now[0] += QUIET_PERIOD_S + 2.0
    assembler.tick()
    return Run(updates, outcomes)


@pytest.fixture(scope="module")
def real_series() -> list[Path]:
    return series_files(SIEMENS_2D_MAGNITUDE)


@pytest.fixture(scope="module")
def clean_view(real_series: list[Path]) -> AcquisitionView:
    (view,) = run(real_series).finals
    assert view.complete and view.ended_by == "count"
    return view


def damaged(source: Path, folder: Path, name: str, change: Callable[[Dataset], None]) -> Path:
    ds = pydicom.dcmread(source)
    change(ds)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _delete(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)

    return change


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return change


def _new_instance(change: Callable[[Dataset], None]) -> Callable[[Dataset], None]:
    """A distinct SOP instance, so that a rejected file is not mistaken for a duplicate of the real one."""

    def both(ds: Dataset) -> None:
        ds.SOPInstanceUID = generate_uid()
        change(ds)

    return both


def _huge_rows(ds: Dataset) -> None:
    # Rows is US (at most 65535); a corrupt writer can still put 10^9 in a 4-byte value.
    del ds.Rows
    ds.add_new(0x00280010, "UL", 10**9)


def _nan_spacing(ds: Dataset) -> None:
    # Raw bytes: pydicom refuses to set a DS of "nan", as a careful writer would; a corrupt one does not.
    tag = Tag("PixelSpacing")
    ds[tag] = RawDataElement(tag, "DS", 8, b"nan\\nan", 0, False, True)


#: (file name, damage, outcome, reason text the report must contain).
DAMAGE: tuple[tuple[str, Callable[[Dataset], None], str, str], ...] = (
    ("no-echo-time.dcm", _new_instance(_delete("EchoTime")), FileOutcome.BAD,
     "EchoTime: found (absent); expected the echo time in ms"),
    ("no-position.dcm", _new_instance(_delete("ImagePositionPatient")), FileOutcome.BAD,
     "ImagePositionPatient: found (absent); expected 3 numbers"),
    ("no-orientation.dcm", _new_instance(_delete("ImageOrientationPatient")), FileOutcome.BAD,
     "ImageOrientationPatient: found (absent); expected 6 numbers"),
    ("no-study.dcm", _new_instance(_delete("StudyInstanceUID")), FileOutcome.BAD,
     "StudyInstanceUID: found (absent); expected a UID"),
    ("no-instance.dcm", _delete("SOPInstanceUID"), FileOutcome.BAD,
     "SOPInstanceUID: found (absent); expected a UID"),
    ("no-sop-class.dcm", _new_instance(_delete("SOPClassUID")), FileOutcome.BAD,
     "SOPClassUID: found (absent); expected the SOP class of an MR image"),
    ("no-rows.dcm", _new_instance(_delete("Rows")), FileOutcome.BAD, "Rows: found (absent); expected an integer"),
    ("negative-tr.dcm", _new_instance(_set("RepetitionTime", -5)), FileOutcome.BAD,
     "RepetitionTime: found -5 ms; expected a value from 0.1 to 100000 ms"),
    ("nan-spacing.dcm", _new_instance(_nan_spacing), FileOutcome.BAD,
     "PixelSpacing: found [nan, nan]; expected 2 finite numbers"),
    ("huge-rows.dcm", _new_instance(_huge_rows), FileOutcome.BAD, "Rows: found 1000000000; expected 1 to 4096"),
    ("infinite-te.dcm", _new_instance(_set("EchoTime", "1e400")), FileOutcome.BAD,
     "EchoTime: found '1e400'; expected a finite number"),
    ("flip-1000.dcm", _new_instance(_set("FlipAngle", 1000)), FileOutcome.BAD,
     "FlipAngle: found 1000 deg; expected a value from 0 to 360 deg"),
    ("zero-field.dcm", _new_instance(_set("MagneticFieldStrength", 0)), FileOutcome.BAD,
     "MagneticFieldStrength: found 0 T; expected a value from 0.01 to 20 T"),
    ("not-unit-cosines.dcm", _new_instance(_set("ImageOrientationPatient", [2, 0, 0, 0, 1, 0])), FileOutcome.BAD,
     "ImageOrientationPatient: found (2.0, 0.0, 0.0, 0.0, 1.0, 0.0); expected two orthogonal unit direction cosines"),
    ("far-position.dcm", _new_instance(_set("ImagePositionPatient", [1e308, 1e308, 1e308])), FileOutcome.BAD,
     "ImagePositionPatient: found [1e+308, 1e+308, 1e+308]; expected 3 coordinates within ±100000 mm"),
    ("ct-image.dcm", _new_instance(_set("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")), FileOutcome.SKIPPED,
     "SOPClassUID: found 1.2.840.10008.5.1.4.1.1.2 (CT Image Storage); expected MR Image or Enhanced MR Image"),
)  # fmt: skip


@pytest.mark.parametrize(("name", "change", "outcome", "reason"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_header_is_reported_and_the_series_is_unaffected(
    tmp_path: Path,
    real_series: list[Path],
    clean_view: AcquisitionView,
    name: str,
    change: Callable[[Dataset], None],
    outcome: str,
    reason: str,
) -> None:
    bad = damaged(real_series[10], tmp_path, name, change)
    result = run([*real_series[:20], bad, *real_series[20:]])
    assert result.files[name][0] == outcome
    assert reason in result.files[name][1]
    assert result.finals == [clean_view]


def _truncated(source: Path, folder: Path) -> Path:
    path = folder / "truncated.dcm"
    data = source.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    return path


def _cut_in_header(source: Path, folder: Path) -> Path:
    path = folder / "cut-in-header.dcm"
    path.write_bytes(source.read_bytes()[:700])
    return path


def _garbage(_: Path, folder: Path) -> Path:
    path = folder / "garbage.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8)
    return path


def _text(_: Path, folder: Path) -> Path:
    path = folder / "examcard.txt"
    path.write_text("3D FFE, 2 echoes, TE 2.3 / 4.6 ms\n")
    return path


def _empty(_: Path, folder: Path) -> Path:
    path = folder / "empty.dcm"
    path.write_bytes(b"")
    return path


def _unknown_vr(source: Path, folder: Path) -> Path:
    # SpacingBetweenSlices (0018,0088) with a VR no standard defines: pydicom fails only when the value is
    # converted, deep inside the parse (found by bench/fuzz_headers.py).
    data = source.read_bytes()
    tag = b"\x18\x00\x88\x00DS"
    assert data.count(tag) == 1
    path = folder / "unknown-vr.dcm"
    path.write_bytes(data.replace(tag, b"\x18\x00\x88\x00LS"))
    return path


def _dicomdir(_: Path, folder: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "EXPORT"
    ds.DirectoryRecordSequence = []
    path = folder / "DICOMDIR"
    ds.save_as(path, enforce_file_format=True)
    return path


FILES: tuple[tuple[Callable[[Path, Path], Path], str, str], ...] = (
    (_truncated, FileOutcome.BAD, "PixelData: found"),
    (_cut_in_header, FileOutcome.BAD, "PixelData: found (absent): the file ends at byte 700"),
    (_garbage, FileOutcome.BAD, "found"),
    (
        _text,
        FileOutcome.SKIPPED,
        "file: found no DICOM preamble (DICM at byte 128); expected a DICOM Part 10 file",
    ),
    (_empty, FileOutcome.SKIPPED, "file: found no DICOM preamble"),
    (_unknown_vr, FileOutcome.BAD, "file: found a corrupt element (NotImplementedError: "),
    (_dicomdir, FileOutcome.SKIPPED, "MediaStorageSOPClassUID: found a DICOMDIR; expected an MR image"),
)


@pytest.mark.parametrize(("make", "outcome", "reason"), FILES, ids=[f[0].__name__.strip("_") for f in FILES])
def test_broken_file_is_reported_and_the_series_is_unaffected(
    tmp_path: Path,
    real_series: list[Path],
    clean_view: AcquisitionView,
    make: Callable[[Path, Path], Path],
    outcome: str,
    reason: str,
) -> None:
    bad = make(real_series[5], tmp_path)
    result = run([*real_series[:30], bad, *real_series[30:]])
    assert result.files[bad.name][0] == outcome, result.files[bad.name]
    assert reason in result.files[bad.name][1]
    assert result.finals == [clean_view]


def test_truncated_file_names_the_bytes_found_and_expected(tmp_path: Path, real_series: list[Path]) -> None:
    bad = _truncated(real_series[0], tmp_path)
    with pytest.raises(HeaderError) as caught:
        read_header(bad)
    assert caught.value.attribute == "PixelData"
    assert caught.value.expected == "8192 bytes (file truncated?)"
    assert caught.value.found.endswith(" bytes") and int(caught.value.found.split()[0]) < 8192


def test_a_file_being_written_is_read_again_before_it_is_called_bad(
    tmp_path: Path, real_series: list[Path]
) -> None:
    """A network share can report a file complete before its last bytes land: the first failure waits one
    retry delay, and the file that is whole by then is accepted."""
    growing = tmp_path / "growing.dcm"
    whole = real_series[0].read_bytes()
    growing.write_bytes(whole[:-3000])
    now = [0.0]
    outcomes: list[str] = []
    assembler = Assembler(
        lambda _: None,
        quiet_period_s=QUIET_PERIOD_S,
        on_file=lambda f, outcome, reason, _: outcomes.append(outcome),
        clock=lambda: now[0],
    )
    assembler.add_file(ArrivedFile(growing, len(whole) - 3000, 0, time.time(), ArrivalSource.STABLE))
    assert outcomes == []
    growing.write_bytes(whole)
    now[0] += 1.5
    assembler.tick()
    assert outcomes == [FileOutcome.ACCEPTED]


def test_duplicated_instances_are_counted_once(
    tmp_path: Path, real_series: list[Path], clean_view: AcquisitionView
) -> None:
    copies = []
    for index in (3, 40, 71):
        copy = tmp_path / f"copy-{index}.dcm"
        shutil.copy(real_series[index], copy)
        copies.append(copy)
    result = run([*real_series[:50], *copies[:2], *real_series[50:], copies[2]])
    assert [result.files[c.name][0] for c in copies[:2]] == [FileOutcome.DUPLICATE] * 2
    assert result.finals == [clean_view]
    # The last copy arrives after the series completed by count: a late file of an ended acquisition.
    assert result.files[copies[2].name][0] == FileOutcome.SKIPPED
    assert "already ended" in result.files[copies[2].name][1]


def test_a_series_that_never_completes_ends_incomplete_with_its_missing_slices(
    real_series: list[Path],
) -> None:
    files = [f for f in real_series if f != real_series[7]]
    (view,) = run(files).finals
    assert (view.complete, view.ended_by) == (False, "quiet")
    protocol = load_protocol(SHIPPED_PROTOCOLS_DIR / "bonemri_lumbar_1p5t.toml")
    verdict = evaluate(protocol, view, final=True)
    assert verdict.outcome is Outcome.REJECT  # 2D field map: rejected whatever its completeness
    missing = [r for r in verdict.reasons if r.attribute == "SlicesPerEcho"]
    assert [r.category for r in missing] == ["completeness"]
    assert missing[0].found.startswith("35 of 36 images at TE")
    assert "1 missing, at" in missing[0].found


def test_bad_files_alone_leave_no_acquisition_open(tmp_path: Path, real_series: list[Path]) -> None:
    bad = [
        _truncated(real_series[0], tmp_path),
        _garbage(real_series[0], tmp_path),
        damaged(real_series[1], tmp_path, "negative-tr.dcm", _new_instance(_set("RepetitionTime", -5))),
    ]
    result = run(bad)
    assert result.updates == []
    assert {outcome for outcome, _ in result.files.values()} == {FileOutcome.BAD}


def test_a_vanishing_slice_spacing_is_not_stated_and_nothing_overflows(
    tmp_path: Path, real_series: list[Path]
) -> None:
    """SpacingBetweenSlices 1e-320 (a denormal a corrupt writer produced for bench/fuzz_headers.py) made
    positions / spacing overflow; a spacing under 10 µm now states nothing and SliceThickness is used."""
    files = [
        damaged(source, tmp_path, source.name, _set("SpacingBetweenSlices", "1e-320"))
        for source in real_series
    ]
    result = run(files)
    (view,) = result.finals
    assert {outcome for outcome, _ in result.files.values()} == {FileOutcome.ACCEPTED}
    assert view.slice_spacing_mm == 3.0  # the SliceThickness; the slices are really 3.6 mm apart
    assert view.grid is None  # so no grid fits them, and the final verdict says so
    verdict = evaluate(load_protocol(SHIPPED_PROTOCOLS_DIR / "bonemri_lumbar_1p5t.toml"), view, final=True)
    assert any(
        r.attribute == "SpacingBetweenSlices" and "steps of 3.6 mm" in r.found for r in verdict.reasons
    )
