"""Benchmark: a full lumbar series (2 x 100 x 338 x 338, 200 files) pushed by dcmtk's storescu to the agent's
storage SCP, against dcmtk's own storescp receiving the same files.

Usage: .venv/bin/python bench/receive.py [--runs 3] [--backend torch-eager] [--json FILE]

The agent runs as its own process (``sct-agent run`` with ``[receive] listen`` set); this script plays the
scanner (storescu, one association per series) and a robot (a subscriber), and reports medians over ``--runs``
series, each a new acquisition (a fresh export of the same phantom, new UIDs):

- received-to-verdict: storescu started -> first verdict received by the subscriber;
- last-file-to-volume: storescu done (every instance confirmed) -> finished sCT volume received;
- receive throughput: files/s and MB/s from storescu's start to its end, into the agent (which writes each
  instance durably, fsync and rename, before confirming it, while its pipeline reads, judges and infers the
  series) and into ``storescp -od`` (writes without fsync, nothing else to do) in the same run, and their ratio.

Both dcmtk tools run with ``TCP_NODELAY=1``: dcmtk leaves Nagle's algorithm on unless told, which puts a 40 ms
delayed-ACK stall on every instance whoever receives it (a console's DICOM stack is not dcmtk's default). Runs
alternate storescp and the agent; compare the ratio, not absolute figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from e2e import SERIES_TIMEOUT_S, START_TIMEOUT_S, _new_volume, _Subscriber

from agent.ops.agent_process import AgentProcess, free_port, write_loopback_config
from agent.publish.wire import StatusMessage
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, export_case
from engines.training.recipe import EVALUATION_SEED_BASE

BENCH_SEED = EVALUATION_SEED_BASE + 902
AE_TITLE = "SCT_AGENT"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _storescu(port: int, folder: Path) -> float:
    """Send every file in ``folder`` on one association; seconds until storescu exits (all confirmed)."""
    started = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aec", AE_TITLE, "+sd", "127.0.0.1", str(port), str(folder)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=SERIES_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - started


def storescp_seconds(folder: Path, work: Path) -> float:
    """storescu of ``folder`` into a fresh ``storescp -od`` (dcmtk's own receiver); seconds."""
    port = free_port()
    target = work / "storescp"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    server = subprocess.Popen(
        ["storescp", "-aet", AE_TITLE, "-od", str(target), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # ready when it answers a C-ECHO
            echo = subprocess.run(
                ["echoscu", "-aec", AE_TITLE, "127.0.0.1", str(port)], capture_output=True, check=False
            )
            if echo.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("storescp did not start")
            time.sleep(0.05)
        seconds = _storescu(port, folder)
        if len(list(target.iterdir())) != len(list(folder.iterdir())):
            raise RuntimeError("storescp did not store every file")
        return seconds
    finally:
        server.terminate()
        server.wait(10)


def run(runs: int, backend: str, work: Path) -> dict[str, Any]:
    print(f"simulating phantom seed {BENCH_SEED} (2 x 100 x 338 x 338) ...", flush=True)
    case = generate_case(BENCH_SEED, SEED_PROTOCOL)
    port = free_port()
    receive = (
        f'\n[receive]\nlisten = "127.0.0.1:{port}"\nae_title = "{AE_TITLE}"\n'
        'allowed_calling_ae_titles = ["STORESCU"]\n'
    )
    config = write_loopback_config(work, backend=backend, extra=receive)
    (work / "export").mkdir(exist_ok=True)
    agent = AgentProcess(config.path, work / "agent.log")
    subscriber = _Subscriber(config.endpoint, config.snapshot)
    thread = threading.Thread(target=subscriber.run, name="bench-subscriber")
    rows: list[dict[str, float]] = []
    try:
        agent.wait_ready(START_TIMEOUT_S)
        thread.start()
        time.sleep(1.0)
        for index in range(runs):
            series = work / "series" / f"run-{index}"
            summary = export_case(case, ExportOptions(out_dir=series))
            files, nbytes = summary.file_count, summary.total_bytes
            reference_s = storescp_seconds(series, work)
            known = {m.acquisition_id for _, m in subscriber.of()}
            started = time.time()
            agent_s = _storescu(port, series)
            last_confirmed = started + agent_s

            volume_at, volume = _new_volume(subscriber, known)
            verdicts = [
                (t, m)
                for t, m in subscriber.of(volume.acquisition_id)
                if isinstance(m, StatusMessage) and m.kind == "verdict"
            ]
            rows.append(
                {
                    "received_to_verdict_s": verdicts[0][0] - started,
                    "last_file_to_volume_s": volume_at - last_confirmed,
                    "agent_files_per_s": files / agent_s,
                    "agent_mb_per_s": nbytes / agent_s / 1e6,
                    "storescp_files_per_s": files / reference_s,
                    "storescp_mb_per_s": nbytes / reference_s / 1e6,
                    "throughput_ratio": reference_s / agent_s,
                }
            )
            print(f"  run {index + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()), flush=True)
            shutil.rmtree(series, ignore_errors=True)
            time.sleep(2.0)
    finally:
        subscriber.stop.set()
        if thread.is_alive():
            thread.join(10)
        status = agent.stop(120)
    medians = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    return {"runs": rows, "median": medians, "files": files, "bytes": nbytes, "agent_exit_status": status}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--backend", default="torch-eager", help="the agent's engine.backend (no build: eager)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} (dcmtk) is not installed", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="sct-bench-receive-"))
    try:
        result = run(args.runs, args.backend, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = result["median"]
    print()
    print(f"{result['files']} files, {result['bytes'] / 1e6:.1f} MB per series; medians of {args.runs} runs")
    print("| what | median |")
    print("|---|---|")
    print(
        f"| received-to-verdict (storescu start -> first verdict) | {median['received_to_verdict_s']:.3f} s |"
    )
    print(f"| last-file-to-volume (all confirmed -> volume) | {median['last_file_to_volume_s']:.2f} s |")
    print(
        f"| receive, agent | {median['agent_files_per_s']:.0f} files/s, {median['agent_mb_per_s']:.1f} MB/s |"
    )
    print(
        f"| receive, storescp | {median['storescp_files_per_s']:.0f} files/s, "
        f"{median['storescp_mb_per_s']:.1f} MB/s |"
    )
    print(f"| agent / storescp | {median['throughput_ratio']:.2f} x |")
    if args.json:
        args.json.write_text(json.dumps({**result, "args": vars(args)}, indent=2, default=str))
    return 0 if result["agent_exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
