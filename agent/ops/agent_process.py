"""Run ``sct-agent run`` as a child process the way systemd does: start, wait for ready, SIGTERM, reap.

The demo and the end-to-end benchmark use it, so that what they show and measure is the agent as deployed (its
own process, its own threads and CPU share) rather than a pipeline object sharing the caller's interpreter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The line ``sct-agent run`` prints on stdout once the engine is warm and the watcher scans.
READY_PREFIX = "sct-agent ready"


def free_port() -> int:
    """A loopback TCP port nobody is listening on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True, slots=True)
class LoopbackConfig:
    path: Path
    endpoint: str
    metrics_url: str
    snapshot: str
    #: The technologist's status page (agent/status_page).
    page_url: str = ""


def write_loopback_config(
    folder: Path,
    *,
    backend: str,
    quiet_period_s: float = 10.0,
    extra: str = "",
    engine_cache: Path | None = None,
) -> LoopbackConfig:
    """``folder/agent.toml``: the defaults, with the folder's export/ and var/ and free loopback ports."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    snapshot = f"tcp://127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    page = f"127.0.0.1:{free_port()}"
    path = folder / "agent.toml"
    path.write_text(
        "# The defaults, with this folder's export/ and var/ and free loopback ports.\n"
        '[watch]\nfolder = "export"\n\n[state]\nfolder = "var"\n\n'
        f'[publish]\nendpoint = "{endpoint}"\nsnapshot_endpoint = "{snapshot}"\n\n[metrics]\nlisten = "{metrics}"\n\n'
        f'[status_page]\nlisten = "{page}"\n\n'
        f'[engine]\nbackend = "{backend}"\n'
        + (f'cache_dir = "{engine_cache}"\n' if engine_cache is not None else "")
        + f"\n[assembly]\nquiet_period_s = {quiet_period_s}\n{extra}"
    )
    return LoopbackConfig(
        path=path,
        endpoint=endpoint,
        metrics_url=f"http://{metrics}/metrics",
        snapshot=snapshot,
        page_url=f"http://{page}/",
    )


class AgentProcess:
    """One ``sct-agent run --config FILE`` child, its stderr in a log file.

    ``prefix`` runs the agent through another command that ends by exec'ing it (``unshare``, ``nsenter``), so
    that ``pid`` is the agent's process all the same.
    """

    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``env``: variables set (or, mapped to "", removed) on top of this process's environment."""
        self.log = log
        changes = dict(env or {})
        merged = {**os.environ, "PYTHONUNBUFFERED": "1", **changes}
        child_env = {key: value for key, value in merged.items() if value != "" or key not in changes}
        with log.open("w") as log_file:
            self._process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env=child_env,
            )

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the agent says it is ready; raise with the log's tail if it exits or takes too long."""
        lines: list[str] = []

        def read() -> None:
            assert self._process.stdout is not None
            lines.append(self._process.stdout.readline())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not lines or not lines[0].startswith(READY_PREFIX):
            self.kill()
            tail = "".join(self.log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"the agent did not start (see {self.log}):\n{tail}")

    def peak_rss_bytes(self) -> int:
        """VmHWM of the running agent (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found in /proc status")

    def stop(self, timeout_s: float) -> int:
        """SIGTERM, then wait; SIGKILL if it does not stop in time. Returns the exit status."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            status = self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            status = self._process.returncode
        if self._process.stdout is not None:
            self._process.stdout.close()
        return status

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
