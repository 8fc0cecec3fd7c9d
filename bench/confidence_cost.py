"""Benchmark: what the per-voxel confidence costs the engine on the CPU (issue #17's target: <= 1.5 x today's time).

Usage: .venv/bin/python bench/confidence_cost.py [--runs 5] [--threads 2] [--backend torch-aot] [--json FILE]

The shipped model runs twice on the same held-out lumbar volume (2 x 100 x 338 x 338) through the agent's path
(bench/engine.py's method: slices into the engine's volume, ``run_slab`` for every slab of the plan, the volume
time is the sum): once as shipped (HU and confidence in one pass, ``confidence_out`` given), once as the same
weights without a confidence section (today's engine). The two engines alternate volume by volume, so the
machine's load (shared and noisy) falls on both alike; the figure is the ratio of their medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import BackendOptions
from engines.backends.registry import AUTO, resolve_auto
from engines.inference.engine import SctEngine
from engines.model.manifest import DEFAULT_MODEL_DIR, MANIFEST_NAME, ModelManifest, default_manifest
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.training.recipe import EVALUATION_SEED_BASE

BENCH_SEED = EVALUATION_SEED_BASE + 900
TARGET_RATIO = 1.5


def without_confidence(folder: Path) -> ModelManifest:
    """The shipped weights in ``folder`` with the confidence section removed: today's engine."""
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data.pop("confidence", None)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return ModelManifest.load(folder)


def volume_seconds(engine: SctEngine, echoes: np.ndarray) -> float:
    """One volume through the agent's path: upload every slice, then every slab (with its confidence)."""
    started = time.perf_counter()
    volume = engine.new_volume(echoes.shape[0], echoes.shape[1:])
    for k in range(echoes.shape[1]):
        for e in range(echoes.shape[0]):
            volume.put(e, k, echoes[e, k])
    plan = engine.plan(echoes.shape[1])
    scale = engine.scale(echoes)
    out = engine.new_output(echoes.shape[1:])
    confidence = engine.new_confidence_output(echoes.shape[1:]) if engine.confidence is not None else None
    for window in plan.windows:
        core = slice(window.core_start, window.core_stop)
        engine.run_slab(
            volume,
            plan,
            window,
            scale,
            out[core],
            confidence_out=None if confidence is None else confidence[core],
        )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default=AUTO, help="backend name (default: the auto choice on this CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    shipped = default_manifest()
    if shipped.confidence is None:
        print("the shipped model has no confidence section: nothing to compare", file=sys.stderr)
        return 1
    backend = args.backend
    if backend == AUTO:
        name, _precision, _ = resolve_auto(shipped)
        backend = name
    echoes = generate_case(BENCH_SEED, SEED_PROTOCOL).echoes
    with tempfile.TemporaryDirectory(prefix="sct-bench-confidence-") as tmp:
        plain = without_confidence(Path(tmp) / "model")
        options = BackendOptions(threads=args.threads, cache_dir=Path(tmp) / "cache")
        engines = {
            "today (HU only)": SctEngine.load(plain, backend=backend, options=options),
            "with confidence": SctEngine.load(shipped, backend=backend, options=options),
        }
        times: dict[str, list[float]] = {name: [] for name in engines}
        for engine in engines.values():
            volume_seconds(engine, echoes)  # a first volume each, outside the figures
        for _ in range(args.runs):
            for name, engine in engines.items():
                times[name].append(volume_seconds(engine, echoes))
        info = engines["with confidence"].info
        for engine in engines.values():
            engine.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["with confidence"] / medians["today (HU only)"]
    result: dict[str, Any] = {
        "backend": f"{info.backend} {info.precision}",
        "threads": args.threads,
        "runs": args.runs,
        "volume_s": medians,
        "runs_s": times,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
    }
    print(
        f"{shipped.label}, lumbar volume 2x100x338x338, {info.backend} {info.precision}, {args.threads} threads"
    )
    print(f"| engine | s/volume (median of {args.runs}) | runs |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(
        f"\nconfidence costs {ratio:.3f} x today's time; target <= {TARGET_RATIO} x -> {'met' if ratio <= TARGET_RATIO else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
