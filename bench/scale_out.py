"""Benchmark: N agents sharing one Triton server (``sct-agent serve``) against N agents each inferring locally.

Usage (from the repository root):
  .venv/bin/python bench/scale_out.py [--agents 1,2,4] [--runs 3] [--series 1] [--json FILE]
  .venv/bin/python bench/scale_out.py --quick            # one measured round per mode and N
  python3 bench/scale_out.py --device cuda --serve-python /tmp/venv-serve/bin/python   # lent GPU: bash bench/gpu.sh triton

N agents (``sct-agent run``, each its own process, export folder, state folder and loopback ports) are given one
(``--series``) simulated series each, exported at the same moment by N exporter processes playing N scanners.
Two modes, for each N:

- ``remote``: every agent has ``engine.backend = "triton"`` against one server, ``sct-agent serve`` started from
  the serve environment (``.venv-serve``: PyTriton's stub loads the system's libpython), with Triton's dynamic
  batcher (``--max-batch``, ``--batch-delay-us``);
- ``local``: every agent infers with its own ``--local-backend`` (default: the server's backend on the CPU,
  ``torch-eager``, so that both modes run the same engine and the ratio measures the serving).

Each group of agents (mode, N) is started afresh, and its first (``--warmup``) round is not measured: an agent
builds its engine for a series' in-plane matrix when the first such series arrives (the small FOV's is not the
manifest's, which the agent warms at start), and the server builds that window shape once. Per measured round:
volumes per second = volumes / (first export started -> last volume received), and for each volume
last file written (its mtime) -> volume received by a subscriber (``SctClient``) of its agent. Reported per mode
and N: volumes/s (median over ``--runs`` rounds), last-file-to-volume p50 and max over every volume of those
rounds, the remote / local ratios, and for remote the server's mean batch and queue wait from Triton's metrics.
Every volume's sha256 is listed by engine (the same phantom each time: one engine gives the same bytes every time;
fp32 sums taken in another order, with another thread count, batched or on a GPU, may round a few voxels
differently).

On our 2-core CPU the series is the test suite's small field of view (162 x 162 x 40, two echoes, 3 slabs of 16),
judged by a copy of the seed protocol with that FOV and run through a copy of the shipped model that lists it
(as tests/agent_support.py does). ``--device cuda`` serves the full lumbar matrix (338 x 338 x 100) with ``--backend
auto`` (TensorRT or CUDA) while the agents stay CPU processes. Threads: each agent gets max(1, cores // N)
(``--agent-threads``), the server all cores (``--server-threads``); DICOM output is off in every agent (it runs
after the volume is published and would only add CPU load to the other agents' inference).

One module on purpose: the scanners, the agents, the server and the report are one experiment, and each part
is only meaningful beside the others. (Not named triton.py, as the issue put it: that is the name of the package
torch's compiler imports, and this folder on the module search path would shadow it.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.client import SctClient
from agent.ingest.grouping import acquisition_id_for
from agent.ingest.header_reader import read_header
from agent.ops.agent_process import AgentProcess, free_port
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR
from engines.model.manifest import DEFAULT_MODEL_DIR, ModelManifest
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, SimulationRequest, export_case
from engines.serving.contract import identity_model_name, served_model_name

REPO = Path(__file__).resolve().parent.parent
SEED = 920301
AGENT_START_TIMEOUT_S = 600.0
#: PyTriton copies and starts the server, imports torch in the model's stub and warms the engine: about 20 s on
#: a quiet CPU; a GPU server may build a TensorRT engine first.
SERVER_START_TIMEOUT_S = 900.0
#: Head start given to the exporters so that all of them begin at the same instant.
START_LEAD_S = 0.5
PAUSE_BETWEEN_ROUNDS_S = 1.0
#: The test suite's small field of view (tests/agent_support.py): 162 x 162 x 40 voxels, three slabs of 16.
SEED_PROTOCOL_ID = "bonemri_lumbar_1p5t"
SMALL_PROTOCOL_ID = "bench_small_fov_lumbar_1p5t"
SMALL_FOV_MM = (120.0, 120.0, 36.0)
SMALL_SLAB_DEPTH = 16


def cores() -> int:
    return len(os.sched_getaffinity(0))


def write_protocols(folder: Path) -> Path:
    """The seed protocol, and a copy of it whose only changes are the small FOV and its id."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIPPED_PROTOCOLS_DIR / f"{SEED_PROTOCOL_ID}.toml", folder)
    text = (SHIPPED_PROTOCOLS_DIR / f"{SEED_PROTOCOL_ID}.toml").read_text()
    small = text.replace(f'id = "{SEED_PROTOCOL_ID}"', f'id = "{SMALL_PROTOCOL_ID}"').replace(
        "value = [250.0, 250.0, 90.0]", f"value = {list(SMALL_FOV_MM)}"
    )
    if small.count(SMALL_PROTOCOL_ID) != 1 or str(list(SMALL_FOV_MM)) not in small:
        raise RuntimeError(
            f"{SEED_PROTOCOL_ID}.toml changed: its id or FOV rule is not where this bench edits it"
        )
    (folder / f"{SMALL_PROTOCOL_ID}.toml").write_text(small)
    return folder


def write_model(folder: Path) -> Path:
    """The shipped model (same weights, so the server's identity matches) whose manifest lists the small FOV."""
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["validated_protocols"] = [*manifest["validated_protocols"], SMALL_PROTOCOL_ID]
    path.write_text(json.dumps(manifest, indent=2))
    return folder


# -- the scanners ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exported:
    acquisition_id: str
    last_file_at: float
    files: int


def _export_worker(conn: Connection, case: PhantomCase, rate: float | None) -> None:
    """One scanner: on each job (folders, start time) export the case once per folder, one after the other."""
    while True:
        job = conn.recv()
        if job is None:
            return
        folders, start_at = job
        time.sleep(max(0.0, start_at - time.time()))
        started = time.time()
        try:
            done = []
            for folder in folders:
                summary = export_case(case, ExportOptions(out_dir=folder, rate_files_per_s=rate))
                last = max(path.stat().st_mtime for path in summary.paths)
                acquisition = acquisition_id_for(read_header(summary.paths[-1]).header)
                done.append(Exported(acquisition, last, summary.file_count))
            conn.send((started, done))
        except Exception as error:
            conn.send((started, f"{type(error).__name__}: {error}"))


class Scanners:
    """``count`` exporter processes, forked once before any thread or server exists (no re-import of this file)."""

    def __init__(self, count: int, case: PhantomCase, rate: float | None) -> None:
        context = mp.get_context("fork")
        self.pipes: list[Connection] = []
        self.processes = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=_export_worker, args=(theirs, case, rate), daemon=True)
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)

    def export(self, folders: list[list[Path]], timeout_s: float) -> tuple[float, list[list[Exported]]]:
        """Scanner i exports into ``folders[i]``, all starting at the same instant; (first start, what each wrote)."""
        start_at = time.time() + START_LEAD_S
        for pipe, mine in zip(self.pipes, folders, strict=False):
            pipe.send((mine, start_at))
        starts, results = [], []
        for i, pipe in enumerate(self.pipes[: len(folders)]):
            if not pipe.poll(timeout_s):
                raise TimeoutError(f"scanner {i}: export not finished within {timeout_s} s")
            started, done = pipe.recv()
            if isinstance(done, str):
                raise RuntimeError(f"scanner {i}: export failed: {done}")
            starts.append(started)
            results.append(done)
        return min(starts), results

    def close(self) -> None:
        for pipe in self.pipes:
            with suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


# -- the robots ------------------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A subscriber of one agent in its own thread: when each volume arrived, with its checksum."""

    endpoint: str
    snapshot: str
    volumes: dict[str, tuple[float, str, bool]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: str = ""

    def run(self) -> None:
        try:
            with SctClient(self.endpoint, snapshot_endpoint=self.snapshot) as client:
                while not self.stop.is_set():
                    volume = client.receive_volume(0.1)
                    if volume is not None and not volume.from_snapshot:
                        with self.lock:
                            self.volumes.setdefault(
                                volume.acquisition_id,
                                (volume.received_at, volume.sha256, volume.complete_from_slabs),
                            )
        except Exception as error:  # reported by the round that waits for this agent
            self.error = f"{type(error).__name__}: {error}"

    def get(self, acquisition_id: str) -> tuple[float, str, bool] | None:
        with self.lock:
            return self.volumes.get(acquisition_id)


# -- the server ------------------------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    metrics_url: str
    model: str
    log: Path

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def ready(self) -> bool:
        """Both served models loaded (Triton says the server is ready before PyTriton has bound them)."""
        import tritonclient.grpc as grpcclient  # noqa: PLC0415 - the agent's [remote] extra

        try:
            client = grpcclient.InferenceServerClient(self.url)
            try:
                return all(
                    client.is_model_ready(name, client_timeout=2)
                    for name in (self.model, identity_model_name(self.model))
                )
            finally:
                client.close()
        except Exception:
            return False

    def counters(self) -> dict[str, float]:
        """Triton's cumulative counters of the served model (not its identity model); {} if unreadable."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        totals: dict[str, float] = {}
        pattern = re.compile(r'^(nv_inference_\w+)\{[^}]*model="([^"]+)"[^}]*\}\s+(\S+)$')
        for line in text.splitlines():
            match = pattern.match(line)
            if match and match.group(2) == self.model:
                totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(3))
        return totals

    def stop(self) -> None:
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # what PyTriton left behind
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(30)


def start_server(
    python: Path, folder: Path, model: Path, manifest: ModelManifest, arguments: list[str]
) -> Server:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    while len({grpc_port, http_port, metrics_port}) < 3:
        http_port, metrics_port = free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "serve.log"
    command = [
        str(python),
        "-m",
        "agent.cli",
        "serve",
        "--model",
        str(model),
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
            command,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1"}.items() if v},
        )
    server = Server(
        process,
        f"127.0.0.1:{grpc_port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
        served_model_name(manifest.model_id, manifest.version),
        log,
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.ready():
        if process.poll() is not None:
            raise RuntimeError(f"sct-agent serve exited with {process.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"sct-agent serve not ready after {SERVER_START_TIMEOUT_S} s:\n{server.log_tail()}"
            )
        time.sleep(0.5)
    return server


# -- the agents ------------------------------------------------------------------------------------------------


@dataclass
class Agent:
    root: Path
    process: AgentProcess
    receiver: Receiver
    thread: threading.Thread | None = None

    @property
    def export(self) -> Path:
        return self.root / "export"

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.process.log.read_text(errors="replace").splitlines()[-lines:])


def write_config(
    root: Path,
    *,
    model: Path,
    protocols: Path,
    backend: str,
    threads: int,
    slab_depth: int,
    triton_url: str,
    timeout_s: float,
) -> tuple[Path, str, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    snapshot = f"tcp://127.0.0.1:{free_port()}"
    (root / "export").mkdir(parents=True, exist_ok=True)
    path = root / "agent.toml"
    text = (
        f'[watch]\nfolder = "{root / "export"}"\n\n[state]\nfolder = "{root / "var"}"\n\n'
        f'[protocols]\nfolder = "{protocols}"\n\n'
        f'[engine]\nmodel = "{model}"\nbackend = "{backend}"\nthreads = {threads}\nslab_depth = {slab_depth}\n\n'
        f'[publish]\nendpoint = "{endpoint}"\nsnapshot_endpoint = "{snapshot}"\n\n'
        '[dicom]\nenabled = false\n\n[metrics]\nlisten = ""\n\n[status_page]\nlisten = ""\n'
    )
    if triton_url:
        text += f'\n[triton]\nurl = "{triton_url}"\ntimeout_s = {timeout_s}\n'
    path.write_text(text)
    return path, endpoint, snapshot


def start_agents(
    folder: Path, count: int, *, backend: str, threads: int, triton_url: str, settings: Settings
) -> list[Agent]:
    agents: list[Agent] = []
    try:
        for i in range(count):
            root = folder / f"agent-{i}"
            root.mkdir(parents=True)
            config, endpoint, snapshot = write_config(
                root,
                model=settings.model,
                protocols=settings.protocols,
                backend=backend,
                threads=threads,
                slab_depth=settings.slab_depth,
                triton_url=triton_url,
                timeout_s=settings.timeout_s,
            )
            process = AgentProcess(config, root / "agent.log")
            agents.append(Agent(root, process, Receiver(endpoint, snapshot)))
        for agent in agents:  # they start side by side; this waits for the slowest
            agent.process.wait_ready(AGENT_START_TIMEOUT_S)
        for i, agent in enumerate(agents):
            agent.thread = threading.Thread(target=agent.receiver.run, name=f"receiver-{i}", daemon=True)
            agent.thread.start()
        time.sleep(1.0)  # subscriptions reach the publishers
    except BaseException:
        stop_agents(agents)
        raise
    return agents


def stop_agents(agents: list[Agent]) -> list[int]:
    for agent in agents:
        agent.receiver.stop.set()
    statuses = [agent.process.stop(120) for agent in agents]
    for agent in agents:
        if agent.thread is not None:
            agent.thread.join(10)
    return statuses


# -- the benchmark ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    model: Path
    protocols: Path
    slab_depth: int
    series: int
    timeout_s: float


def one_round(agents: list[Agent], scanners: Scanners, label: str, settings: Settings) -> dict[str, Any]:
    folders = [[a.export / f"{label}-s{k}" for k in range(settings.series)] for a in agents]
    first_start, exported = scanners.export(folders, settings.timeout_s)
    deadline = time.monotonic() + settings.timeout_s
    volumes: list[dict[str, Any]] = []
    for i, (agent, mine) in enumerate(zip(agents, exported, strict=True)):
        for series in mine:
            while (got := agent.receiver.get(series.acquisition_id)) is None:
                if agent.receiver.error:
                    raise RuntimeError(f"agent {i}: its subscriber failed: {agent.receiver.error}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"agent {i}: no volume for {series.acquisition_id} within {settings.timeout_s} s; "
                        f"its log ({agent.process.log}) ends:\n{agent.log_tail()}"
                    )
                time.sleep(0.02)
            received_at, sha256, complete = got
            volumes.append(
                {
                    "agent": i,
                    "acquisition_id": series.acquisition_id,
                    "files": series.files,
                    "export_s": series.last_file_at - first_start,
                    "latency_s": received_at - series.last_file_at,
                    "received_s": received_at - first_start,
                    "sha256": sha256,
                    "complete_from_slabs": complete,
                }
            )
    wall = max(v["received_s"] for v in volumes)
    return {
        "wall_s": wall,
        "volumes": len(volumes),
        "volumes_per_s": len(volumes) / wall,
        "latency_p50_s": statistics.median(v["latency_s"] for v in volumes),
        "latency_max_s": max(v["latency_s"] for v in volumes),
        "export_s": max(v["export_s"] for v in volumes),
        "each": volumes,
    }


def run_group(
    mode: str,
    n: int,
    *,
    work: Path,
    scanners: Scanners,
    settings: Settings,
    backend: str,
    threads: int,
    server: Server | None,
    runs: int,
    warmup: int,
) -> dict[str, Any]:
    started = time.monotonic()
    agents = start_agents(
        work / f"{mode}-{n}",
        n,
        backend=backend,
        threads=threads,
        triton_url=server.url if server is not None else "",
        settings=settings,
    )
    start_s = time.monotonic() - started
    rounds: list[dict[str, Any]] = []
    before: dict[str, float] = {}
    statuses: list[int] = []
    try:
        for r in range(warmup + runs):
            if r == warmup and server is not None:
                before = server.counters()
            result = one_round(agents, scanners, f"r{r}", settings)
            tag = "warm-up" if r < warmup else f"run {r - warmup + 1}"
            print(
                f"  {mode:6s} N={n} {tag}: {result['volumes']} volumes in {result['wall_s']:.2f} s "
                f"({result['volumes_per_s']:.3f}/s), last file -> volume p50 {result['latency_p50_s']:.2f} s, "
                f"max {result['latency_max_s']:.2f} s (exports took {result['export_s']:.2f} s)",
                flush=True,
            )
            if r >= warmup:
                rounds.append(result)
            time.sleep(PAUSE_BETWEEN_ROUNDS_S)
        after = server.counters() if server is not None else {}
    finally:
        statuses = stop_agents(agents)
    latencies = [v["latency_s"] for r in rounds for v in r["each"]]
    group: dict[str, Any] = {
        "mode": mode,
        "agents": n,
        "backend": backend,
        "agent_threads": threads,
        "agents_start_s": start_s,
        "volumes_per_s": statistics.median(r["volumes_per_s"] for r in rounds),
        "latency_p50_s": statistics.median(latencies),
        "latency_max_s": max(latencies),
        "agent_exit_statuses": statuses,
        "rounds": rounds,
    }
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    if delta.get("nv_inference_exec_count"):
        group["server"] = {
            "windows": delta.get("nv_inference_count", 0.0),
            "executions": delta["nv_inference_exec_count"],
            "mean_batch": delta.get("nv_inference_count", 0.0) / delta["nv_inference_exec_count"],
            "mean_queue_ms": delta.get("nv_inference_queue_duration_us", 0.0)
            / 1000
            / max(1.0, delta.get("nv_inference_request_success", 0.0)),
            "mean_compute_ms": delta.get("nv_inference_compute_infer_duration_us", 0.0)
            / 1000
            / max(1.0, delta["nv_inference_exec_count"]),
        }
    return group


def table(groups: list[dict[str, Any]]) -> list[str]:
    local = {g["agents"]: g for g in groups if g["mode"] == "local"}
    lines = [
        "| mode | N | agent threads | volumes/s | last file -> volume p50 | max | remote/local volumes/s "
        "| remote/local p50 | server mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in sorted(groups, key=lambda g: (g["agents"], g["mode"] != "local")):
        ratio_rate = ratio_p50 = batch = ""
        other = local.get(g["agents"])
        if g["mode"] == "remote" and other is not None:
            ratio_rate = f"{g['volumes_per_s'] / other['volumes_per_s']:.2f} x"
            ratio_p50 = f"{g['latency_p50_s'] / other['latency_p50_s']:.2f} x"
        if "server" in g:
            batch = f"{g['server']['mean_batch']:.2f}"
        lines.append(
            f"| {g['mode']} | {g['agents']} | {g['agent_threads']} | {g['volumes_per_s']:.3f} "
            f"| {g['latency_p50_s']:.2f} s | {g['latency_max_s']:.2f} s | {ratio_rate} | {ratio_p50} | {batch} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", default="1,2,4", help="agent counts N, comma-separated (default 1,2,4)")
    parser.add_argument("--modes", default="local,remote", help="local, remote or both (default both)")
    parser.add_argument("--runs", type=int, default=3, help="measured rounds per mode and N (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    parser.add_argument("--series", type=int, default=1, help="series each agent gets per round (default 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 1 measured round per mode and N (after the warm-up round)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="export pace, files/s per scanner (default 0: as fast as it can)",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the server infers (cuda: lent GPU)"
    )
    parser.add_argument(
        "--server-backend", help="sct-agent serve --backend (default torch-eager; auto on cuda)"
    )
    parser.add_argument("--local-backend", help="the local agents' backend (default torch-eager)")
    parser.add_argument(
        "--server-threads", type=int, default=0, help="server CPU threads (default all cores)"
    )
    parser.add_argument("--agent-threads", type=int, default=0, help="threads per agent (default cores // N)")
    parser.add_argument("--max-batch", type=int, default=4, help="Triton's dynamic batch (default 4)")
    parser.add_argument("--batch-delay-us", type=int, default=2000, help="Triton's batch wait (default 2000)")
    parser.add_argument(
        "--fov",
        choices=["small", "full"],
        help="small: 162 x 162 x 40 (default on cpu); full: 338 x 338 x 100",
    )
    parser.add_argument(
        "--slab-depth", type=int, help="slab depth of agents and server (default 16 / manifest's)"
    )
    parser.add_argument(
        "--serve-python",
        type=Path,
        default=Path(os.environ.get("SCT_SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python")),
        help="interpreter of the serve environment (default $SCT_SERVE_PYTHON or .venv-serve/bin/python)",
    )
    parser.add_argument(
        "--server-cache-dir", type=Path, help="the server's engine cache (sct-agent serve --cache-dir)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a round may take (default 600)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--keep", type=Path, help="work here and keep the logs (default: a temporary folder)")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    counts = sorted({int(n) for n in args.agents.split(",") if n.strip()})
    modes = [m for m in ("local", "remote") if m in args.modes.split(",")]
    if not counts or min(counts) < 1 or not modes or args.runs < 1 or args.series < 1:
        parser.error("--agents needs counts >= 1, --modes local and/or remote, --runs and --series >= 1")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: expected a new or empty folder")
    if "remote" in modes and not args.serve_python.exists():
        parser.error(f"no serve environment at {args.serve_python}: `make serve-env` makes it")

    cpu = cores()
    fov = args.fov or ("full" if args.device == "cuda" else "small")
    server_backend = args.server_backend or ("auto" if args.device == "cuda" else "torch-eager")
    local_backend = args.local_backend or "torch-eager"
    server_threads = args.server_threads or cpu
    wall_started = time.monotonic()

    request = SimulationRequest(seed=SEED, fov_mm=SMALL_FOV_MM if fov == "small" else None, supersample=1)
    print(f"simulating phantom seed {SEED}, {fov} field of view ...", flush=True)
    case = generate_case(SEED, request.acquisition(), supersample=1)
    echoes, slices, rows, cols = case.echoes.shape
    work = args.keep or Path(tempfile.mkdtemp(prefix="sct-bench-triton-"))
    work.mkdir(parents=True, exist_ok=True)
    model = write_model(work / "model")
    manifest = ModelManifest.load(model)
    slab_depth = args.slab_depth or (SMALL_SLAB_DEPTH if fov == "small" else manifest.slab.depth)
    settings = Settings(
        model=model,
        protocols=write_protocols(work / "protocols"),
        slab_depth=slab_depth,
        series=args.series,
        timeout_s=args.timeout,
    )
    server_arguments = [
        "--backend", server_backend, "--threads", str(server_threads), "--slab-depth", str(slab_depth),
        "--matrix", f"{rows}x{cols}", "--max-batch", str(args.max_batch), "--batch-delay-us",
        str(args.batch_delay_us), "--max-queue", str(max(16, 2 * max(counts) * args.series)),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if args.server_cache_dir:
        server_arguments += ["--cache-dir", str(args.server_cache_dir)]
    threads_of = {n: args.agent_threads or max(1, cpu // n) for n in counts}
    setup = {
        "cores": cpu,
        "case": f"{echoes} x {slices} x {rows} x {cols}",
        "slab_depth": slab_depth,
        "windows_per_volume": -(-slices // slab_depth),
        "series_per_agent": args.series,
        "export_rate_files_per_s": args.rate or "as fast as possible",
        "server": f"sct-agent serve {' '.join(server_arguments)} ({args.serve_python})",
        "local_backend": local_backend,
        "agent_threads": threads_of,
        "runs": args.runs,
        "warmup_rounds": args.warmup,
    }
    print(
        f"{cpu} cores; case {setup['case']}, slab depth {slab_depth} ({setup['windows_per_volume']} windows per "
        f"volume), {args.series} series per agent per round, export "
        + (f"{args.rate:g} files/s" if args.rate else "as fast as possible")
        + f"\nserver: --backend {server_backend} --threads {server_threads} --max-batch {args.max_batch} "
        f"--batch-delay-us {args.batch_delay_us}; local agents: {local_backend}; threads per agent "
        + ", ".join(f"N={n}: {t}" for n, t in threads_of.items())
        + f"\n{args.runs} measured round(s) per mode and N after {args.warmup} warm-up round(s); work in {work}",
        flush=True,
    )

    # The scanners are forked first, while this process has no thread, server or socket yet.
    scanners = Scanners(max(counts), case, args.rate or None)
    server: Server | None = None
    groups: list[dict[str, Any]] = []
    failed = ""
    try:
        if "remote" in modes:
            print(f"starting sct-agent serve ({server_backend}) ...", flush=True)
            started = time.monotonic()
            server = start_server(args.serve_python, work / "serve", model, manifest, server_arguments)
            setup["server_start_s"] = round(time.monotonic() - started, 1)
            print(f"  server ready in {setup['server_start_s']} s at {server.url}", flush=True)
        for index, n in enumerate(counts):
            # Alternate which mode goes first, so that drift of the shared machine does not favour one.
            for mode in modes if index % 2 == 0 else modes[::-1]:
                groups.append(
                    run_group(
                        mode,
                        n,
                        work=work,
                        scanners=scanners,
                        settings=settings,
                        backend="triton" if mode == "remote" else local_backend,
                        threads=threads_of[n],
                        server=server if mode == "remote" else None,
                        runs=args.runs,
                        warmup=args.warmup,
                    )
                )
    except (RuntimeError, TimeoutError) as error:
        failed = str(error)
        print(f"PROBLEM: {error}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        scanners.close()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    # The same phantom in every series: one engine gives the same bytes every time; fp32 sums taken in another
    # order (another thread count, a batch, a GPU) may round a few voxels to the next HU.
    by_engine: dict[str, set[str]] = {}
    for g in groups:
        who = (
            f"remote (server {server_backend}, {server_threads} threads)"
            if g["mode"] == "remote"
            else f"local ({g['backend']}, {g['agent_threads']} thread{'s' if g['agent_threads'] > 1 else ''})"
        )
        by_engine.setdefault(who, set()).update(v["sha256"] for r in g["rounds"] for v in r["each"])
    incomplete = sum(not v["complete_from_slabs"] for g in groups for r in g["rounds"] for v in r["each"])
    wall = time.monotonic() - wall_started
    print()
    for line in table(groups):
        print(line)
    print(
        "\nvolume sha256 by engine: "
        + "; ".join(f"{who}: {', '.join(sorted(h[:12] for h in hs))}" for who, hs in by_engine.items())
        + f"; volumes not complete from their slabs: {incomplete}"
    )
    for g in groups:
        if "server" in g:
            s = g["server"]
            print(
                f"server, N={g['agents']}: {s['windows']:.0f} windows in {s['executions']:.0f} executions "
                f"(mean batch {s['mean_batch']:.2f}), queue {s['mean_queue_ms']:.0f} ms per request, compute "
                f"{s['mean_compute_ms']:.0f} ms per execution"
            )
    print(f"wall time {wall:.0f} s", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "setup": setup,
                    "groups": groups,
                    "volume_sha256": {who: sorted(hs) for who, hs in by_engine.items()},
                    "incomplete_volumes": incomplete,
                    "wall_s": wall,
                    "problem": failed,
                    "args": vars(args),
                },
                indent=1,
                default=str,
            )
        )
    bad_exit = any(s != 0 for g in groups for s in g["agent_exit_statuses"])
    return 1 if failed or bad_exit or incomplete or not groups else 0


if __name__ == "__main__":
    sys.exit(main())
