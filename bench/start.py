"""Benchmark: how long the agent takes from its process start to ready, with and without a cached engine.

Usage: .venv/bin/python bench/start.py [--runs 3] [--backends auto,torch-optimised] [--engine-cache DIR]
       [--json FILE]

For each backend the agent is started as systemd starts it (``sct-agent run --config FILE``, its own process)
with an engine cache folder shared by its starts: the first start may build and accept the engine (reported
apart), the next ``--runs`` starts find it cached. Each start is timed from the process's spawn to the line the
agent prints once it is ready (the line systemd's READY=1 accompanies), so the figure includes Python's and
torch's imports, the configuration and journal, the engine (and, for ``torch-aot``, its worker process), the
publisher and the watcher. Target (docs/architecture.md): ready with a cached engine in <= 10 s. Medians; the
machine is shared, so compare backends within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.ops.agent_process import AgentProcess, write_loopback_config

#: A first start may compile and accept the engine: minutes on 2 cores.
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


def start_once(folder: Path, backend: str, engine_cache: Path) -> tuple[float, str]:
    """Seconds from spawn to ready, and the engine line of the agent's log."""
    for name in ("export", "var"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    config = write_loopback_config(folder, backend=backend, engine_cache=engine_cache)
    log = folder / "agent.log"
    started = time.perf_counter()
    process = AgentProcess(config.path, log)
    try:
        process.wait_ready(START_TIMEOUT_S)
        ready_s = time.perf_counter() - started
    finally:
        process.stop(STOP_TIMEOUT_S)
    # "engine <model> <version> on torch-aot fp32, window 2x88x344x344, warm-up 4.4 s"
    line = next((line for line in log.read_text().splitlines() if " on " in line and "warm-up" in line), "")
    return ready_s, line.split(" on ", 1)[-1].split(", window", 1)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="auto,torch-optimised")
    parser.add_argument(
        "--engine-cache", type=Path, default=None, help="shared engine cache (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sct-bench-start-") as tmp:
        cache = args.engine_cache or Path(tmp) / "engine-cache"
        for backend in args.backends.split(","):
            folder = Path(tmp) / backend
            first_s, engine = start_once(folder, backend, cache)
            print(f"{backend}: first start ready in {first_s:.1f} s ({engine})", flush=True)
            times = []
            for run in range(args.runs):
                ready_s, engine = start_once(folder, backend, cache)
                times.append(ready_s)
                print(f"{backend}: start {run + 1} ready in {ready_s:.1f} s ({engine})", flush=True)
            results.append(
                {
                    "backend": backend,
                    "engine": engine,
                    "first_start_s": round(first_s, 2),
                    "ready_s": [round(t, 2) for t in times],
                    "median_ready_s": round(statistics.median(times), 2),
                }
            )
    print("\n| backend | engine | first start s | ready s (median of later starts) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['engine']} | {r['first_start_s']:.1f} | {r['median_ready_s']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
