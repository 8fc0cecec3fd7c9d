"""The DICOM output stage (agent.dicom_out.dicom_publisher.DicomPublisher) with real files: a simulated MR export, the real series
writer and dcmtk's storescp on loopback. Each outcome is checked where the stage reports it (the status events
and the two counters) and on disk; a failure costs one series and never escapes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from sct_dicom_support import (
    PEER_AE,
    StartStorescp,
    export_mr,
    free_port,
    needs_storescp,
    received,
    sct_volume,
    small_case,
)

from agent.cli import main as cli_main
from agent.dicom_out.dicom_publisher import DicomPublisher
from agent.dicom_out.sct_series import write_sct_series
from agent.file_labels import file_label
from agent.ops.config import DicomConfig
from agent.records import SctVolume, StatusEvent
from agent.vocabulary import StatusKind
from engines.phantom.case import PhantomCase
from engines.scanner.export import ExportSummary, OutputFormat

#: pynetdicom 3.0.4 leaves the socket of a refused connection unclosed (see tests/test_dicom_store.py).
pytestmark = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return small_case()


@pytest.fixture(scope="module")
def mr(case: PhantomCase, tmp_path_factory: pytest.TempPathFactory) -> ExportSummary:
    return export_mr(case, tmp_path_factory.mktemp("output") / "mr", OutputFormat.CLASSIC)


@pytest.fixture(scope="module")
def volume(case: PhantomCase, mr: ExportSummary) -> SctVolume:
    return sct_volume(case, mr.paths)


@dataclass
class Recorder:
    """What the stage published and counted."""

    events: list[StatusEvent] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)

    def output(self, config: DicomConfig) -> DicomPublisher:
        return DicomPublisher(
            config, self.events.append, on_written=self.written.append, on_stored=self.stored.append
        )


def series_folders(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def assert_complete_series(series: Path, volume: SctVolume) -> list[pydicom.FileDataset]:
    """Every slice of ``volume`` as a readable CT file of one series in ``series``; returns them in order."""
    files = sorted(series.iterdir())
    assert [p.name for p in files] == [f"CT{k + 1:04d}.dcm" for k in range(volume.geometry.shape[0])]
    datasets = [pydicom.dcmread(path) for path in files]
    assert {ds.Modality for ds in datasets} == {"CT"}
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    return datasets


def assert_no_patient_identity(events: list[StatusEvent], mr: ExportSummary) -> None:
    """No status body holds the simulated patient's name (whole or either part) or ID."""
    ds = pydicom.dcmread(mr.paths[0], stop_before_pixels=True)
    name = str(ds.PatientName)
    identity = {name, *name.split("^"), str(ds.PatientID)} - {""}
    # The simulator does name the patient, so the check below means something.
    assert len(identity) >= 3, identity
    for event in events:
        text = repr(event.body)
        for value in identity:
            assert value not in text, f"{value!r} in {event.body}"


# ------------------------------------------------------------------------------------------------ tests


def test_a_volume_written_again_after_a_restart_reuses_its_series_and_tells_the_journal(
    volume: SctVolume, tmp_path: Path
) -> None:
    """The crash between the rename and the journal: the restarted agent hands the same volume again; its
    series is found complete, reported as written before the restart, not counted twice, and recorded."""
    folder = tmp_path / "dicom"
    recorder = Recorder()
    recorded: list[tuple[str, str]] = []
    output = DicomPublisher(
        DicomConfig(folder=folder),
        recorder.events.append,
        on_written=recorder.written.append,
        on_series=lambda v, name: recorded.append((v.acquisition_id, name)),
    )
    output.handle(volume)
    output.handle(volume)
    (series,) = series_folders(folder)
    assert recorder.written == ["written"]
    assert recorded == [(volume.acquisition_id, series.name)] * 2
    first, again = recorder.events
    assert (first.body["ok"], again.body["ok"]) == (True, True)
    assert again.body["series_folder"] == series.name
    assert "(written before a restart);" in again.body["message"]
    assert "(written before a restart)" not in first.body["message"]
    # The volume had no confidence: the folder holds no Segmentation, and the event says why.
    assert first.body["segmentation"] is None and "nothing was checked" in first.body["message"]


def test_a_volume_is_written_as_a_series_and_reported(
    volume: SctVolume, mr: ExportSummary, tmp_path: Path
) -> None:
    folder = tmp_path / "dicom"  # created by the first series
    recorder = Recorder()
    recorder.output(DicomConfig(folder=folder)).handle(volume)

    (series,) = series_folders(folder)
    assert not series.name.startswith(".")
    assert_complete_series(series, volume)
    (event,) = recorder.events
    assert (event.kind, event.acquisition_id) == (StatusKind.DICOM, volume.acquisition_id)
    assert event.body["ok"] is True
    assert event.body["step"] == "write"
    assert event.body["series_folder"] == series.name
    assert event.body["clipped_voxels"] == 0
    assert event.at > 0
    assert recorder.written == ["written"]
    assert recorder.stored == []
    assert_no_patient_identity(recorder.events, mr)


@needs_storescp
def test_a_written_series_is_stored_at_the_peer_and_reported(
    volume: SctVolume, mr: ExportSummary, storescp: StartStorescp, tmp_path: Path
) -> None:
    port = free_port()
    arrived = storescp(port)
    folder = tmp_path / "dicom"
    recorder = Recorder()
    recorder.output(DicomConfig(folder=folder, store_peer=f"{PEER_AE}@127.0.0.1:{port}")).handle(volume)

    (series,) = series_folders(folder)
    sent = assert_complete_series(series, volume)
    assert sorted(received(arrived)) == sorted(str(ds.SOPInstanceUID) for ds in sent)
    write, store = recorder.events
    assert (write.body["ok"], write.body["step"]) == (True, "write")
    assert store.kind == StatusKind.DICOM and store.acquisition_id == volume.acquisition_id
    assert store.body["ok"] is True
    assert store.body["step"] == "store"
    assert store.body["series_folder"] == series.name
    assert recorder.written == ["written"]
    assert recorder.stored == ["stored"]
    assert_no_patient_identity(recorder.events, mr)


def test_a_peer_that_is_down_leaves_the_series_written_and_reports_the_failure(
    volume: SctVolume, mr: ExportSummary, tmp_path: Path
) -> None:
    peer = f"{PEER_AE}@127.0.0.1:{free_port()}"  # nothing listens there
    folder = tmp_path / "dicom"
    recorder = Recorder()
    config = DicomConfig(folder=folder, store_peer=peer, store_attempts=2, store_backoff_s=0.05)
    recorder.output(config).handle(volume)  # returns: the failure is reported, not raised

    (series,) = series_folders(folder)
    assert_complete_series(series, volume)
    write, store = recorder.events
    assert (write.body["ok"], write.body["step"]) == (True, "write")
    assert store.kind == StatusKind.DICOM and store.acquisition_id == volume.acquisition_id
    assert store.body["ok"] is False
    assert store.body["step"] == "store"
    assert store.body["series_folder"] == series.name
    assert peer in store.body["message"]
    assert "after 2 attempts" in store.body["message"]
    assert recorder.written == ["written"]
    assert recorder.stored == ["failed"]
    assert_no_patient_identity(recorder.events, mr)


def test_a_volume_that_cannot_be_written_is_reported_and_the_stage_carries_on(
    case: PhantomCase, mr: ExportSummary, volume: SctVolume, tmp_path: Path
) -> None:
    copy = tmp_path / "mr"
    shutil.copytree(mr.out_dir, copy)
    paths = [copy / p.name for p in mr.paths]
    doomed = sct_volume(case, paths)
    paths[4].unlink()
    folder = tmp_path / "dicom"
    recorder = Recorder()
    output = recorder.output(DicomConfig(folder=folder))

    output.handle(doomed)  # returns: the failure is reported, not raised
    assert series_folders(folder) == []
    (failed,) = recorder.events
    assert (failed.kind, failed.acquisition_id) == (StatusKind.DICOM, doomed.acquisition_id)
    assert failed.body["ok"] is False
    assert failed.body["step"] == "write"
    assert file_label(paths[4]) in failed.body["message"] and paths[4].name not in failed.body["message"]
    assert "series_folder" not in failed.body
    assert recorder.written == ["failed"]

    output.handle(volume)
    (series,) = series_folders(folder)
    assert_complete_series(series, volume)
    _, done = recorder.events
    assert (done.body["ok"], done.body["step"], done.body["series_folder"]) == (True, "write", series.name)
    assert recorder.written == ["failed", "written"]
    assert recorder.stored == []
    assert_no_patient_identity(recorder.events, mr)


def test_a_half_written_series_from_an_earlier_run_is_removed_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    stale = folder / ".sct-1.2.826.0.1.3680043.8.498.1.partial"
    stale.mkdir(parents=True)
    (stale / "CT0001.dcm").write_bytes(b"half a file")
    finished = folder / "sct-0123456789abcdef-1007"
    finished.mkdir()
    (finished / "CT0001.dcm").write_bytes(b"a finished series")

    recorder = Recorder()
    recorder.output(DicomConfig(folder=folder))

    assert not stale.exists()
    assert series_folders(folder) == [finished]
    assert (finished / "CT0001.dcm").read_bytes() == b"a finished series"
    assert recorder.events == []


@needs_storescp
def test_resend_command_sends_a_series_on_disk_and_says_so(
    tmp_path: Path,
    mr: ExportSummary,
    case: PhantomCase,
    storescp: StartStorescp,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What IT runs after the PACS was down longer than the agent's retries."""
    written = write_sct_series(sct_volume(case, mr.paths), tmp_path / "dicom")
    port = free_port()
    folder = storescp(port)
    assert cli_main(["resend", str(written.folder), "--peer", f"{PEER_AE}@127.0.0.1:{port}"]) == 0
    assert sorted(received(folder)) == sorted(written.sop_instance_uids)
    assert f"{written.folder.name}: {len(written.files)} instances stored" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["resend", str(empty), "--peer", f"{PEER_AE}@127.0.0.1:{port}"]) == 1
    assert cli_main(["resend", str(written.folder), "--peer", "no-port"]) == 2
