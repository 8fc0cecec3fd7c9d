"""Benchmark: what the link to a Triton server costs per slab window, gRPC messages against shared memory.

Usage: .venv/bin/python bench/triton_link.py [--runs 5] [--slab-depth 56] [--matrix 338x338] [--json FILE]

The agent's real ``triton`` backend (engines/backends/triton_client.py: identity checks, retries, the shared
memory regions) talks to a server that computes nothing: a PyTriton model bound under the shipped model's names
that returns ``2 × window`` as its output channels with the shipped identity, started by this script from the
serve environment (``.venv-serve``, ``make serve-env``). So each call's time is the link alone: serialisation,
the loopback, Triton and PyTriton's proxy, both ways. Both modes run alternately in one server's life, ``--runs``
windows each after a warm-up, and the report gives medians and their ratio (compare within one run only).

On a GPU server, where the network pass takes 17.7 ms (docs/gpu.md), this is what decides whether an agent on the
same host should use ``triton.shared_memory``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines.backends.base import BackendOptions  # noqa: E402
from engines.backends.remote_link import RemoteLink  # noqa: E402
from engines.backends.triton_client import TritonBackend  # noqa: E402
from engines.model.manifest import default_manifest  # noqa: E402
from engines.serving.contract import identity_model_name, served_model_name  # noqa: E402

#: The echo server, run by the serve environment's Python: the served contract with no network behind it.
ECHO_SERVER = r"""
import sys
import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
from engines.model.manifest import default_manifest
from engines.serving.contract import (IDENTITY_OUTPUT, OUTPUTS_OUTPUT, PROBE_INPUT, WINDOW_INPUT, ServedIdentity,
    identity_model_name, served_model_name)
from engines.serving.triton_server import ADMINISTRATIVE

manifest = default_manifest()
identity = ServedIdentity.of(manifest).to_json().encode()
outputs = manifest.network_outputs
def column(n):
    c = np.empty((n, 1), dtype=object); c[:, 0] = identity; return c
def windows(requests):
    return [{OUTPUTS_OUTPUT: np.repeat(r[WINDOW_INPUT][:, :1] * 2, outputs, axis=1), IDENTITY_OUTPUT: column(len(r[WINDOW_INPUT]))} for r in requests]
def probe(requests):
    return [{IDENTITY_OUTPUT: column(len(r[PROBE_INPUT]))} for r in requests]
grpc, http, metrics = map(int, sys.argv[1:4])
name = served_model_name(manifest.model_id, manifest.version)
config = TritonConfig(grpc_address="127.0.0.1", grpc_port=grpc, http_address="127.0.0.1", http_port=http,
                      metrics_port=metrics, log_verbose=0)
with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=list(ADMINISTRATIVE))) as t:
    c = manifest.architecture.in_channels
    t.bind(name, windows, inputs=[Tensor(name=WINDOW_INPUT, dtype=np.float32, shape=(c, -1, -1, -1))],
           outputs=[Tensor(name=OUTPUTS_OUTPUT, dtype=np.float32, shape=(outputs, -1, -1, -1)),
                    Tensor(name=IDENTITY_OUTPUT, dtype=bytes, shape=(1,))], config=ModelConfig(max_batch_size=4))
    t.bind(identity_model_name(name), probe, inputs=[Tensor(name=PROBE_INPUT, dtype=np.int32, shape=(1,))],
           outputs=[Tensor(name=IDENTITY_OUTPUT, dtype=bytes, shape=(1,))], config=ModelConfig(max_batch_size=8))
    t.serve()
"""


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    """Until both models are loaded (Triton says ready before PyTriton has loaded any)."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    manifest = default_manifest()
    name = served_model_name(manifest.model_id, manifest.version)
    deadline = time.monotonic() + 240
    client = grpcclient.InferenceServerClient(url)
    try:
        while True:
            try:
                if all(client.is_model_ready(m, client_timeout=2) for m in (name, identity_model_name(name))):
                    return
            except Exception:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"echo server not ready:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
    finally:
        client.close()


def backend_for(url: str, shape: tuple[int, int, int, int], shared: bool) -> TritonBackend:
    link = RemoteLink(url=url, attempts=1, timeout_s=120, shared_memory=shared)
    return TritonBackend.load(default_manifest(), shape, BackendOptions(remote=link))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slab-depth", type=int, default=default_manifest().slab.depth)
    parser.add_argument("--matrix", default="x".join(map(str, default_manifest().matrix)))
    parser.add_argument("--serve-python", type=Path, default=REPO / ".venv-serve" / "bin" / "python")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = default_manifest()
    factor = manifest.architecture.downsampling_factor
    rows, cols = (-(-int(n) // factor) * factor for n in args.matrix.split("x"))
    shape = (manifest.architecture.in_channels, args.slab_depth + 2 * manifest.slab.halo, rows, cols)
    mbytes = 4 * int(np.prod(shape)) / 1e6
    grpc, http, metrics = free_ports(3)
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "serve.log"
        with log.open("wb") as sink:
            server = subprocess.Popen(
                [str(args.serve_python), "-c", ECHO_SERVER, str(grpc), str(http), str(metrics)],
                cwd=REPO,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_ready(f"127.0.0.1:{grpc}", server, log)
            backends = {
                mode: backend_for(f"127.0.0.1:{grpc}", shape, mode == "shm") for mode in ("grpc", "shm")
            }
            window = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))
            times: dict[str, list[float]] = {mode: [] for mode in backends}
            for _ in range(args.runs):
                for mode, backend in backends.items():
                    started = time.perf_counter()
                    out = backend.run_outputs(window)
                    times[mode].append(time.perf_counter() - started)
                    assert torch.equal(out[0], window[0] * 2)
            for backend in backends.values():
                backend.close()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # tritonserver and the stubs, if they outlived it
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    print(f"window {'x'.join(map(str, shape))} ({mbytes:.0f} MB each way), {args.runs} calls per mode")
    for mode, values in times.items():
        print(f"  {mode:5s} median {medians[mode]:.3f} s  ({', '.join(f'{v:.3f}' for v in values)})")
    print(f"  shared memory / gRPC: {medians['shm'] / medians['grpc']:.2f}")
    if args.json:
        report: dict[str, Any] = {"window": shape, "mbytes": mbytes, "times_s": times, "medians_s": medians}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
