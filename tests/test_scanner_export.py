"""Export options: UIDs, write styles, pacing, order, lost and broken files, deviations, and the CLI."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scanner_support import SMALL_FOV_MM, export_small, small_request

from agent.cli import main
from engines.phantom.generate import generate_case
from engines.scanner.export import EmissionOrder, OutputFormat, SimulationRequest
from engines.scanner.readback import read_mr_series
from engines.scanner.writer import WriteStyle

#: Two slices, two echoes: four files, enough to watch a write style without waiting for a whole series.
TINY_FOV_MM = (60.0, 60.0, 1.8)
#: How often the watcher thread looks at the folder.
POLL_INTERVAL_S = 0.001


def _sop_uids(paths: tuple[Path, ...]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_fresh_uids_never_collide_between_runs_of_one_seed(tmp_path: Path) -> None:
    first = export_small(tmp_path / "a")
    second = export_small(tmp_path / "b")
    assert _sop_uids(first.paths).isdisjoint(_sop_uids(second.paths))
    assert first.series_instance_uid != second.series_instance_uid
    assert first.study_instance_uid != second.study_instance_uid


def test_deterministic_uids_give_byte_identical_files(tmp_path: Path) -> None:
    first = export_small(tmp_path / "a", deterministic_uids=True)
    second = export_small(tmp_path / "b", deterministic_uids=True)
    assert [p.name for p in first.paths] == [p.name for p in second.paths]
    for a, b in zip(first.paths, second.paths, strict=True):
        assert a.read_bytes() == b.read_bytes()


def _watch(directory: Path, stop: threading.Event, sizes: dict[str, list[int]]) -> None:
    """Record every size seen under every name until stopped, as a polling ingester would."""
    while not stop.is_set():
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    sizes.setdefault(entry.name, []).append(entry.stat().st_size)
                except FileNotFoundError:
                    continue  # a temp name renamed away between listing and stat
        time.sleep(POLL_INTERVAL_S)


def _observed_partial_files(tmp_path: Path, style: WriteStyle) -> list[str]:
    """Names a polling watcher saw with fewer bytes than the finished file has."""
    out = tmp_path / style.value
    out.mkdir()
    sizes: dict[str, list[int]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(out, stop, sizes))
    watcher.start()
    try:
        summary = export_small(out, SimulationRequest(seed=7, fov_mm=TINY_FOV_MM), write_style=style)
    finally:
        stop.set()
        watcher.join()
    final = {p.name: p.stat().st_size for p in summary.paths}
    assert sorted(p.name for p in out.iterdir()) == sorted(final)  # no temp files left behind
    assert any(name in final for name in sizes)  # the watcher did see the export happen
    return [name for name, seen in sizes.items() if name in final and min(seen) < final[name]]


def test_atomic_writes_never_show_a_partial_file_under_its_final_name(tmp_path: Path) -> None:
    assert _observed_partial_files(tmp_path, WriteStyle.ATOMIC) == []


def test_slow_writes_show_half_written_files_under_their_final_names(tmp_path: Path) -> None:
    assert len(_observed_partial_files(tmp_path, WriteStyle.SLOW)) >= 1


def test_rate_paces_the_export(tmp_path: Path) -> None:
    summary = export_small(tmp_path, rate_files_per_s=100.0)
    assert summary.file_count == 20
    assert summary.seconds >= 19 / 100.0


def test_echo_order_emits_all_of_echo_one_first(tmp_path: Path) -> None:
    summary = export_small(tmp_path, order=EmissionOrder.ECHO)
    echo_times = [float(pydicom.dcmread(p, stop_before_pixels=True).EchoTime) for p in summary.paths]
    assert echo_times == [2.1] * 10 + [4.2] * 10
    first = pydicom.dcmread(summary.paths[0], stop_before_pixels=True)
    assert (first.InstanceNumber, first.EchoNumbers) == (1, 1)
    request = small_request()
    assert np.array_equal(
        read_mr_series(tmp_path).echoes, generate_case(request.seed, request.acquisition()).echoes
    )


@pytest.mark.parametrize("output_format", list(OutputFormat))
def test_dropped_slices_leave_a_gap_that_readback_refuses(
    tmp_path: Path, output_format: OutputFormat
) -> None:
    summary = export_small(tmp_path, format=output_format, drop_slices=(3, 4))
    assert summary.images == 16 and summary.dropped_slices == (3, 4)
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in summary.paths]
    if output_format is OutputFormat.CLASSIC:
        assert summary.file_count == 16
        assert {int(ds.ImagesInAcquisition) for ds in datasets} == {20}
        assert sorted(int(ds.InstanceNumber) for ds in datasets) == [
            n for n in range(1, 21) if n not in (7, 8, 9, 10)
        ]
    else:
        assert int(datasets[0].NumberOfFrames) == 16
        positions = {
            f.FrameContentSequence[0].InStackPositionNumber
            for f in datasets[0].PerFrameFunctionalGroupsSequence
        }
        assert positions == {1, 2, 3, 6, 7, 8, 9, 10}
    with pytest.raises(ValueError, match="regular grid"):
        read_mr_series(tmp_path)


@pytest.mark.parametrize("output_format", list(OutputFormat))
def test_truncate_one_cuts_one_file_inside_its_pixel_data(
    tmp_path: Path, output_format: OutputFormat
) -> None:
    summary = export_small(tmp_path, format=output_format, truncate_one=True, deterministic_uids=True)
    assert summary.truncated_path is not None
    reference = export_small(tmp_path / "whole", format=output_format, deterministic_uids=True)
    whole = reference.out_dir / summary.truncated_path.name
    assert summary.truncated_path.stat().st_size < whole.stat().st_size
    assert whole.read_bytes().startswith(summary.truncated_path.read_bytes())
    header = pydicom.dcmread(summary.truncated_path, stop_before_pixels=True)
    assert header.SOPInstanceUID
    with pytest.raises(ValueError, match="truncated"):
        read_mr_series(tmp_path)


def test_single_echo(tmp_path: Path) -> None:
    summary = export_small(tmp_path, small_request(echoes=1))
    assert summary.file_count == 10
    readback = read_mr_series(tmp_path)
    assert readback.echo_times_ms == (2.1,)
    assert readback.attributes.sequence_name == "*fl3d1"
    first = pydicom.dcmread(summary.paths[0], stop_before_pixels=True)
    assert (first.EchoTrainLength, first.ImagesInAcquisition) == (1, 10)


def test_echo_time_setting_changes_header_and_physics(tmp_path: Path) -> None:
    request = small_request(settings=("EchoTime2=4.8",))
    export_small(tmp_path, request)
    readback = read_mr_series(tmp_path)
    assert readback.echo_times_ms == (2.1, 4.8)
    simulated = generate_case(request.seed, request.acquisition())
    default = generate_case(request.seed, small_request().acquisition())
    assert np.array_equal(readback.echoes, simulated.echoes)
    assert not np.array_equal(readback.echoes[1], default.echoes[1])


def test_acquisition_type_setting_is_written_verbatim(tmp_path: Path) -> None:
    summary = export_small(tmp_path, small_request(settings=("MRAcquisitionType=2D",)))
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in summary.paths]
    assert {ds.MRAcquisitionType for ds in datasets} == {"2D"}
    assert datasets[0].SequenceName == "*fl3d2"  # only what was asked changes
    assert read_mr_series(tmp_path).attributes.mr_acquisition_type == "2D"


def test_cli_simulate_writes_two_files_per_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fov = ",".join(f"{v:g}" for v in SMALL_FOV_MM)
    status = main(["simulate", "--out", str(tmp_path / "export"), "--seed", "7", "--fov-mm", fov])
    assert status == 0
    files = sorted((tmp_path / "export").iterdir())
    assert len(files) == 2 * 10
    output = capsys.readouterr().out
    assert "wrote 20 classic MR files" in output
    patient_name = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientName)
    assert patient_name.split("^", maxsplit=1)[0] not in output


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--set", "EchoTime2=abc"], ["EchoTime2", "'abc'", "ms"]),
        (["--set", "NoSuchKeyword=1"], ["NoSuchKeyword", "DICOM keyword"]),
        (["--drop-slices", "4,x"], ["--drop-slices", "'4,x'"]),
        (["--drop-slices", "10"], ["--drop-slices", "slice 10"]),
        (["--fov-mm", "60,60"], ["--fov-mm", "three numbers"]),
        (["--echoes", "4"], ["--echoes 4", "RepetitionTime"]),
        (["--rate", "0"], ["--rate"]),
    ],
)
def test_cli_refuses_bad_arguments_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], fragments: list[str]
) -> None:
    fov = ",".join(f"{v:g}" for v in SMALL_FOV_MM)
    base = ["simulate", "--out", str(tmp_path / "export"), "--seed", "7"]
    if "--fov-mm" not in arguments:
        base += ["--fov-mm", fov]
    assert main(base + arguments) == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error
    assert not (tmp_path / "export").exists()


def test_cli_unknown_choice_exits_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["simulate", "--out", str(tmp_path), "--seed", "7", "--format", "nifti"])
    assert raised.value.code == 2
