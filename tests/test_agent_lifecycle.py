"""The agent as a service: start-up errors, SIGTERM, restart without republishing, the polling observer."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from agent_support import SMALL_FOV_MM, agent_config, write_test_model, write_test_protocol

from agent.client import ReceivedVolume, SctClient
from agent.ops.agent_process import AgentProcess
from agent.ops.config import WatchConfig
from agent.publish.wire import StatusMessage
from agent.service import AgentService
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, SimulationRequest, export_case

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def small_case() -> PhantomCase:
    request = SimulationRequest(seed=900201, fov_mm=SMALL_FOV_MM, supersample=1)
    return generate_case(900201, request.acquisition(), supersample=1)


@pytest.fixture(scope="module")
def model_and_protocols(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shared")
    return write_test_model(root / "model"), write_test_protocol(root / "protocols")


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_bad_config_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[publish]\nendpoint = "udp://0.0.0.0:5556"\n')
    result = _run_cli("--config", str(config))
    assert result.returncode == 78
    assert "publish.endpoint" in result.stderr and "udp://0.0.0.0:5556" in result.stderr

    result = _run_cli(env={"SCT_AGENT_WATCH_OBSERVER": "inotify"})
    assert result.returncode == 78
    assert "SCT_AGENT_WATCH_OBSERVER" in result.stderr and "inotify" in result.stderr


def test_missing_protocol_stops_start_up_naming_it(
    tmp_path: Path, model_and_protocols: tuple[Path, Path]
) -> None:
    model, protocols = model_and_protocols
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[protocols]\nfolder = "{protocols}"\nactive = ["no_such_protocol"]\n[engine]\nmodel = "{model}"\n'
        '[metrics]\nlisten = ""\n[publish]\nendpoint = "tcp://127.0.0.1:0"\n'
    )
    result = _run_cli("--config", str(config))
    assert result.returncode == 78
    assert "no_such_protocol" in result.stderr


def test_sigterm_stops_the_service_cleanly(tmp_path: Path, model_and_protocols: tuple[Path, Path]) -> None:
    model, protocols = model_and_protocols
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[watch]\nfolder = "export"\n[state]\nfolder = "var"\n[protocols]\nfolder = "{protocols}"\n'
        f'[engine]\nmodel = "{model}"\nbackend = "torch-eager"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n[publish]\nendpoint = "tcp://127.0.0.1:0"\n'
    )
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        agent.wait_ready(120)
    finally:
        status = agent.stop(60)
    log = (tmp_path / "agent.log").read_text()
    assert status == 0, log
    assert "received SIGTERM" in log and "stopped in" in log
    assert (tmp_path / "var" / "journal.sqlite").exists()


def _wait_volume(client: SctClient, timeout_s: float) -> tuple[ReceivedVolume | None, list[StatusMessage]]:
    statuses: list[StatusMessage] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = client.receive(0.1)
        if isinstance(message, StatusMessage):
            statuses.append(message)
        volume = client.pop_volume()
        if volume is not None:
            return volume, statuses
    return None, statuses


def test_restart_does_not_infer_a_finished_series_again_republishes_its_volume_and_polling_works(
    tmp_path: Path, small_case: PhantomCase, model_and_protocols: tuple[Path, Path]
) -> None:
    """First run: the polling observer (network shares) picks up a series exported while it runs. Second run
    over the same folder and state: the start-up scan sees the same files, and the journal says they were
    published, so nothing is inferred or published as new again; the archived volume is republished as such."""
    model, protocols = model_and_protocols
    config = agent_config(tmp_path, protocols, model, quiet_period_s=2.0)
    config = replace(
        config, watch=WatchConfig(folder=config.watch.folder, observer="polling", poll_interval_s=0.1)
    )
    threads_before = set(threading.enumerate())

    with (
        AgentService(config) as pipeline,
        SctClient(pipeline.endpoints.publish, snapshot_endpoint=pipeline.endpoints.snapshot) as client,
    ):
        time.sleep(0.3)
        export_case(small_case, ExportOptions(out_dir=config.watch.folder / "series", rate_files_per_s=300.0))
        volume, _ = _wait_volume(client, TIMEOUT_S)
        assert volume is not None and volume.complete_from_slabs

    with (
        AgentService(config) as pipeline,
        SctClient(pipeline.endpoints.publish, snapshot_endpoint=pipeline.endpoints.snapshot) as client,
    ):
        # The series is not judged or inferred again (the journal says it was published). Its volume comes back
        # from the archive, byte for byte and marked republished, so a robot connecting now still gets it.
        again, statuses = _wait_volume(client, TIMEOUT_S)
        assert again is not None and again.republished and again.from_snapshot
        assert again.sha256 == volume.sha256 and again.hu.tobytes() == volume.hu.tobytes()
        assert again.geometry == volume.geometry
        assert not [s for s in statuses if s.kind in ("verdict", "progress")]
        extra, _ = _wait_volume(client, 2.0)
        assert extra is None, "a volume was published twice after the restart"

    leaked = [
        t
        for t in set(threading.enumerate()) - threads_before
        if t.is_alive() and type(t).__name__ != "GarbageCollectorThread"
    ]
    assert not leaked, leaked
