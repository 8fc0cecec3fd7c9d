"""A real full disk: the journal, the DICOM writer and the whole agent on small tmpfs filesystems that fill up.

Each test runs in a private mount namespace (tests/small_filesystem.py) and fills its filesystems with a
ballast file, as a log or a forgotten copy would: the kernel answers ENOSPC, SQLite SQLITE_FULL, as on the box.
What must hold: the agent stays up and says what is wrong and where; nothing half-written is left visible; a
new series waits (refused, not lost, not marked finished) and is processed, like the next one, once the ballast
is gone.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from agent_support import agent_config, write_test_model, write_test_protocol
from journal_queries import JournalQueries
from sct_dicom_support import export_mr, sct_volume, small_case
from small_filesystem import fill, free_bytes, in_private_mounts, mount_tmpfs
from test_agent_e2e import SERIES_TIMEOUT_S, Listener, simulate_case

from agent.dicom_out.dicom_publisher import DicomPublisher
from agent.dicom_out.sct_series import write_sct_series
from agent.ingest.grouping import acquisition_id_for
from agent.ingest.header_reader import read_header
from agent.ops.config import MB, DicomConfig, RetentionConfig, StateConfig
from agent.ops.journal import Journal, JournalFullError
from agent.ops.journal_disk_full import REPORT_GAP_S, JournalWrites
from agent.ops.metrics import AgentMetrics
from agent.records import StatusEvent
from agent.service import JOURNAL_FILE, AgentService
from agent.vocabulary import AcquisitionState, StatusKind
from engines.scanner.export import ExportOptions, OutputFormat, export_case

MiB = 1024 * 1024


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exposed"
    return value


# --------------------------------------------------------------------------------------------- journal


def test_a_full_disk_costs_journal_records_never_an_acquisition_state(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if not in_private_mounts(request, tmp_path):
        return
    state = mount_tmpfs(tmp_path / "state", 4 * MiB)
    metrics = AgentMetrics()
    events: list[StatusEvent] = []
    with Journal(state / JOURNAL_FILE) as journal:
        journal.enable_space_reclaim()  # also truncates the WAL: the next write needs new blocks
        now = [1000.0]
        writes = JournalWrites(journal, metrics, events.append, clock=lambda: now[0])
        writes.write("files", lambda: journal.record_file(state / "a.dcm", 1, 1, "accepted", "", "a" * 16))
        ballast = fill(state)

        with pytest.raises(
            JournalFullError, match=r"state journal .*journal\.sqlite: write failed, the disk is full"
        ):
            journal.record_file(state / "b.dcm", 1, 1, "accepted", "", "b" * 16)
        writes.write("files", lambda: journal.record_file(state / "b.dcm", 1, 1, "accepted", "", "b" * 16))
        writes.acquisition("b" * 16, AcquisitionState.PUBLISHED, protocol_id="p")
        writes.write("slabs", lambda: journal.record_file(state / "c.dcm", 1, 1, "accepted", "", "b" * 16))

        (event,) = events  # one per episode, not one per write
        assert (event.kind, event.body["stage"]) == (StatusKind.ERROR, "journal")
        assert str(journal.path) in event.body["message"] and "the disk is full" in event.body["message"]
        assert sample(metrics, "sct_agent_journal_write_failures_total", table="files") == 1
        assert sample(metrics, "sct_agent_journal_write_failures_total", table="acquisitions") == 1
        assert sample(metrics, "sct_agent_disk_full_total", store="journal") == 3
        assert sample(metrics, "sct_agent_journal_pending_states") == 1
        assert writes.full and journal.finished_acquisitions() == set()
        writes.retry()
        assert writes.pending == 1  # still no room

        ballast.unlink()
        writes.retry()
        assert (writes.pending, writes.full) == (0, False)
        assert journal.finished_acquisitions() == {"b" * 16}
        assert sample(metrics, "sct_agent_journal_pending_states") == 0
        writes.write("files", lambda: journal.record_file(state / "d.dcm", 1, 1, "accepted", "", "d" * 16))
        assert (writes.pending, writes.full) == (0, False)

        # The disk fills again soon after (a nearly full disk flaps): counted, not reported again; a minute
        # later it is a new episode, and reported.
        journal.enable_space_reclaim()
        ballast = fill(state)
        writes.write("files", lambda: journal.record_file(state / "e.dcm", 1, 1, "accepted", "", "e" * 16))
        assert (writes.full, len(events)) == (True, 1)
        assert sample(metrics, "sct_agent_journal_write_failures_total", table="files") == 2
        ballast.unlink()
        writes.write("files", lambda: journal.record_file(state / "f.dcm", 1, 1, "accepted", "", "f" * 16))
        assert (writes.pending, writes.full) == (0, False)
        now[0] += REPORT_GAP_S
        journal.enable_space_reclaim()
        ballast = fill(state)
        writes.write("files", lambda: journal.record_file(state / "g.dcm", 1, 1, "accepted", "", "g" * 16))
        assert len(events) == 2 and "the disk is full" in events[1].body["message"]
        ballast.unlink()
    with sqlite3.connect(state / JOURNAL_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        paths = {row[0] for row in conn.execute("SELECT path FROM files")}
    assert paths == {str(state / "a.dcm"), str(state / "d.dcm"), str(state / "f.dcm")}


# ----------------------------------------------------------------------------------------------- DICOM


def test_a_series_that_meets_a_full_disk_leaves_nothing_and_says_where_and_why(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if not in_private_mounts(request, tmp_path):
        return
    case = small_case()
    volume = sct_volume(case, export_mr(case, tmp_path / "mr", OutputFormat.CLASSIC).paths)
    needed = sum(p.stat().st_size for p in write_sct_series(volume, tmp_path / "measure").files)
    dicom = mount_tmpfs(tmp_path / "dicom", 4 * needed)
    ballast = fill(dicom, leave_bytes=needed // 2)
    events: list[StatusEvent] = []
    outcomes: list[str] = []
    full: list[bool] = []
    writer = DicomPublisher(
        DicomConfig(folder=dicom),
        events.append,
        on_written=outcomes.append,
        on_disk_full=lambda: full.append(True),
    )

    writer.handle(volume)  # returns: reported, not raised

    assert sorted(p.name for p in dicom.iterdir()) == ["ballast"]  # no series, no hidden partial
    (event,) = events
    assert (event.kind, event.body["ok"], event.body["step"]) == (StatusKind.DICOM, False, "write")
    assert (event.body["errno"], event.body["folder"]) == ("ENOSPC", str(dicom))
    assert event.body["message"] == (
        f"series not written to {dicom}: ENOSPC (No space left on device); nothing of it was kept (the disk is full)"
    )
    assert outcomes == ["failed"] and full == [True]

    ballast.unlink()
    writer.handle(volume)
    (series,) = (p for p in dicom.iterdir())
    assert len(list(series.iterdir())) == volume.geometry.shape[0]
    assert events[-1].body["ok"] is True and outcomes == ["failed", "written"]


# ----------------------------------------------------------------------------------------------- agent


class Scanner:
    """Series exported to a staging folder, then moved into the watched folder (all at once or in parts)."""

    def __init__(self, staging: Path, export: Path) -> None:
        self.staging = staging
        self.export = export

    def prepare(self, seed: int) -> tuple[str, list[Path]]:
        summary = export_case(simulate_case(seed), ExportOptions(out_dir=self.staging / str(seed)))
        return acquisition_id_for(read_header(summary.paths[0]).header), list(summary.paths)

    def deliver(self, files: list[Path]) -> None:
        for path in files:
            target = self.export / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)


def wait(predicate: Callable[[], bool], what: str, timeout_s: float = SERIES_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def statuses(listener: Listener, kind: str, acquisition_id: str | None = None) -> list[dict[str, object]]:
    with listener.lock:
        found = list(listener.statuses)
    return [
        dict(s.body)
        for s in found
        if s.kind == kind and (acquisition_id is None or s.acquisition_id == acquisition_id)
    ]


@pytest.fixture
def started() -> Iterator[list[AgentService]]:
    services: list[AgentService] = []
    yield services
    for service in services:
        service.stop()


def test_the_agent_on_a_filling_disk_stays_up_refuses_new_series_and_recovers(
    request: pytest.FixtureRequest, tmp_path: Path, started: list[AgentService]
) -> None:
    if not in_private_mounts(request, tmp_path):
        return
    state = mount_tmpfs(tmp_path / "state", 48 * MiB)
    dicom = mount_tmpfs(tmp_path / "dicom", 24 * MiB)
    root = tmp_path / "agent"
    config = agent_config(root, write_test_protocol(root / "protocols"), write_test_model(root / "model"))
    config = replace(
        config,
        state=StateConfig(folder=state),
        dicom=DicomConfig(folder=dicom),
        retention=RetentionConfig(min_free_mb=1.0),
    )
    scanner = Scanner(root / "staging", config.watch.folder)
    journalled, cut, refused, nxt = (scanner.prepare(seed) for seed in (900301, 900302, 900303, 900304))
    service = AgentService(config)
    started.append(service)
    service.start()
    metrics = service.metrics
    listener = Listener(service.endpoints.publish, service.endpoints.snapshot)
    thread = threading.Thread(target=listener.run, name="test-listener")
    thread.start()
    try:
        assert listener.connected.wait(10)
        time.sleep(0.3)  # ZeroMQ's slow joiner

        def written(acquisition_id: str) -> bool:
            return bool(listener.dicom_written(acquisition_id))

        def final(acquisition_id: str) -> list[dict[str, object]]:
            return [b for b in statuses(listener, "verdict", acquisition_id) if b["final"]]

        # 1. The state folder's disk fills while a series is in flight: the journal cannot write, the volume
        # cannot be archived; the series still gets its verdict, volume and DICOM series, and the agent says so.
        acquisition, files = journalled
        scanner.deliver(files[: len(files) // 2])
        wait(lambda: bool(statuses(listener, "verdict", acquisition)), "the first verdict")
        ballast = fill(state)
        scanner.deliver(files[len(files) // 2 :])
        wait(lambda: written(acquisition), "the first series' DICOM series")
        assert final(acquisition)[0]["outcome"] == "pass"
        journal_errors = [b for b in statuses(listener, "error") if b["stage"] == "journal"]
        assert len(journal_errors) == 1 and "the disk is full" in str(journal_errors[0]["message"])
        assert sample(metrics, "sct_agent_journal_write_failures_total", table="files") >= 1
        assert sample(metrics, "sct_agent_disk_full_total", store="snapshot") == 1
        assert sample(metrics, "sct_agent_journal_pending_states") == 1
        assert service.healthy()
        ballast.unlink()
        wait(lambda: sample(metrics, "sct_agent_journal_pending_states") == 0, "the kept state written")
        with JournalQueries(state / JOURNAL_FILE) as journal:
            assert journal.acquisition_state(acquisition) == AcquisitionState.PUBLISHED

        # 2. The DICOM disk has room for a new series to start, not for its series: the write fails cleanly.
        acquisition, files = cut
        series_bytes = sum(p.stat().st_size for p in next(dicom.iterdir()).iterdir())
        ballast = fill(dicom, leave_bytes=series_bytes // 2)
        assert free_bytes(dicom) > 1 * MB  # above the watermark: the series is taken
        scanner.deliver(files)
        wait(lambda: bool(statuses(listener, "dicom", acquisition)), "the DICOM outcome")
        (failure,) = statuses(listener, "dicom", acquisition)
        assert (failure["ok"], failure["errno"], failure["folder"]) == (False, "ENOSPC", str(dicom))
        assert str(dicom) in str(failure["message"])
        assert not [p for p in dicom.iterdir() if p.name.startswith(".") or acquisition[:16] in p.name]
        assert sample(metrics, "sct_agent_disk_full_total", store="dicom") == 1
        assert sample(metrics, "sct_agent_dicom_series_total", outcome="failed") == 1
        assert final(acquisition)[0]["outcome"] == "pass"  # published on ZeroMQ all the same
        assert service.healthy()

        # 3. Below the watermark a new series is refused, with the folder and the figures, and waits.
        ballast.unlink()
        ballast = fill(dicom, leave_bytes=MB // 2)
        acquisition, files = refused
        scanner.deliver(files)
        wait(lambda: bool(statuses(listener, "refused", acquisition)), "the refusal")
        (refusal,) = statuses(listener, "refused", acquisition)
        assert refusal["folder"] == str(dicom) and refusal["reason"] == "disk_full"
        assert int(str(refusal["free_bytes"])) < int(str(refusal["min_free_bytes"])) == MB
        assert "retention.min_free_mb" in str(refusal["message"])
        wait(lambda: sample(metrics, "sct_agent_files_held") == len(files), "every file held")
        assert sample(metrics, "sct_agent_accepting") == 0
        assert sample(metrics, "sct_agent_acquisitions_refused_total", folder="dicom") == 1
        assert sample(metrics, "sct_agent_disk_free_bytes", folder="dicom") < MB
        assert statuses(listener, "verdict", acquisition) == []
        with JournalQueries(state / JOURNAL_FILE) as journal:
            assert journal.acquisition_state(acquisition) is None  # not finished: a restart would take it
            assert journal.files_of(acquisition) == ()
        assert service.healthy()

        # 4. Room again: the refused series goes through, and so does the next one.
        ballast.unlink()
        wait(lambda: written(acquisition), "the refused series' DICOM series")
        assert final(acquisition)[0]["outcome"] == "pass"
        assert sample(metrics, "sct_agent_accepting") == 1 and sample(metrics, "sct_agent_files_held") == 0
        acquisition, files = nxt
        scanner.deliver(files)
        wait(lambda: written(acquisition), "the next series' DICOM series")
        assert statuses(listener, "refused", acquisition) == []
        assert len(statuses(listener, "refused")) == 1
        assert service.healthy()
    finally:
        listener.stop.set()
        thread.join(10)
