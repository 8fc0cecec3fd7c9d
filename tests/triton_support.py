"""A real Triton server started by ``sct-agent serve`` for the tests, from the serve environment.

PyTriton needs an interpreter whose libpython the system's loader finds (engines.serving.triton_server), so the
server runs from ``.venv-serve`` (``make serve-env``; ``make test`` builds it) or ``$SCT_SERVE_PYTHON``, in its own
process, exactly as a site runs it. Tests skip with the reason where that environment is missing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from engines.model.manifest import default_manifest
from engines.serving.contract import identity_model_name, served_model_name

REPO = Path(__file__).resolve().parents[1]
#: Start-up of a served model on our CPU: PyTriton copies the server, starts it, imports torch in the model's
#: stub and warms the engine; about 20 s on a quiet machine, far longer under a loaded CI.
READY_TIMEOUT_S = 240.0


def serve_python() -> Path:
    path = Path(os.environ.get("SCT_SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))
    if not path.exists():
        pytest.skip(
            f"no serve environment at {path}: `make serve-env` makes it (PyTriton under the system's Python)"
        )
    return path


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log: Path
    http_port: int = 0

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.grpc_port, self.http_port, self.metrics_port

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole server (PyTriton's tritonserver and model stubs are its children)."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


def ready(url: str, *, ssl_ca: Path | None = None) -> bool:
    """Whether the served models are loaded. Triton's server readiness is not enough: PyTriton loads the models
    only after the server is up, and a server with no model yet counts as ready."""
    name = served_model_name(default_manifest().model_id, default_manifest().version)
    try:
        client = grpcclient.InferenceServerClient(
            url, ssl=ssl_ca is not None, root_certificates=str(ssl_ca) if ssl_ca else None
        )
        try:
            return all(
                client.is_model_ready(model, client_timeout=2) for model in (name, identity_model_name(name))
            )
        finally:
            client.close()
    except Exception:
        return False


@contextmanager
def served(
    folder: Path, *arguments: str, ssl_ca: Path | None = None, ports: tuple[int, int, int] | None = None
) -> Iterator[RunningServer]:
    """``sct-agent serve ARGUMENTS`` on free loopback ports (or ``ports``: gRPC, HTTP, metrics), yielded once its
    models are loaded; stopped after."""
    grpc_port, http_port, metrics_port = ports or free_ports(3)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "serve.log"
    command: Sequence[str] = [
        str(serve_python()),
        "-m",
        "agent.cli",
        "serve",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
        *arguments,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RunningServer(process, grpc_port, metrics_port, log, http_port)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready(server.url, ssl_ca=ssl_ca):
            if process.poll() is not None:
                raise AssertionError(
                    f"sct-agent serve exited with {process.returncode}:\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"sct-agent serve not ready after {READY_TIMEOUT_S} s:\n{server.log_tail()}"
                )
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what PyTriton left behind
