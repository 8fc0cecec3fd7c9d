"""Retention (agent.ops.retention): the sCT DICOM folder, the volume archive and the journal within their bounds.

Real series written by the agent's writer, a real volume archive, a real SQLite journal on disk and real files in
an export folder; ages are set with ``os.utime`` and the records' own ``at`` stamps, never by waiting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sct_dicom_support import export_mr, sct_volume, small_case
from wire_support import random_hu, sample_volume

from agent.dicom_out.dicom_publisher import DicomPublisher
from agent.dicom_out.sct_series import write_sct_series
from agent.ops.config import DicomConfig, RetentionConfig
from agent.ops.journal import Journal
from agent.ops.metrics import AgentMetrics
from agent.ops.retention import Retention, prune_journal, prune_series
from agent.publish.volume_archive import VolumeArchive
from agent.records import SctVolume, StatusEvent, Verdict, payload_sha256
from agent.vocabulary import AcquisitionState, Outcome
from engines.scanner.export import OutputFormat
from sct_core.geometry import Orientation, VolumeGeometry

DAY = 86_400.0
NOW = 2_000_000_000.0


@pytest.fixture(scope="module")
def sct(tmp_path_factory: pytest.TempPathFactory) -> SctVolume:
    case = small_case()
    mr = export_mr(case, tmp_path_factory.mktemp("retention") / "mr", OutputFormat.CLASSIC)
    return sct_volume(case, mr.paths)


def archived_volume(k: int, produced_at: float) -> SctVolume:
    """A small volume for the archive, produced at ``produced_at``."""
    grid = VolumeGeometry.from_fov(
        center=(0.0, 0.0, 0.0),
        fov_mm=(8.0, 10.0, 15.0),
        voxel_mm=(1.0, 1.0, 2.5),
        orientation=Orientation.SAGITTAL,
    )
    made = sample_volume(grid, random_hu(grid.shape, seed=k), slab_count=1, acquisition_id=f"acq{k:04d}")
    return dataclasses.replace(made, produced_at=produced_at)


def variant(volume: SctVolume, k: int) -> SctVolume:
    """Another volume of the same acquisition (one voxel differs): a series of its own, not the same one again."""
    hu = volume.hu.copy()
    hu.flat[0] += k
    return dataclasses.replace(volume, hu=hu, sha256=payload_sha256(hu))


def series_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def age(path: Path, days: float, now: float = NOW) -> None:
    os.utime(path, (now - days * DAY, now - days * DAY))


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exposed"
    return value


# ----------------------------------------------------------------------------------------------- DICOM


def test_old_and_excess_series_go_oldest_first_and_nothing_else_is_touched(
    sct: SctVolume, tmp_path: Path
) -> None:
    folder = tmp_path / "dicom"
    written = [write_sct_series(variant(sct, k), folder).folder for k in range(3)]
    for series, days in zip(written, (40, 20, 1), strict=True):
        age(series, days)
    partial = folder / ".sct-2.25.1.partial"  # a series being written: hidden, never a candidate
    partial.mkdir()
    (partial / "CT0001.dcm").write_bytes(b"half")
    age(partial, 400)
    foreign = folder / "site-notes"
    foreign.mkdir()
    age(foreign, 400)
    one = series_bytes(written[0])

    by_age = prune_series(folder, max_age_s=30 * DAY, max_bytes=None, now=NOW)
    assert (by_age.removed, by_age.removed_bytes, by_age.kept) == (1, one, 2)
    assert not written[0].exists() and written[1].is_dir() and written[2].is_dir()

    last = series_bytes(written[2])
    by_size = prune_series(folder, max_age_s=None, max_bytes=max(one, last) + 1, now=NOW)
    assert (by_size.removed, by_size.kept, by_size.kept_bytes) == (1, 1, last)
    assert not written[1].exists() and written[2].is_dir()
    assert len(list(written[2].iterdir())) == sct.geometry.shape[0]
    assert (partial / "CT0001.dcm").read_bytes() == b"half" and foreign.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted([partial.name, foreign.name, written[2].name])


def test_a_series_being_written_or_sent_is_never_removed(sct: SctVolume, tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    older = write_sct_series(sct, folder).folder
    other = tmp_path / "other"
    other_series = write_sct_series(sct, other).folder
    other_series.rename(folder / "sct-0123456789abcdef-1001")  # another acquisition's series, older still
    age(folder / "sct-0123456789abcdef-1001", 2)
    age(older, 1)
    reports = []
    publisher: DicomPublisher

    def prune_while_in_hand(outcome: str) -> None:
        # Called by the stage between the rename and the C-STORE step: the series is complete and in use.
        assert outcome == "written"
        reports.append(prune_series(folder, max_age_s=None, max_bytes=1, in_use=publisher.in_use, now=NOW))

    events: list[StatusEvent] = []
    publisher = DicomPublisher(DicomConfig(folder=folder), events.append, on_written=prune_while_in_hand)
    publisher.handle(variant(sct, 1))

    (report,) = reports
    # The other acquisition's series went; this acquisition's series (the one in hand and the older one with
    # the same name prefix) stayed, although the size bound asked for everything.
    assert report.removed == 1
    assert not (folder / "sct-0123456789abcdef-1001").exists()
    names = sorted(p.name for p in folder.iterdir())
    assert older.name in names and events[0].body["series_folder"] in names
    assert publisher.in_use() == frozenset()
    assert prune_series(folder, max_age_s=None, max_bytes=1, in_use=publisher.in_use, now=NOW).kept == 0


def test_a_removal_a_crash_interrupted_is_finished(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    leftover = folder / ".sct-0123456789abcdef-1001.deleting"
    leftover.mkdir(parents=True)
    (leftover / "CT0001.dcm").write_bytes(b"x")
    assert prune_series(folder, max_age_s=None, max_bytes=None).kept == 0
    assert not leftover.exists()


# --------------------------------------------------------------------------------------- volume archive


def test_the_archive_is_pruned_by_age_and_size_keeping_the_newest(tmp_path: Path) -> None:
    archive = VolumeArchive(tmp_path / "snapshot", keep=10)
    for k, days in enumerate((9, 5, 2, 1)):
        archive.save(archived_volume(k, NOW - days * DAY))
    one = sum(p.stat().st_size for p in (tmp_path / "snapshot").glob("acq0000.*"))

    by_age = archive.prune(7 * DAY, None, now=NOW)
    assert (by_age.removed, by_age.kept) == (1, 3)
    by_size = archive.prune(None, one, now=NOW)
    assert (by_size.removed, by_size.kept, by_size.kept_bytes) == (2, 1, one)
    assert archive.prune(None, 1, now=NOW).kept == 1  # the newest stays whatever the bound
    volumes, problems = archive.load()
    assert [v.acquisition_id for v in volumes] == ["acq0003"] and problems == []


# --------------------------------------------------------------------------------------------- journal


def record_acquisition(
    journal: Journal, export: Path, acquisition_id: str, at: float, files: int = 3
) -> list[Path]:
    """The rows a finished, published acquisition leaves, stamped ``at``, with its files in ``export``."""
    folder = export / acquisition_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(files):
        path = folder / f"IM{k:04d}.dcm"
        path.write_bytes(b"DICM")
        journal.record_file(path, 4, k, "accepted", "", acquisition_id, at=at)
        paths.append(path)
    journal.record_verdict(Verdict(acquisition_id, "p", "1", Outcome.PASS, True, (), (), at))
    sha = hashlib.sha256(acquisition_id.encode()).hexdigest()
    journal.record_slab(acquisition_id, 0, 0, 16, sha, None, at=at)
    journal.record_publication(acquisition_id, "slab", 1, sha, slab_index=0, at=at)
    journal.record_publication(acquisition_id, "volume", 2, sha, at=at)
    journal.record_acquisition(acquisition_id, AcquisitionState.PUBLISHED, protocol_id="p", at=at)
    return paths


def rows(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return {
            table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("files", "acquisitions", "verdicts", "slabs", "publications")
        }


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite") as opened:
        opened.enable_space_reclaim()
        yield opened


def test_old_detail_rows_go_and_every_acquisition_keeps_its_state_and_one_file(
    journal: Journal, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    old = [f"{k:016x}" for k in range(3)]
    for acquisition_id in old:
        record_acquisition(journal, export, acquisition_id, NOW - 100 * DAY)
    record_acquisition(journal, export, "ffffffffffffffff", NOW - DAY)
    journal.record_file(export / "bad.dcm", 1, 0, "bad", "unreadable", None, at=NOW - 100 * DAY)

    report = prune_journal(journal, max_age_s=90 * DAY, max_bytes=None, export_folder=export, now=NOW)

    # Per old acquisition: 2 of 3 files, the verdict, the slab and 2 publications; and the bad file's row.
    assert report.removed == 3 * 6 + 1
    assert rows(journal.path) == {
        "files": 3 + 3,
        "acquisitions": 4,
        "verdicts": 1,
        "slabs": 1,
        "publications": 2,
    }
    assert journal.finished_acquisitions() == {*old, "ffffffffffffffff"}
    assert report.kept == sum(rows(journal.path).values())


def test_an_acquisition_is_forgotten_only_once_its_files_are_gone_from_the_export(
    journal: Journal, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    files = {f"{k:016x}": record_acquisition(journal, export, f"{k:016x}", NOW - 100 * DAY) for k in range(3)}
    for path in files["0000000000000000"]:
        path.unlink()  # the console deleted this series
    files["0000000000000001"][2].unlink()  # one file of another is gone, its first is still there

    prune_journal(journal, max_age_s=90 * DAY, max_bytes=None, export_folder=export, now=NOW)
    assert journal.finished_acquisitions() == {"0000000000000001", "0000000000000002"}
    assert rows(journal.path)["files"] == 2


def test_nothing_is_forgotten_while_the_export_folder_looks_unmounted(
    journal: Journal, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    for k in range(2):
        record_acquisition(journal, export, f"{k:016x}", NOW - 100 * DAY)
    for child in export.iterdir():
        for path in child.iterdir():
            path.unlink()
        child.rmdir()
    assert list(export.iterdir()) == []  # what an unmounted share's mount point looks like
    prune_journal(journal, max_age_s=90 * DAY, max_bytes=None, export_folder=export, now=NOW)
    assert journal.finished_acquisitions() == {"0000000000000000", "0000000000000001"}
    export.rmdir()
    prune_journal(journal, max_age_s=90 * DAY, max_bytes=None, export_folder=export, now=NOW)
    assert journal.finished_acquisitions() == {"0000000000000000", "0000000000000001"}


def fill_files(journal: Journal, count: int, first_at: float, last_at: float, series: str = "s") -> None:
    """``count`` rows of skipped files (no file behind them), recorded evenly from ``first_at`` to ``last_at``."""
    step = (last_at - first_at) / max(1, count - 1)
    for k in range(count):
        journal.record_file(
            Path(f"/export/{series}{k // 200}/IM{k:06d}.dcm"),
            1000 + k,
            k,
            "skipped",
            "r" * 60,
            None,
            at=first_at + k * step,
        )


def test_the_file_and_its_wal_really_shrink(journal: Journal) -> None:
    fill_files(journal, 12_000, NOW - 200 * DAY, NOW - 100 * DAY)
    fill_files(journal, 100, NOW - DAY, NOW, series="recent")
    before = journal.file_bytes()
    assert before > 2_000_000

    report = prune_journal(
        journal, max_age_s=90 * DAY, max_bytes=None, export_folder=Path("/nonexistent"), now=NOW
    )
    assert report.removed == 12_000
    assert report.kept_bytes == journal.file_bytes() < before / 10
    assert report.removed_bytes == before - report.kept_bytes
    wal = journal.path.with_name(journal.path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert rows(journal.path)["files"] == 100


def test_the_size_bound_removes_the_oldest_rows_first(journal: Journal) -> None:
    fill_files(journal, 10_000, NOW - 10 * DAY, NOW)
    limit = journal.used_bytes() // 3
    report = prune_journal(
        journal, max_age_s=None, max_bytes=limit, export_folder=Path("/nonexistent"), now=NOW
    )
    assert journal.used_bytes() <= limit
    with sqlite3.connect(journal.path) as conn:
        oldest, newest, left = conn.execute("SELECT MIN(at), MAX(at), COUNT(*) FROM files").fetchone()
    assert newest == NOW and oldest > NOW - 10 * DAY + 3 * DAY
    assert report.removed == 10_000 - left > 0


def test_an_older_journal_is_converted_once_so_pruning_can_shrink_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with Journal(path) as journal:
        record_acquisition(journal, tmp_path / "export", "0000000000000000", NOW)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0  # as every journal before retention
    with Journal(path) as journal:
        assert journal.enable_space_reclaim() is True
        assert journal.enable_space_reclaim() is False
        assert journal.finished_acquisitions() == {"0000000000000000"}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


# --------------------------------------------------------------------------------------------- the runs


def test_a_run_prunes_every_store_logs_one_line_and_counts(
    sct: SctVolume, journal: Journal, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dicom = tmp_path / "dicom"
    old = write_sct_series(sct, dicom).folder
    age(old, 40, time.time())
    new = write_sct_series(variant(sct, 1), dicom).folder
    archive = VolumeArchive(tmp_path / "snapshot", keep=5)
    archive.save(archived_volume(1, time.time() - 10 * DAY))
    archive.save(archived_volume(2, time.time()))
    export = tmp_path / "export"
    record_acquisition(journal, export, "0000000000000000", time.time() - 100 * DAY)
    metrics = AgentMetrics()
    retention = Retention(
        RetentionConfig(),
        journal=journal,
        archive=archive,
        dicom_folder=dicom,
        export_folder=export,
        metrics=metrics,
    )
    caplog.set_level(logging.INFO, logger="agent.ops.retention")

    reports = {r.store: r for r in retention.run()}

    assert not old.exists() and new.is_dir()
    assert (reports["dicom"].removed, reports["snapshot"].removed, reports["journal"].removed) == (1, 1, 6)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "agent.ops.retention"]
    assert line.startswith("retention: dicom 1 series pruned (")
    assert "snapshot 1 volumes pruned" in line and "journal 6 rows pruned" in line
    assert sample(metrics, "sct_agent_retention_pruned_items_total", store="dicom") == 1
    assert sample(metrics, "sct_agent_retention_items", store="dicom") == 1
    assert sample(metrics, "sct_agent_retention_bytes", store="dicom") == series_bytes(new)
    assert sample(metrics, "sct_agent_retention_pruned_bytes_total", store="snapshot") > 0
    assert sample(metrics, "sct_agent_retention_items", store="journal") == sum(rows(journal.path).values())
    assert sample(metrics, "sct_agent_retention_runs_total") == 1
    assert retention.runs == 1


def test_the_thread_runs_at_start_when_woken_and_stops(journal: Journal, tmp_path: Path) -> None:
    metrics = AgentMetrics()
    retention = Retention(
        RetentionConfig(interval_s=3600.0),
        journal=journal,
        archive=VolumeArchive(tmp_path / "snapshot", keep=2),
        dicom_folder=None,
        export_folder=tmp_path,
        metrics=metrics,
    )
    ticked = threading.Event()
    retention.add_tick(ticked.set)
    retention.start()
    try:
        assert ticked.wait(10)
        deadline = time.monotonic() + 30
        while retention.runs < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert retention.runs == 1
        retention.wake()
        while retention.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert retention.runs == 2  # the interval is an hour: only the wake explains a second run
    finally:
        retention.stop()
    assert not [t for t in threading.enumerate() if t.name == "sct-retention"]
