"""Every real scanner series in ../shared/dicom (listed in docs/vendors.md), through the agent's own reader,
grouping and validator: the normalised view each must give, and the verdict each must get.

The reference table below is written from what each series is (docs/vendors.md, The real-DICOM test corpus)
and from the files' headers; it is the specification these tests hold the agent to. A series that is rejected
must be rejected for the structural reason given there (2D, spin echo, single echo, not spoiled, IR-prepared,
derived, phase only, incomplete), not merely for timing values a protocol happens not to match.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from real_dicom_support import (
    PHILIPS_CLASSIC,
    PHILIPS_ENHANCED,
    PHILIPS_RAW,
    PHILIPS_TEST_PROTOCOL,
    SIEMENS_SPLIT_ECHO1,
    SIEMENS_SPLIT_ECHO2,
    series_files,
    shared_dicom,
)

from agent.cli import check
from agent.file_labels import file_label
from agent.ingest.assembler import Assembler
from agent.records import AcquisitionUpdate, AcquisitionView, ArrivedFile
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR, load_protocol, load_protocols
from agent.validation.rules import evaluate
from agent.vocabulary import ArrivalSource, FileOutcome, Outcome, UpdateKind


@dataclass(frozen=True)
class Expected:
    """One acquisition of the corpus (docs/vendors.md): its view, and its verdict against the Philips protocol."""

    folders: tuple[str, ...]
    sop_class: str
    vendor: str
    acquisition_type: str
    family: str
    scanning: tuple[str, ...]
    variant: tuple[str, ...]
    #: (echo time ms, slices present) per echo.
    echoes: tuple[tuple[float, int], ...]
    expected_echoes: int | None
    expected_slices: int | None
    image_kind: str = "magnitude"
    other_images: tuple[tuple[str, int], ...] = ()
    flags: tuple[str, ...] = ()
    complete: bool = True
    outcome: Outcome = Outcome.REJECT
    #: (attribute, text in the reason's "found") that must be among the reasons.
    structural: tuple[tuple[str, str], ...] = ()


MR = "MR Image Storage"
ENHANCED = "Enhanced MR Image Storage"
GRE = "gradient echo"

REFERENCE: tuple[Expected, ...] = (
    Expected(  # catalog #8: GE 7 T B0 map; research mode, one echo stated, field map and magnitude share everything
        ("dcm_qa_fmap/GE_3_3db0maps_3D_EFGRE3D",), MR, "GE", "3D", "research mode (not stated)",
        ("RM",), ("NONE",), ((1.6, 80),), 1, 160, complete=False,
        structural=(("ScanningSequence", "RM"), ("SequenceVariant", "NONE"), ("EchoCount", "1 echo"),
                    ("ImagePositionPatient", "80 more images")),
    ),
    Expected(  # #10: Siemens 2D dual-echo field-map magnitude, both echoes in one series
        ("dcm_qa_fmap/Siemens_2_gre_field_mapping_2D_2echo_mag",), MR, "Siemens", "2D", GRE,
        ("GR",), ("SP",), ((5.19, 36), (7.65, 36)), 2, 36,
        structural=(("MRAcquisitionType", "2D"),),
    ),
    Expected(  # #11: its phase-difference series: phase only, one echo number
        ("dcm_qa_fmap/Siemens_3_gre_field_mapping_2D_phasediff",), MR, "Siemens", "2D", GRE,
        ("GR",), ("SP",), ((7.65, 36),), None, 36, image_kind="phase",
        structural=(("MRAcquisitionType", "2D"), ("ImageType", "not magnitude"), ("EchoCount", "1 echo")),
    ),
    Expected(  # #20: 2D TSE, 6 of 35 slices kept upstream
        ("dcm_qa_pdt2/Siemens_3_pd+t2_tse_2D_2echo_PARTIAL",), MR, "Siemens", "2D", "spin echo",
        ("SE",), ("SK", "SP", "OSP"), ((11.0, 6), (92.0, 6)), 2, 35, complete=False,
        structural=(("ScanningSequence", "SE"), ("MRAcquisitionType", "2D"), ("SlicesPerEcho", "6 of 35")),
    ),
    Expected(  # #1: the positive fixture, classic; magnitude and phase of both echoes in one series
        (PHILIPS_CLASSIC,), MR, "Philips", "3D", GRE, ("GR",), ("SP",), ((2.3, 53), (4.6, 53)), 2, 53,
        other_images=(("phase", 106),), outcome=Outcome.PASS,
    ),
    Expected(  # #2: the same scan, Enhanced (one file, 212 frames)
        (PHILIPS_ENHANCED,), ENHANCED, "Philips", "3D", GRE, ("GR",), ("SP",), ((2.3, 53), (4.6, 53)), 2, 53,
        other_images=(("phase", 106),), outcome=Outcome.PASS,
    ),
    Expected(  # #19: Philips 2D plain FFE: steady state, not spoiled
        ("dcm_qa_table/Ph_1301_Dual-echo_2D_FFE",), MR, "Philips", "2D", GRE, ("GR",), ("SS",),
        ((7.001, 30), (10.0, 30)), 2, 30, other_images=(("phase", 60),),
        structural=(("MRAcquisitionType", "2D"), ("SequenceVariant", "SS")),
    ),
    Expected(  # #15: XA30 MPRAGE: IR-prepared turbo FLASH, one echo
        ("dcm_qa_xa30/5_anat-T1w_tfl3d_MPRAGE_enhanced",), ENHANCED, "Siemens", "3D", GRE,
        ("GR", "IR"), ("MP",), ((2.41, 96),), 1, 96,
        structural=(("ScanningSequence", "IR"), ("SequenceVariant", "MP"), ("InversionTime", "900"),
                    ("EchoCount", "1 echo")),
    ),
    Expected(  # #13: XA30 2D field map, one Enhanced file per echo in one series; Spoiling NONE for a FLASH
        ("dcm_qa_xa30/8_gre_field_mapping_2D_2echo_mag_enhanced",), ENHANCED, "Siemens", "2D", GRE,
        ("GR",), ("SP",), ((10.0, 33), (12.46, 33)), 2, 33,
        structural=(("MRAcquisitionType", "2D"),),
    ),
    Expected(  # #16 + #17: XA30 interoperability export, one series per echo, joined into one acquisition
        (SIEMENS_SPLIT_ECHO1, SIEMENS_SPLIT_ECHO2), MR, "Siemens", "2D", GRE, ("GR",), ("SK", "SP"),
        ((10.0, 33), (12.46, 33)), 2, None,
        structural=(("MRAcquisitionType", "2D"),),
    ),
    Expected(  # #6: one partition of a 3D single-echo scout (128 announced in the CSA protocol)
        ("heudiconv/AAHead_Scout_3D_fl3d1_single_PARTIAL",), MR, "Siemens", "3D", GRE, ("GR",), ("SP",),
        ((1.37, 1),), 1, 128, complete=False,
        structural=(("EchoCount", "1 echo"), ("SlicesPerEcho", "1 of 128")),
    ),
    Expected(  # #7: XA30 derived MPR reformat of a scout
        ("heudiconv/XA_MPR_cor_DERIVED_enhanced",), ENHANCED, "Siemens", "3D", GRE, ("GR",), ("SP",),
        ((1.37, 3),), 1, 3, flags=("DERIVED", "REFORMAT"),
        structural=(("ImageType", "DERIVED"), ("EchoCount", "1 echo")),
    ),
)  # fmt: skip


def _arrived(path: Path) -> ArrivedFile:
    return ArrivedFile(path, path.stat().st_size, 0, time.time(), ArrivalSource.EVENT)


def assemble(files: list[Path]) -> list[AcquisitionUpdate]:
    """Feed files one by one as the agent's assembler stage does (flush after each), then end what is open."""
    updates: list[AcquisitionUpdate] = []
    assembler = Assembler(updates.append, quiet_period_s=float("inf"))
    for file in files:
        assembler.add_file(_arrived(file), retry=True)
        assembler.flush()
    assembler.end_all()
    return updates


def final_views(updates: list[AcquisitionUpdate]) -> list[AcquisitionView]:
    return [u.view for u in updates if u.kind is not UpdateKind.IMAGES]


@pytest.fixture(scope="module")
def checked() -> dict[tuple[str, ...], check.CheckedAcquisition]:
    """Every acquisition under ../shared/dicom, keyed by the folders its files came from."""
    root = shared_dicom()
    protocol = load_protocol(PHILIPS_TEST_PROTOCOL)
    report = check.check_path(root, [protocol])
    return {tuple(sorted(str(f) for f in a.folders)): a for a in report.acquisitions}


def test_every_catalogued_series_is_one_acquisition(
    checked: dict[tuple[str, ...], check.CheckedAcquisition],
) -> None:
    assert sorted(checked) == sorted(e.folders for e in REFERENCE)


@pytest.mark.parametrize("expected", REFERENCE, ids=lambda e: e.folders[0].split("/")[-1])
def test_view_of_each_real_series(
    expected: Expected, checked: dict[tuple[str, ...], check.CheckedAcquisition]
) -> None:
    view = checked[expected.folders].view
    assert view.sop_class == expected.sop_class
    assert view.vendor == expected.vendor
    assert view.mr_acquisition_type == expected.acquisition_type
    assert view.sequence_family == expected.family
    assert view.scanning_sequence == expected.scanning
    assert view.sequence_variant == expected.variant
    assert view.echoes == expected.echoes
    assert (view.expected_echoes, view.expected_slices) == (
        expected.expected_echoes,
        expected.expected_slices,
    )
    assert view.image_kind == expected.image_kind
    assert view.magnitude is (expected.image_kind == "magnitude")
    assert view.other_images == expected.other_images
    assert view.image_flags == expected.flags
    assert view.complete is expected.complete
    assert view.ended_by in ("count", "quiet")


@pytest.mark.parametrize("expected", REFERENCE, ids=lambda e: e.folders[0].split("/")[-1])
def test_verdict_of_each_real_series_against_the_philips_protocol(
    expected: Expected, checked: dict[tuple[str, ...], check.CheckedAcquisition]
) -> None:
    (verdict,) = checked[expected.folders].verdicts
    assert verdict.outcome is expected.outcome, [r.text() for r in verdict.reasons]
    for attribute, found in expected.structural:
        assert any(r.attribute == attribute and found in r.found for r in verdict.reasons), (
            f"no {attribute} reason with {found!r} in {[r.text() for r in verdict.reasons]}"
        )


def test_classic_and_enhanced_exports_of_one_scan_give_equal_views(
    checked: dict[tuple[str, ...], check.CheckedAcquisition],
) -> None:
    classic = checked[(PHILIPS_CLASSIC,)].view
    enhanced = checked[(PHILIPS_ENHANCED,)].view
    assert classic == enhanced
    # Only how the scan was exported differs.
    assert classic.sop_class != enhanced.sop_class
    assert classic.acquisition_id != enhanced.acquisition_id
    assert classic.grid is not None and classic.grid == enhanced.grid
    assert classic.pixel_bandwidth_hz == 1008.0 and classic.water_fat_shift_px == 0.43


@pytest.mark.parametrize("protocol_id", ["bonemri_lumbar_1p5t", "bonemri_lumbar_3t"])
def test_no_real_series_passes_a_shipped_protocol(protocol_id: str) -> None:
    protocol = load_protocol(SHIPPED_PROTOCOLS_DIR / f"{protocol_id}.toml")
    acquisitions = check.check_path(shared_dicom(), [protocol]).acquisitions
    assert len(acquisitions) == len(REFERENCE)
    for acquisition in acquisitions:
        (verdict,) = acquisition.verdicts
        assert verdict.outcome is Outcome.REJECT, acquisition.folders


def test_raw_data_and_non_dicom_files_are_skipped_with_their_reason() -> None:
    root = shared_dicom()
    report = check.check_path(root / "dcm_qa_philips_enh", [load_protocol(PHILIPS_TEST_PROTOCOL)])
    reasons = {n.path.name: (n.outcome, n.reason) for n in report.notes}
    raw = next(iter(series_files(PHILIPS_RAW))).name
    assert reasons[raw][0] == FileOutcome.SKIPPED
    assert "Raw Data Storage" in reasons[raw][1]
    examcard = root / "dcm_qa_philips_enh" / "PROTOCOL_fcMRI_Field_Mapping_examcard.txt"
    # The reason names the file by its label, never by its name (which a console may make of the patient's).
    assert reasons[examcard.name] == (
        FileOutcome.SKIPPED,
        f"{file_label(examcard)}: file: found no DICOM preamble (DICM at byte 128); expected a DICOM Part 10 file",
    )


def test_split_echo_series_join_whatever_the_order_of_arrival() -> None:
    first, second = series_files(SIEMENS_SPLIT_ECHO1), series_files(SIEMENS_SPLIT_ECHO2)
    in_order = final_views(assemble(first + second))
    shuffled = first + second
    random.Random(5).shuffle(shuffled)
    mixed = final_views(assemble(shuffled))
    backwards = final_views(assemble(second + first))
    assert len(in_order) == len(mixed) == len(backwards) == 1
    assert in_order[0] == mixed[0] == backwards[0]
    assert in_order[0].series_numbers == (9001, 9002)


def test_one_series_of_a_split_pair_alone_is_incomplete_not_single_echo() -> None:
    (view,) = final_views(assemble(series_files(SIEMENS_SPLIT_ECHO1)))
    assert view.echoes == ((10.0, 33),) and view.expected_echoes == 2
    protocol = load_protocol(PHILIPS_TEST_PROTOCOL)
    verdict = evaluate(protocol, view, final=True)
    echo_reasons = [r for r in verdict.reasons if r.attribute == "EchoCount"]
    assert [r.category for r in echo_reasons] == ["completeness"]
    assert "1 of 2 echo times" in echo_reasons[0].found


def test_philips_classic_streams_only_magnitude_images_and_completes_by_count() -> None:
    files = series_files(PHILIPS_CLASSIC)
    random.Random(11).shuffle(files)
    updates = assemble(files)
    streamed = [image for update in updates for image in update.new_images]
    assert len(streamed) == 106
    assert len({image.instance_key for image in streamed}) == 106
    final = updates[-1]
    assert final.kind is UpdateKind.COMPLETE and final.view.ended_by == "count"
    # The streamer finds each image's echo by its echo time: the images' and the view's must be equal.
    assert {image.echo_time_ms for image in streamed} == set(final.view.echo_times_ms) == {2.3, 4.6}
    assert final.view.grid is not None and final.view.grid.shape == (53, 80, 80)
    first_verdict = evaluate(load_protocol(PHILIPS_TEST_PROTOCOL), updates[0].view, final=False)
    # A provisional verdict from the first image already judges the sequence; nothing it judged fails.
    assert first_verdict.outcome is Outcome.PASS


def test_enhanced_split_per_echo_files_complete_by_count() -> None:
    updates = assemble(series_files("dcm_qa_xa30/8_gre_field_mapping_2D_2echo_mag_enhanced"))
    assert [u.kind for u in updates] == [UpdateKind.IMAGES, UpdateKind.COMPLETE]
    assert updates[0].view.echoes == ((10.0, 33),) and updates[0].view.expected_echoes == 2


# ------------------------------------------------------------------------------------------ sct-agent check


def run_check(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    status = check.main(list(args), stdout=out)
    return status, out.getvalue()


def test_check_prints_every_acquisition_with_its_view_and_reasons() -> None:
    root = shared_dicom()
    status, text = run_check(str(root))
    assert status == check.EXIT_FAIL
    protocols = load_protocols(SHIPPED_PROTOCOLS_DIR)
    assert f"{len(REFERENCE)} acquisitions; protocols: " in text
    for expected in REFERENCE:
        for folder in expected.folders:
            assert folder in text
    assert text.count("REJECT (final)") == len(REFERENCE) * len(protocols)
    assert "echoes     2 (2 announced): TE 2.3 ms: 53 of 53 slices, TE 4.6 ms: 53 of 53 slices" in text
    assert "also 106 phase images (not used)" in text
    assert "series (joined) 9001, 9002" in text
    assert "Raw Data Storage" in text
    assert "EchoTime1: found 2.3 ms; required 2.1 ± 0.15 ms" in text
    assert text.rstrip().endswith(f"0 of {len(REFERENCE)} acquisitions pass: FAIL")


def test_check_passes_the_philips_scan_against_its_protocol() -> None:
    for folder in (PHILIPS_CLASSIC, PHILIPS_ENHANCED):
        status, text = run_check(str(shared_dicom() / folder), "--protocol", str(PHILIPS_TEST_PROTOCOL))
        assert status == check.EXIT_PASS, text
        assert "PASS (final) against protocol philips_t1ffe_3mm_3t" in text
        assert "1 of 1 acquisitions pass: PASS" in text


def test_check_json_document() -> None:
    status, text = run_check(
        str(shared_dicom() / "dcm_qa_philips_enh"), "--protocol", str(PHILIPS_TEST_PROTOCOL), "--json"
    )
    document = json.loads(text)
    assert status == document["exit_status"] == check.EXIT_PASS
    assert len(document["acquisitions"]) == 2
    for acquisition in document["acquisitions"]:
        assert acquisition["passes"] is True
        assert acquisition["view"]["echoes"] == [
            {"echo_time_ms": 2.3, "slices": 53},
            {"echo_time_ms": 4.6, "slices": 53},
        ]
        assert acquisition["verdicts"][0]["model_validated"] is False
    assert {n["outcome"] for n in document["files"]["not_used"]} == {"skipped"}


def test_check_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_check(str(tmp_path / "absent"))[0] == check.EXIT_USAGE
    assert run_check(str(tmp_path), "--protocol", "no_such_protocol")[0] == check.EXIT_USAGE
    broken = tmp_path / "broken.toml"
    broken.write_text('id = "broken"\n')
    assert run_check(str(tmp_path), "--protocol", str(broken))[0] == check.EXIT_USAGE


def test_check_skips_the_names_the_watcher_skips(tmp_path: Path) -> None:
    real = series_files(PHILIPS_CLASSIC)[0]
    for name in ("image.dcm", ".hidden.dcm", "image.dcm.partial"):
        shutil.copy(real, tmp_path / name)
    report = check.check_path(tmp_path, [])
    assert report.files_read == 1
    assert sorted(n.path.name for n in report.notes) == [".hidden.dcm", "image.dcm.partial"]
    assert all("file name: found" in n.reason for n in report.notes)


def test_check_of_a_folder_without_mr_images_fails(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    status, text = run_check(str(tmp_path))
    assert status == check.EXIT_FAIL
    assert "No MR acquisition found: FAIL" in text


def test_sct_agent_check_console_entry_point() -> None:
    folder = shared_dicom() / PHILIPS_CLASSIC
    command = [
        sys.executable,
        "-m",
        "agent.cli",
        "check",
        str(folder),
        "--protocol",
        str(PHILIPS_TEST_PROTOCOL),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 1 acquisitions pass: PASS" in result.stdout
    missing = subprocess.run(
        [*command[:4], str(folder / "absent")], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2
    assert "PATH: found no file or folder" in missing.stderr
