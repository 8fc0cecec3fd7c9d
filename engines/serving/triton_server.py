"""``sct-agent serve``: a Triton Inference Server (through PyTriton) that computes slab windows for many agents.

One Triton model per model id and version (``served_model_name``) with its identity model beside it
(engines.serving.contract); windows from several agents of one shape are joined by Triton's dynamic batcher; a
full queue refuses at once (the agent retries or falls back) rather than letting every scanner wait. The engine
for each expected window shape is loaded, accepted (GPU engines) and warmed before the models are bound, so
Triton reports the model ready only when its first window will be fast. Triton's Prometheus metrics
(``nv_inference_*``: requests, batch sizes, queue and compute time) are served on ``metrics_port``; the agents
count their side (calls, latency, failures, fallbacks).

PyTriton runs its Python model through a stub that must load the same ``libpython`` as the serving interpreter, so
this runs in its own environment made from the system's Python 3.11 (docs/scale-out.md). Security follows the
publisher's rule: on loopback plaintext is allowed; any other address needs TLS and a token or client
certificates, unless ``insecure`` says otherwise (logged as a warning). The HTTP endpoint PyTriton drives the
server through stays on loopback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines.backends.base import BackendOptions, Precision
from engines.model.manifest import ModelManifest
from engines.serving.contract import (
    IDENTITY_OUTPUT,
    OUTPUTS_OUTPUT,
    PROBE_INPUT,
    TRITON_MODEL_VERSION,
    WINDOW_INPUT,
    ServedIdentity,
    identity_model_name,
    served_model_name,
)
from engines.serving.window_runner import DEFAULT_MAX_SHAPES, WindowRunner
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

#: Triton endpoints a token guards; health stays open for load balancers and systemd probes.
TOKEN_GUARDED: Final = (
    "inference",
    "metadata",
    "model-config",
    "shared-memory",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)


#: Longest Unix socket path the kernel takes (sun_path is 108 bytes with its terminating NUL).
MAX_SOCKET_PATH: Final = 107
#: The longest name PyTriton gives a socket after the model's name.
_SOCKET_SUFFIX: Final = "_0_0-server.sock"


#: What PyTriton's own token guards on a server without one of ours.
ADMINISTRATIVE: Final = ("model-repository", "statistics", "trace", "logging")


class ServeConfigError(SctError, ValueError):
    def __init__(self, attribute: str, found: object, expected: str) -> None:
        super().__init__(
            f"{attribute}: found {found!r}, expected {expected}",
            attribute=attribute,
            found=found,
            expected=expected,
        )


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Everything ``sct-agent serve`` takes; see docs/scale-out.md for each."""

    manifest: ModelManifest
    backend: str = "auto"
    precision: Precision | None = None
    threads: int | None = None
    cache_dir: Path | None = None
    #: Address of the gRPC endpoint agents connect to (and of the metrics endpoint).
    address: str = "127.0.0.1"
    grpc_port: int = 8001
    #: PyTriton's own control endpoint, always on loopback.
    http_port: int = 8000
    metrics_port: int = 8002
    #: Windows Triton may join into one batch, and how long it waits for more.
    max_batch: int = 4
    batch_delay_us: int = 2000
    #: Requests waiting beyond this are refused at once as "at capacity".
    max_queue: int = 16
    #: Window shapes ``[echoes, depth, rows, cols]`` warmed before the server says ready.
    warm_windows: tuple[tuple[int, int, int, int], ...] = ()
    max_shapes: int = DEFAULT_MAX_SHAPES
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: CA of the client certificates the server requires (mutual TLS); None = no client certificates.
    tls_client_ca_file: Path | None = None
    token_file: Path | None = None
    #: Plaintext or no authentication off loopback, by explicit choice.
    insecure: bool = False
    #: Where PyTriton puts the server's binaries and model store; None = a new temporary folder.
    workspace: Path | None = None

    def check(self) -> None:
        """Refuse settings that would serve patient data in the clear or to anyone, naming what is missing."""
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ServeConfigError(f"serve.{name}", port, "a TCP port 1-65535")
        if len({self.grpc_port, self.http_port, self.metrics_port}) < 3:
            raise ServeConfigError(
                "serve ports", (self.grpc_port, self.http_port, self.metrics_port), "three different ports"
            )
        if self.max_batch < 1 or self.max_queue < 1 or self.batch_delay_us < 0:
            raise ServeConfigError(
                "serve.max_batch/max_queue/batch_delay_us",
                (self.max_batch, self.max_queue, self.batch_delay_us),
                "max_batch >= 1, max_queue >= 1, batch_delay_us >= 0",
            )
        if self.max_shapes < 1 or len(self.warm_windows) > self.max_shapes:
            raise ServeConfigError(
                "serve.max_shapes",
                self.max_shapes,
                f"1 or more, and at least the {len(self.warm_windows)} windows to warm (--slab-depth x --matrix)",
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ServeConfigError(
                "serve.tls_cert_file/tls_key_file", (self.tls_cert_file, self.tls_key_file), "both or neither"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ServeConfigError(
                "serve.tls_cert_file", None, "a server certificate when client certificates are required"
            )
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ServeConfigError(f"serve.{name}", str(path), "an existing file")
        if self.workspace is not None:
            # PyTriton puts Unix sockets named after the models in the workspace; the kernel limits their paths.
            longest = (
                self.workspace
                / f"{identity_model_name(served_model_name(self.manifest.model_id, self.manifest.version))}{_SOCKET_SUFFIX}"
            )
            if len(str(longest)) > MAX_SOCKET_PATH:
                raise ServeConfigError(
                    "serve.workspace",
                    str(self.workspace),
                    f"a folder path of at most {MAX_SOCKET_PATH - len(str(longest)) + len(str(self.workspace))} "
                    f"characters (PyTriton's sockets there, e.g. {longest.name}, must fit the {MAX_SOCKET_PATH}-byte "
                    "Unix socket path limit), e.g. /run/sct-serve",
                )
        if not is_loopback(self.address) and not self.insecure:
            if self.tls_cert_file is None:
                raise ServeConfigError(
                    "serve.address",
                    self.address,
                    "a loopback address, or TLS (--tls-cert and --tls-key) for an address other hosts reach "
                    "(--insecure to serve in the clear anyway)",
                )
            if self.token_file is None and self.tls_client_ca_file is None:
                raise ServeConfigError(
                    "serve.token_file",
                    None,
                    f"a token (--token-file) or client certificates (--tls-client-ca) on {self.address}, which other "
                    "hosts reach (--insecure to serve anyone anyway)",
                )

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        token = self.token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise ServeConfigError(
                "serve.token_file", str(self.token_file), "a file holding a non-empty token"
            )
        return token


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def warm_windows(
    manifest: ModelManifest, slab_depths: Sequence[int], matrices: Sequence[tuple[int, int]]
) -> tuple[tuple[int, int, int, int], ...]:
    """The windows agents send for these slab depths and in-plane matrices (padded as the engine pads them)."""
    factor = manifest.architecture.downsampling_factor
    for depth in slab_depths:
        if depth < 1 or depth % factor:
            raise ServeConfigError("serve.slab_depth", depth, f"a positive multiple of {factor}")
    return tuple(
        dict.fromkeys(
            (
                manifest.architecture.in_channels,
                depth + 2 * manifest.slab.halo,
                -(-rows // factor) * factor,
                -(-cols // factor) * factor,
            )
            for depth in slab_depths
            for rows, cols in matrices
        )
    )


class ServedModel:
    """The two inference callables PyTriton binds for one model, over one window runner."""

    def __init__(self, runner: WindowRunner, identity: ServedIdentity) -> None:
        self.runner = runner
        self.identity = identity
        self._identity_bytes = identity.to_json().encode()

    def _identity_column(self, batch: int) -> np.ndarray:
        column = np.empty((batch, 1), dtype=object)
        column[:, 0] = self._identity_bytes
        return column

    def infer_windows(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:
            windows = np.asarray(request[WINDOW_INPUT], dtype=np.float32)
            outputs = self.runner.run(windows)
            responses.append(
                {OUTPUTS_OUTPUT: outputs, IDENTITY_OUTPUT: self._identity_column(windows.shape[0])}
            )
        return responses

    def infer_identity(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        return [
            {IDENTITY_OUTPUT: self._identity_column(np.asarray(r[PROBE_INPUT]).shape[0])} for r in requests
        ]


def serve(settings: ServeSettings, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Warm the engine, start Triton, bind the model and serve until stopped (SIGINT / KeyboardInterrupt)."""
    settings.check()
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor  # noqa: PLC0415
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig  # noqa: PLC0415

    manifest = settings.manifest
    options = BackendOptions(
        threads=settings.threads, precision=settings.precision, cache_dir=settings.cache_dir
    )
    runner = WindowRunner(manifest, settings.backend, options, max_shapes=settings.max_shapes)
    windows = settings.warm_windows or warm_windows(manifest, [manifest.slab.depth], [manifest.matrix])
    engine, precision = "", ""
    for shape in windows:
        info = runner.warm(shape)
        engine, precision = f"{info.backend} {info.precision} on {info.device}", info.precision
    identity = dataclasses.replace(ServedIdentity.of(manifest), engine=engine, precision=precision)
    served = ServedModel(runner, identity)
    name = served_model_name(manifest.model_id, manifest.version)

    tls = settings.tls_cert_file is not None
    config = TritonConfig(
        grpc_address=settings.address,
        grpc_port=settings.grpc_port,
        http_address="127.0.0.1",
        http_port=settings.http_port,
        metrics_address=settings.address,
        metrics_port=settings.metrics_port,
        grpc_use_ssl=True if tls else None,
        grpc_use_ssl_mutual=True if settings.tls_client_ca_file is not None else None,
        grpc_server_cert=settings.tls_cert_file,
        grpc_server_key=settings.tls_key_file,
        grpc_root_cert=settings.tls_client_ca_file,
        log_verbose=0,
    )
    token = settings.token()
    # Without a token (loopback), PyTriton's own random token still guards the administrative endpoints; shared
    # memory stays open to agents on this host (triton.shared_memory), who can only offer memory of their own.
    security = TritonSecurityConfig(
        access_token=token, restricted_endpoints=list(TOKEN_GUARDED if token else ADMINISTRATIVE)
    )
    if not is_loopback(settings.address) and settings.insecure:
        logger.warning(
            "serving on %s %s by --insecure: anyone who reaches it may send windows%s",
            settings.address,
            "with TLS" if tls else "in the clear",
            "" if token else " without a token",
        )
    workspace = str(settings.workspace) if settings.workspace else None
    elements = [manifest.architecture.in_channels, -1, -1, -1]
    try:
        with Triton(config=config, workspace=workspace, security_config=security) as triton:
            triton.bind(
                model_name=name,
                infer_func=served.infer_windows,
                inputs=[Tensor(name=WINDOW_INPUT, dtype=np.float32, shape=tuple(elements))],
                outputs=[
                    Tensor(
                        name=OUTPUTS_OUTPUT, dtype=np.float32, shape=(manifest.network_outputs, -1, -1, -1)
                    ),
                    Tensor(name=IDENTITY_OUTPUT, dtype=bytes, shape=(1,)),
                ],
                model_version=TRITON_MODEL_VERSION,
                config=ModelConfig(
                    max_batch_size=settings.max_batch,
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=settings.batch_delay_us,
                        default_queue_policy=QueuePolicy(max_queue_size=settings.max_queue),
                    ),
                ),
                strict=True,
            )
            triton.bind(
                model_name=identity_model_name(name),
                infer_func=served.infer_identity,
                inputs=[Tensor(name=PROBE_INPUT, dtype=np.int32, shape=(1,))],
                outputs=[Tensor(name=IDENTITY_OUTPUT, dtype=bytes, shape=(1,))],
                model_version=TRITON_MODEL_VERSION,
                config=ModelConfig(max_batch_size=8),
            )
            triton.connect()
            where = f"{settings.address}:{settings.grpc_port}"
            logger.info(
                "serving %s as %r on %s (%s, %s), engine %s, windows %s warm; Triton metrics on %s:%d/metrics",
                manifest.label,
                name,
                where,
                "TLS" if tls else "plaintext",
                "token required" if token else "no token",
                engine,
                ", ".join("x".join(map(str, w)) for w in windows),
                settings.address,
                settings.metrics_port,
            )
            if on_ready is not None:
                on_ready(where)
            triton.serve()
    finally:
        runner.close()


def serve_environment_problem() -> str | None:
    """Why PyTriton cannot serve under this interpreter, or None.

    PyTriton's model stub is a separate program that loads ``libpython3.X.so.1.0`` wherever the system's loader
    finds it; under an interpreter of another build (pyenv, conda, a newer patch release) the two disagree on
    the interpreter's internals and the model fails to load with an obscure error. So the library the loader
    finds must carry this interpreter's exact version."""
    try:
        import pytriton  # noqa: F401, PLC0415
    except ImportError:
        return "nvidia-pytriton is not installed in this environment (pip install 'sct-edge-agent[serve]')"
    soname = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    library = _loader_library(soname)
    version = platform.python_version()
    if library is None:
        return (
            f"no {soname} where the system's loader looks; PyTriton's model stub needs it (Debian: "
            f"libpython{sys.version_info.major}.{sys.version_info.minor})"
        )
    if version.encode() not in library.read_bytes():
        return (
            f"{sys.executable} is Python {version}, but the {soname} the system's loader finds ({library}) is another "
            "build, which PyTriton's model stub would load; make the serve environment from the system's python3 "
            "(docs/scale-out.md)"
        )
    return None


def _loader_library(soname: str) -> Path | None:
    """The file the dynamic loader would open for ``soname``: LD_LIBRARY_PATH first, then its cache."""
    for folder in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
        candidate = Path(folder) / soname
        if candidate.is_file():
            return candidate
    try:
        listing = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    for line in listing.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.split(" ")[0] == soname and Path(path).is_file():
            return Path(path)
    return None
