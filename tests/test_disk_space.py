"""The free-space check (agent.ops.disk_space) and the assembler holding a refused acquisition's files.

The check reads the real filesystem of the test's folder; a watermark above what is free there makes it short,
one of 0 turns the check off. The agent on a filesystem that really fills up is tests/test_full_disk.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from scanner_support import export_small

from agent.ingest import assembler as assembler_module
from agent.ingest.assembler import Assembler
from agent.ops.config import RetentionConfig
from agent.ops.disk_space import DiskGuard
from agent.ops.journal import Journal
from agent.ops.metrics import AgentMetrics
from agent.ops.retention import Retention
from agent.publish.volume_archive import VolumeArchive
from agent.records import AcquisitionUpdate, ArrivedFile, StatusEvent
from agent.vocabulary import ArrivalSource, FileOutcome, StatusKind, UpdateKind

TB = 10**12


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exposed"
    return value


def test_a_refusal_is_announced_once_and_only_after_retention_ran(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    metrics = AgentMetrics()
    events: list[StatusEvent] = []
    with Journal(tmp_path / "journal.sqlite") as journal:
        retention = Retention(
            RetentionConfig(),
            journal=journal,
            archive=VolumeArchive(tmp_path / "snapshot", keep=2),
            dicom_folder=None,
            export_folder=tmp_path,
            metrics=metrics,
        )  # not started: the run the guard asks for happens when the test says
        guard = DiskGuard(
            {"state": tmp_path},
            free + TB,
            publish=events.append,
            metrics=metrics,
            prune_now=retention.wake,
            prune_runs=lambda: retention.runs,
        )

        assert guard.admit("a" * 16) is False
        assert events == []  # retention may still free enough: nothing announced yet
        retention.run()
        assert guard.admit("a" * 16) is False
        assert guard.admit("a" * 16) is False
        assert guard.admit("b" * 16) is False

    assert [(e.kind, e.acquisition_id) for e in events] == [
        (StatusKind.REFUSED, "a" * 16),
        (StatusKind.REFUSED, "b" * 16),
    ]
    body = events[0].body
    assert (body["reason"], body["folder"], body["min_free_bytes"]) == ("disk_full", str(tmp_path), free + TB)
    assert 0 < body["free_bytes"] < free + TB
    assert str(tmp_path) in body["message"] and "retention.min_free_mb" in body["message"]
    assert sample(metrics, "sct_agent_acquisitions_refused_total", folder="state") == 2
    assert sample(metrics, "sct_agent_acquisitions_refused_total", folder="dicom") == 0
    assert sample(metrics, "sct_agent_accepting") == 0
    assert sample(metrics, "sct_agent_disk_min_free_bytes") == free + TB
    assert sample(metrics, "sct_agent_disk_free_bytes", folder="state") > 0


def test_a_watermark_of_zero_takes_everything(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    events: list[StatusEvent] = []
    guard = DiskGuard({"state": tmp_path, "dicom": tmp_path}, 0, publish=events.append, metrics=metrics)
    assert guard.admit("a" * 16) is True and events == []
    assert sample(metrics, "sct_agent_accepting") == 1
    assert sample(metrics, "sct_agent_disk_free_bytes", folder="dicom") > 0


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return list(export_small(tmp_path_factory.mktemp("export") / "series").paths)


def arrived(paths: list[Path]) -> list[ArrivedFile]:
    return [
        ArrivedFile(p, p.stat().st_size, p.stat().st_mtime_ns, time.time(), ArrivalSource.EVENT)
        for p in paths
    ]


def test_a_refused_acquisition_waits_whole_and_is_read_again_when_admitted(series: list[Path]) -> None:
    room = [False]
    updates: list[AcquisitionUpdate] = []
    outcomes: list[str] = []
    asked: list[str] = []

    def admit(acquisition_id: str) -> bool:
        asked.append(acquisition_id)
        return room[0]

    assembler = Assembler(
        updates.append,
        quiet_period_s=60.0,
        on_file=lambda _f, outcome, _r, _a: outcomes.append(outcome),
        admit=admit,
    )
    for file in arrived(series):
        assembler.add_file(file)
    assembler.flush()
    assembler.tick()
    assert (updates, outcomes, assembler.open_count) == ([], [], 0)  # nothing recorded as handled
    assert assembler.held_count == len(series)
    assert len(set(asked)) == 1

    room[0] = True
    assembler.tick()
    assert assembler.held_count == 0
    assert outcomes == [FileOutcome.ACCEPTED] * len(series)
    assert updates[-1].kind is UpdateKind.COMPLETE and updates[-1].view.complete


def test_an_acquisition_past_the_held_bound_is_left_whole_for_a_restart(
    series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assembler_module, "MAX_HELD_FILES", len(series) // 2)
    room = [False]
    updates: list[AcquisitionUpdate] = []
    outcomes: list[str] = []
    assembler = Assembler(
        updates.append,
        quiet_period_s=60.0,
        on_file=lambda _f, outcome, _r, _a: outcomes.append(outcome),
        admit=lambda _aid: room[0],
    )
    files = arrived(series)
    for file in files[: len(files) // 2 + 3]:
        assembler.add_file(file)
    assert assembler.held_count == 0  # let go when the bound was passed
    room[0] = True
    for file in files[len(files) // 2 + 3 :]:
        assembler.add_file(file)  # the rest of it arrives once there is room: still left alone
    assembler.flush()
    assembler.tick()
    assert (updates, outcomes) == ([], [])  # never processed with files missing; a restart reads it whole
