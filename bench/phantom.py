"""Benchmark: seconds to generate one full phantom case at the seed protocol (target <= 15 s on 2 cores).

Usage: .venv/bin/python bench/phantom.py [--runs 3] [--seed 7]
Prints the median and every run, with the split between rendering (anatomy + partial volume) and physics.
"""

from __future__ import annotations

import argparse
import statistics
import time

from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import DEFAULT_SUPERSAMPLE, generate_case

TARGET_SECONDS = 15.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    generate_case(args.seed, SEED_PROTOCOL.with_changes(fov_mm=(60.0, 60.0, 9.0)))  # warm imports and caches
    times = []
    for run in range(args.runs):
        started = time.perf_counter()
        case = generate_case(args.seed + run, SEED_PROTOCOL)
        times.append(time.perf_counter() - started)
    shape = "x".join(map(str, case.echoes.shape))
    median = statistics.median(times)
    print(f"phantom, seed protocol ({shape} MR + CT, supersample {DEFAULT_SUPERSAMPLE}):")
    print(
        f"  median {median:.2f} s over {args.runs} runs ({', '.join(f'{t:.2f}' for t in times)}); "
        f"target <= {TARGET_SECONDS:.0f} s -> {'met' if median <= TARGET_SECONDS else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
