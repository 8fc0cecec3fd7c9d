"""Benchmark: the agent end to end on a full lumbar series (2 x 100 x 338 x 338) exported at a realistic pace.

Usage: .venv/bin/python bench/e2e.py [--runs 3] [--rate 40] [--backend auto] [--json FILE]

The agent runs as its own process (``sct-agent run``, as systemd starts it); this script plays the scanner
(exports the same simulated series ``--runs`` times, each as a new acquisition) and a robot (a subscriber), and
reports medians of (targets in brackets, from docs/architecture.md, Target figures):

- last file written -> completion detected (the final verdict's decision time)            [<= 0.1 s]
- first file written -> first verdict received by the subscriber                            [<= 0.5 s]
- last file written -> last sCT slab received, and its ratio to reading and inferring one
  slab alone (measured here, after the agent has stopped, with the same backend)            [<= 1.3 x]
- last file written -> finished volume received
- ingest: the agent's header reader + grouping, files/s, against bare ``pydicom.dcmread`` of the
  same files (full read and header-only)                                                    [>= 0.9 x]
- publish: slab bytes/s through the agent's Publisher against bare pyzmq PUB/SUB with the same frames,
  each received by a subscriber in another process                                          [>= 0.8 x]
- peak RSS of the agent process.

"Written" is the file's mtime (the simulator writes a hidden temp file, fsyncs and renames it, as careful
exporters do). All times are wall clock on one machine. Compare ratios within one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import zmq

from agent.client import SctClient
from agent.ingest.assembler import Assembler
from agent.ingest.header_reader import read_header
from agent.ingest.pixel_reader import read_pixels
from agent.ops.agent_process import AgentProcess, write_loopback_config
from agent.ops.config import AgentConfig
from agent.publish.publisher import Publisher
from agent.publish.wire import SlabMessage, StatusMessage, VolumeMessage, encode
from agent.records import AcquisitionUpdate, ArrivedFile, SctSlab
from agent.vocabulary import ArrivalSource
from engines.backends.base import BackendOptions
from engines.inference.engine import SctEngine
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, export_case
from engines.training.recipe import EVALUATION_SEED_BASE

BENCH_SEED = EVALUATION_SEED_BASE + 901
START_TIMEOUT_S = 400.0
SERIES_TIMEOUT_S = 300.0
PUBLISH_MESSAGES = 40
TARGETS = {
    "completion_s": 0.1,
    "first_verdict_s": 0.5,
    "last_slab_ratio": 1.3,
    "ingest_ratio_header_only": 0.9,
    "publish_ratio": 0.8,
}


@dataclass
class _Subscriber:
    endpoint: str
    snapshot: str
    messages: list[tuple[float, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        with SctClient(self.endpoint, snapshot_endpoint=self.snapshot) as client:
            while not self.stop.is_set():
                message = client.receive(0.05)
                if message is not None and not isinstance(
                    message, VolumeMessage | SlabMessage | StatusMessage
                ):
                    continue
                if message is not None:
                    with self.lock:
                        self.messages.append((time.time(), message))

    def of(self, acquisition_id: str | None = None) -> list[tuple[float, Any]]:
        with self.lock:
            return [
                (t, m)
                for t, m in self.messages
                if acquisition_id is None or m.acquisition_id == acquisition_id
            ]


def _new_volume(subscriber: _Subscriber, known: set[str | None]) -> tuple[float, VolumeMessage]:
    """The first volume of an acquisition not in ``known`` and when it arrived, waiting up to SERIES_TIMEOUT_S."""

    def arrived() -> list[tuple[float, VolumeMessage]]:
        return [
            (t, m)
            for t, m in subscriber.of()
            if isinstance(m, VolumeMessage) and m.acquisition_id not in known
        ]

    _wait(lambda: bool(arrived()), SERIES_TIMEOUT_S)
    return arrived()[0]


def _wait(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no result within {timeout_s} s")


def end_to_end(
    case: PhantomCase, work: Path, runs: int, rate: float, backend: str, engine_cache: Path
) -> dict[str, Any]:
    config = write_loopback_config(work, backend=backend, engine_cache=engine_cache)
    agent = AgentProcess(config.path, work / "agent.log")
    subscriber = _Subscriber(config.endpoint, config.snapshot)
    thread = threading.Thread(target=subscriber.run, name="bench-subscriber")
    rows: list[dict[str, float]] = []
    try:
        agent.wait_ready(START_TIMEOUT_S)
        thread.start()
        time.sleep(1.0)
        for run in range(runs):
            known = {m.acquisition_id for _, m in subscriber.of()}
            summary = export_case(
                case, ExportOptions(out_dir=work / "export" / f"run-{run}", rate_files_per_s=rate)
            )
            mtimes = [p.stat().st_mtime for p in summary.paths]
            first_file, last_file = min(mtimes), max(mtimes)

            volume_at, volume = _new_volume(subscriber, known)
            mine = subscriber.of(volume.acquisition_id)
            verdicts = [(t, m) for t, m in mine if isinstance(m, StatusMessage) and m.kind == "verdict"]
            final = next(m for _, m in verdicts if m.body["final"])
            last_slab_at = max(t for t, m in mine if isinstance(m, SlabMessage))
            inference = [
                float(m.body["inference_s"])
                for _, m in mine
                if isinstance(m, StatusMessage) and m.kind == "progress"
            ]
            rows.append(
                {
                    "completion_s": final.at - last_file,
                    "first_verdict_s": verdicts[0][0] - first_file,
                    "last_slab_s": last_slab_at - last_file,
                    "volume_s": volume_at - last_file,
                    "export_s": last_file - first_file,
                    "slab_inference_in_agent_s": statistics.median(inference),
                }
            )
            print(f"  run {run + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()), flush=True)
            time.sleep(2.0)
        peak_rss = agent.peak_rss_bytes()
    finally:
        subscriber.stop.set()
        if thread.is_alive():
            thread.join(10)
        status = agent.stop(120)
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"runs": rows, "median": medians, "agent_peak_rss_gb": peak_rss / 1e9, "agent_exit_status": status}


def one_slab_alone(case_files: list[Path], backend: str, cache_dir: Path, repeats: int = 3) -> float:
    """Read the last slab's files and infer it, as the agent must after the last file: median seconds."""
    parsed = [read_header(p) for p in case_files]
    engine = SctEngine.load(backend=backend, options=BackendOptions(threads=None, cache_dir=cache_dir))
    try:
        echo_times = sorted({f.frames[0].echo_time_ms for f in parsed})
        normal = np.cross(parsed[0].header.image_orientation[:3], parsed[0].header.image_orientation[3:])
        positions = sorted({round(float(np.dot(f.frames[0].position, normal)), 3) for f in parsed})
        n = len(positions)
        plan = engine.plan(n)
        window = plan.windows[-1]
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            volume = engine.new_volume(len(echo_times), (n, parsed[0].header.rows, parsed[0].header.columns))
            leading = np.zeros(
                (len(echo_times), engine.manifest.normalisation.leading_slices, *volume.in_plane), np.uint16
            )
            for f in parsed:
                k = positions.index(round(float(np.dot(f.frames[0].position, normal)), 3))
                if k in window.needed_slices or k < leading.shape[1]:
                    image = read_pixels(f.path, [None])[0]
                    volume.put(echo_times.index(f.frames[0].echo_time_ms), k, image)
                    if k < leading.shape[1]:
                        leading[echo_times.index(f.frames[0].echo_time_ms), k] = image
            engine.run_slab(volume, plan, window, engine.scale(leading))
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        engine.close()


def ingest(files: list[Path], repeats: int = 5) -> dict[str, float]:
    def rate(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return len(files) / statistics.median(times)

    def agent_ingest(batch: int) -> None:
        """What the assembler stage does: parse, group, and emit one update per batch of queued files (one file
        per batch when files trickle in, up to 256 when a burst is waiting, as at start-up)."""
        updates: list[AcquisitionUpdate] = []
        assembler = Assembler(updates.append, quiet_period_s=60.0)
        for index, path in enumerate(files):
            stat = path.stat()
            assembler.add_file(
                ArrivedFile(path, stat.st_size, stat.st_mtime_ns, time.time(), ArrivalSource.EVENT)
            )
            if (index + 1) % batch == 0:
                assembler.flush()
        assembler.flush()

    bare_full = rate(lambda: [pydicom.dcmread(p) for p in files])
    bare_header = rate(lambda: [pydicom.dcmread(p, stop_before_pixels=True) for p in files])
    trickle = rate(lambda: agent_ingest(1))
    burst = rate(lambda: agent_ingest(256))
    return {
        "agent_files_per_s": trickle,
        "agent_burst_files_per_s": burst,
        "bare_dcmread_files_per_s": bare_full,
        "bare_header_only_files_per_s": bare_header,
        "ingest_ratio_full": trickle / bare_full,
        "ingest_ratio_header_only": trickle / bare_header,
        "ingest_burst_ratio_header_only": burst / bare_header,
    }


def _sub_process(endpoint: str, count: int, conn: Any) -> None:
    """Receive ``count`` messages on topic sct.slab; report seconds from the first to the last."""
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"sct.slab")
    socket.connect(endpoint)
    conn.send("ready")
    first = 0.0
    nbytes = 0
    for i in range(count):
        frames = socket.recv_multipart(copy=False)
        if i == 0:
            first = time.perf_counter()
        nbytes += sum(len(f.buffer) for f in frames)
    conn.send((time.perf_counter() - first, nbytes))
    socket.close(0)
    context.term()


def _measure(endpoint: str, send: Any, count: int) -> float:
    parent, child = mp.Pipe()
    process = mp.get_context("spawn").Process(target=_sub_process, args=(endpoint, count, child))
    process.start()
    assert parent.recv() == "ready"
    time.sleep(0.5)
    send()
    elapsed, nbytes = parent.recv()
    process.join(30)
    # The first message starts the clock, so count - 1 messages' bytes cross in ``elapsed``.
    return float(nbytes * (count - 1) / count / elapsed)


def publish(case: PhantomCase, count: int = PUBLISH_MESSAGES) -> dict[str, float]:
    hu = np.clip(case.ct_hu[:56], -1024, 3071).astype(np.int16)
    slab = SctSlab(
        acquisition_id="bench", protocol_id="bench", model_id="m", model_version="1", geometry=case.geometry,
        slab_index=0, slab_count=2, start=0, size=56, hu=hu, sha256="0" * 64, inference_s=0.0,
        inputs_complete_at=0.0, produced_at=0.0,
    )  # fmt: skip
    frames = encode(slab, 1, "bench", time.time())
    results = {}

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")

    def bare() -> None:
        for _ in range(count):
            pub.send_multipart(frames, copy=False)

    results["bare_pyzmq_bytes_per_s"] = _measure(f"tcp://127.0.0.1:{port}", bare, count)
    pub.close(linger=1000)
    context.term()

    publisher = Publisher("tcp://127.0.0.1:0", send_hwm=count + 16, queue_depth=count + 16)
    publisher.start()
    try:

        def agent() -> None:
            for _ in range(count):
                publisher.submit(slab)

        results["agent_publisher_bytes_per_s"] = _measure(publisher.endpoint, agent, count)
    finally:
        publisher.stop(30)
    results["publish_ratio"] = results["agent_publisher_bytes_per_s"] / results["bare_pyzmq_bytes_per_s"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=40.0, help="export pace, files per second")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--engine-cache",
        type=Path,
        help="engine cache folder to share (default: a fresh one under the work folder)",
    )
    args = parser.parse_args()

    print(f"simulating phantom seed {BENCH_SEED} (2 x 100 x 338 x 338) ...", flush=True)
    case = generate_case(BENCH_SEED, SEED_PROTOCOL)
    work = Path(tempfile.mkdtemp(prefix="sct-bench-e2e-"))
    try:
        print(f"end to end: {args.runs} series at {args.rate:g} files/s, backend {args.backend}", flush=True)
        engine_cache = args.engine_cache or work / "var" / AgentConfig.ENGINE_CACHE_NAME
        e2e = end_to_end(case, work, args.runs, args.rate, args.backend, engine_cache)
        files = sorted((work / "export" / "run-0").iterdir())
        print("one slab alone (read + infer), same backend ...", flush=True)
        # The agent's own engine cache: a compiled engine it built is reused, not built again.
        slab_alone = one_slab_alone(files, args.backend, engine_cache)
        print("ingest ...", flush=True)
        ingest_figures = ingest(files)
        print("publish ...", flush=True)
        publish_figures = publish(case)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = e2e["median"]
    figures = {
        "completion_s": median["completion_s"],
        "first_verdict_s": median["first_verdict_s"],
        "last_slab_s": median["last_slab_s"],
        "one_slab_alone_s": slab_alone,
        "last_slab_ratio": median["last_slab_s"] / slab_alone,
        "volume_s": median["volume_s"],
        "export_s": median["export_s"],
        **ingest_figures,
        **publish_figures,
        "agent_peak_rss_gb": e2e["agent_peak_rss_gb"],
    }
    print()
    print("| what | median | target |")
    print("|---|---|---|")
    rows = [
        ("last file -> completion detected", f"{figures['completion_s']:.3f} s", "<= 0.1 s"),
        ("first file -> first verdict received", f"{figures['first_verdict_s']:.3f} s", "<= 0.5 s"),
        ("last file -> last slab received", f"{figures['last_slab_s']:.2f} s", ""),
        ("one slab alone (read + infer)", f"{figures['one_slab_alone_s']:.2f} s", ""),
        ("  ratio", f"{figures['last_slab_ratio']:.2f} x", "<= 1.3 x"),
        ("last file -> volume received", f"{figures['volume_s']:.2f} s", ""),
        ("export of 200 files", f"{figures['export_s']:.2f} s", f"{args.rate:g} files/s"),
        ("ingest, agent, files one by one", f"{figures['agent_files_per_s']:.0f} files/s", ""),
        ("  vs bare dcmread (header only)", f"{figures['ingest_ratio_header_only']:.2f} x", ">= 0.9 x"),
        ("ingest, agent, burst (start-up scan)", f"{figures['agent_burst_files_per_s']:.0f} files/s", ""),
        ("  vs bare dcmread (header only)", f"{figures['ingest_burst_ratio_header_only']:.2f} x", ">= 0.9 x"),
        ("  vs bare dcmread (full)", f"{figures['ingest_ratio_full']:.2f} x", ""),
        ("publish, agent", f"{figures['agent_publisher_bytes_per_s'] / 1e9:.2f} GB/s", ""),
        ("  vs bare pyzmq", f"{figures['publish_ratio']:.2f} x", ">= 0.8 x"),
        ("agent peak RSS", f"{figures['agent_peak_rss_gb']:.2f} GB", ""),
    ]
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({"figures": figures, "runs": e2e["runs"], "args": vars(args)}, indent=2, default=str)
        )
    return 0 if e2e["agent_exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
