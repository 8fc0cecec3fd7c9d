"""Fault: the export folder goes away (deleted, or its share unmounted) and comes back.

Deleting a watched folder ends its inotify watch and the polling emitter alike; unmounting a share leaves an
empty mount point no event will ever come from. The agent must say so (a ``watch`` status event naming the
folder and why, ``sct_agent_watch_folder_available`` 0, a loss counted), keep checking, watch the folder again
when it is back, scan what is in it, and process a series exported after it returns, with the native (inotify)
and the polling observer alike.

The unmount is real: a tmpfs mounted over the export folder in a private mount namespace (``unshare``) that
only the agent (a real ``sct-agent run`` process) and the test's ``nsenter`` commands see; it is lazily
unmounted (``umount -l``, as an admin or systemd does with a share that went away) and a new one is moved in,
already holding a series. Where user namespaces are not allowed, those tests are skipped, saying why.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import SMALL_SLAB_DEPTH, agent_config, write_test_protocol
from fault_support import metric, recording, scrape, small_series, write_small_model

from agent.ingest.watcher import Watcher
from agent.ops.agent_process import AgentProcess, free_port
from agent.records import ArrivedFile
from agent.service import AgentService
from agent.vocabulary import ArrivalSource
from engines.phantom.case import PhantomCase
from engines.scanner.export import ExportOptions, export_case

OBSERVERS = ("native", "polling")
#: How often the tests' watchers check the folder (s); the agent's default is agent.ingest.watcher.FOLDER_CHECK_S.
CHECK_S = 0.1
WAIT_S = 20.0
SERIES_SEED = 900301


def _unshare_reason() -> str | None:
    """Why a private mount namespace cannot be made here, or None when it can."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "util-linux's unshare and nsenter are not installed"
    try:
        probe = subprocess.run(
            ["unshare", "-rm", "--propagation", "private", "true"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare -rm failed: {error}"
    if probe.returncode != 0:
        return f"user namespaces are not allowed here (unshare -rm: {probe.stderr.strip()})"
    return None


UNSHARE_REASON = _unshare_reason()
needs_unshare = pytest.mark.skipif(
    UNSHARE_REASON is not None, reason=f"a real unmount needs {UNSHARE_REASON}"
)


@pytest.fixture(scope="module")
def model_and_protocols(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shared")
    return write_small_model(root / "model"), write_test_protocol(root / "protocols")


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return small_series(SERIES_SEED)


# ------------------------------------------------------------------------------------------ the watcher alone


class Seen:
    """What a watcher handed over and said about its folder, as it happened."""

    def __init__(self) -> None:
        self.files: queue.Queue[ArrivedFile] = queue.Queue()
        self.folder: queue.Queue[tuple[bool, str]] = queue.Queue()

    def file(self) -> ArrivedFile:
        return self.files.get(timeout=WAIT_S)

    def change(self) -> tuple[bool, str]:
        return self.folder.get(timeout=WAIT_S)


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def started(tmp_path: Path, seen: Seen, observer: str) -> Iterator[Watcher]:
    root = tmp_path / "export"
    root.mkdir()
    watcher = Watcher(
        root,
        seen.files.put,
        observer=observer,
        poll_interval_s=0.05,
        stable_s=0.2,
        on_folder=lambda available, message: seen.folder.put((available, message)),
        folder_check_s=CHECK_S,
    )
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


@pytest.mark.parametrize("observer", OBSERVERS)
def test_a_deleted_folder_is_reported_then_watched_and_scanned_again_when_restored(
    started: Watcher, seen: Seen, tmp_path: Path, observer: str
) -> None:
    root = started.folder
    (root / "before.dcm").write_bytes(b"before")
    assert seen.file().path.name == "before.dcm"

    shutil.rmtree(root)
    available, message = seen.change()
    assert not available
    assert message.startswith(f"watch folder {root} is missing (ENOENT")
    assert (started.available, started.folder_losses) == (False, 1)
    assert seen.files.empty()

    # The folder comes back whole, holding what was exported meanwhile (a restore, a share remounted).
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "meanwhile.dcm").write_bytes(b"meanwhile")
    restored.rename(root)
    available, message = seen.change()
    assert (
        available
        and message == f"watch folder {root} is available again; watching it and scanning what is there"
    )
    assert (started.available, started.folder_losses) == (True, 1)
    meanwhile = seen.file()
    assert meanwhile.path == root / "meanwhile.dcm"

    # And the new watch sees what is written from now on: an event for inotify, stability for polling.
    (root / "after.dcm").write_bytes(b"after")
    after = seen.file()
    assert after.path == root / "after.dcm"
    assert after.source is (ArrivalSource.EVENT if observer == "native" else ArrivalSource.STABLE)
    assert seen.folder.empty() and started.folder_losses == 1


@pytest.mark.parametrize("observer", OBSERVERS)
def test_a_folder_replaced_by_a_file_is_unavailable_until_a_folder_is_back(
    started: Watcher, seen: Seen
) -> None:
    root = started.folder
    shutil.rmtree(root)
    root.write_bytes(b"not a folder")
    available, message = seen.change()
    assert not available
    assert "is missing" in message or "is no longer a directory" in message
    # Until a check finds a directory again, nothing changes, whatever the checks see.
    while not seen.folder.empty():
        assert not seen.change()[0]
    root.unlink()
    root.mkdir()
    (root / "late.dcm").write_bytes(b"late")
    assert seen.change()[0]
    assert seen.file().path == root / "late.dcm"


# --------------------------------------------------------------------------- the agent: folder deleted, restored


@pytest.mark.slow
@pytest.mark.parametrize("observer", OBSERVERS)
def test_the_agent_reports_a_deleted_export_folder_and_processes_series_when_it_returns(
    tmp_path: Path, model_and_protocols: tuple[Path, Path], case: PhantomCase, observer: str
) -> None:
    model, protocols = model_and_protocols
    config = agent_config(tmp_path, protocols, model, observer=observer, quiet_period_s=3.0)
    export = config.watch.folder
    with (
        AgentService(config) as agent,
        recording(agent.endpoints.publish, agent.endpoints.snapshot) as recorder,
    ):
        url = agent.endpoints.metrics_url
        assert url is not None
        assert metric(scrape(url), "sct_agent_watch_folder_available") == 1

        shutil.rmtree(export)
        recorder.wait("the folder reported unavailable", lambda: bool(recorder.statuses("watch")))
        (lost,) = recorder.statuses("watch")
        assert lost.acquisition_id is None
        assert lost.body["available"] is False and lost.body["folder"] == str(export)
        assert f"watch folder {export.resolve()} is missing (ENOENT" in lost.body["message"]
        text = scrape(url)
        assert metric(text, "sct_agent_watch_folder_available") == 0
        assert metric(text, "sct_agent_watch_folder_losses_total") == 1
        assert metric(text, 'sct_agent_errors_total{stage="watcher"}') == 1
        assert agent.healthy(), "a lost folder must not take the agent down"

        # Restored (empty; the unmount test below has a share come back full), then a series is exported.
        export.mkdir()
        recorder.wait("the folder watched again", lambda: len(recorder.statuses("watch")) == 2)
        back = recorder.statuses("watch")[1]
        assert back.body["available"] is True and "available again" in back.body["message"]
        assert metric(scrape(url), "sct_agent_watch_folder_available") == 1
        export_case(case, ExportOptions(out_dir=export / "after", rate_files_per_s=300.0))
        recorder.wait("the series exported after the return", lambda: recorder.volume_count() == 1)
        (volume,) = recorder.volumes
        assert volume.complete_from_slabs and volume.hu.shape == case.geometry.shape
        assert volume.slab_count == -(-case.geometry.shape[0] // SMALL_SLAB_DEPTH)
        assert metric(scrape(url), "sct_agent_watch_folder_losses_total") == 1


# ------------------------------------------------------------------------- the agent: share unmounted, remounted


class NamespacedAgent:
    """``sct-agent run`` in a private mount namespace whose export folder is a tmpfs mounted over it."""

    def __init__(self, root: Path, model: Path, protocols: Path, observer: str) -> None:
        self.export = root / "export"
        self.export.mkdir()
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.snapshot = f"tcp://127.0.0.1:{free_port()}"
        metrics = f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://{metrics}/metrics"
        config = root / "agent.toml"
        config.write_text(
            f'[watch]\nfolder = "{self.export}"\nobserver = "{observer}"\npoll_interval_s = 0.1\n'
            f'[state]\nfolder = "{root / "var"}"\n[protocols]\nfolder = "{protocols}"\n'
            f'[engine]\nmodel = "{model}"\nbackend = "torch-eager"\nslab_depth = {SMALL_SLAB_DEPTH}\n'
            f'[assembly]\nquiet_period_s = 3.0\n[metrics]\nlisten = "{metrics}"\n'
            f'[publish]\nendpoint = "{self.endpoint}"\nsnapshot_endpoint = "{self.snapshot}"\nheartbeat_s = 0.2\n'
        )
        # unshare execs sh, which mounts the share and execs the agent: one process id throughout.
        prefix = ["unshare", "-rm", "--propagation", "private", "sh", "-c"]
        prefix += ['mount -t tmpfs sct-share "$0" && exec "$@"', str(self.export)]
        self.log = root / "agent.log"
        self.process = AgentProcess(config, self.log, prefix=prefix)

    def inside(self, script: str) -> None:
        """Run a shell command in the agent's mount namespace (as the namespace's root)."""
        command = [
            "nsenter",
            "-t",
            str(self.process.pid),
            "-U",
            "-m",
            "--preserve-credentials",
            "sh",
            "-c",
            script,
        ]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{script}: {result.stderr}"


@pytest.mark.slow
@needs_unshare
@pytest.mark.parametrize("observer", OBSERVERS)
def test_the_agent_reports_an_unmounted_share_and_processes_the_series_on_the_share_mounted_again(
    tmp_path: Path, model_and_protocols: tuple[Path, Path], case: PhantomCase, observer: str
) -> None:
    model, protocols = model_and_protocols
    agent = NamespacedAgent(tmp_path, model, protocols, observer)
    try:
        agent.process.wait_ready(120)
        with recording(agent.endpoint, agent.snapshot) as recorder:
            assert metric(scrape(agent.metrics_url), "sct_agent_watch_folder_available") == 1
            agent.inside(f"umount -l {agent.export}")
            recorder.wait("the unmount reported", lambda: bool(recorder.statuses("watch")))
            (lost,) = recorder.statuses("watch")
            assert lost.body["available"] is False
            assert lost.body["message"].startswith(
                f"watch folder {agent.export} is no longer a mount point (the share was unmounted)"
            )
            assert metric(scrape(agent.metrics_url), "sct_agent_watch_folder_available") == 0

            # A share mounted again, already holding a series: no event announces its files, the rescan does.
            staged = tmp_path / "staged"
            export_case(case, ExportOptions(out_dir=staged / "series"))
            share = tmp_path / "share"
            share.mkdir()
            agent.inside(
                f"mount -t tmpfs sct-share {share} && cp -a {staged}/. {share}/ && mount --move {share} {agent.export}"
            )
            recorder.wait("the share watched again", lambda: len(recorder.statuses("watch")) == 2)
            assert recorder.statuses("watch")[1].body["available"] is True
            recorder.wait("the series on the share", lambda: recorder.volume_count() == 1)
            text = scrape(agent.metrics_url)
            assert metric(text, "sct_agent_watch_folder_available") == 1
            assert metric(text, "sct_agent_watch_folder_losses_total") == 1
            assert recorder.volumes[0].complete_from_slabs
    finally:
        status = agent.process.stop(60)
    log = agent.log.read_text()
    assert status == 0, log[-3000:]
    assert "is no longer a mount point" in log and "is available again" in log
