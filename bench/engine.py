"""Benchmark: the sCT engine's backends on a full lumbar volume (2 x 100 x 338 x 338) on this machine's CPU.

Usage: .venv/bin/python bench/engine.py [--runs 3] [--threads 2] [--configs torch-eager/fp32,...] [--json FILE]

Each backend configuration runs in its own process (so peak RSS is its own, and compile caches do not leak
between configurations) on the same held-out phantom, with the shipped model. Reported per configuration:
warm-up (load + compile + first window), median seconds per slab and per volume over ``--runs`` volumes,
peak RSS, and the agreement of its HU volume with fp32 eager (mean and max |ΔHU|). Targets: the default
backend is no slower than the faster of eager PyTorch and ONNX Runtime (docs/architecture.md, Target figures)
and infers a lumbar volume in <= 5 s on 2 cores (docs/model.md, Benchmark). Compare configurations as ratios
within one run; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import BackendOptions, Precision
from engines.backends.cpu_features import native_precisions
from engines.backends.registry import resolve_auto
from engines.inference.engine import SctEngine
from engines.model.manifest import default_manifest
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.training.recipe import EVALUATION_SEED_BASE

TARGET_VOLUME_S = 5.0
BENCH_SEED = EVALUATION_SEED_BASE + 900
REFERENCE = "torch-eager/fp32"
ALL_CONFIGS = (
    REFERENCE,
    "onnxruntime/fp32",
    "torch-optimised/fp32",
    "torch-optimised/bf16",
    "torch-optimised/fp16",
)


def child(config: str, input_path: Path, out_dir: Path, runs: int, threads: int) -> dict[str, Any]:
    """Runs in a fresh process: load, warm up, time ``runs`` volumes slab by slab."""
    backend, precision = config.split("/")
    echoes = np.load(input_path)
    started = time.perf_counter()
    engine = SctEngine.load(
        backend=backend,
        options=BackendOptions(threads=threads, precision=Precision(precision), cache_dir=out_dir / "cache"),
    )
    warmup = time.perf_counter() - started
    plan = engine.plan(echoes.shape[1])
    volume_times, slab_times = [], []
    out = np.empty(echoes.shape[1:], dtype=np.float32)
    for _ in range(runs):
        t0 = time.perf_counter()
        scale = engine.scale(echoes)
        for window in plan.windows:
            t_slab = time.perf_counter()
            out[window.core_start : window.core_stop] = engine.infer_slab(echoes, plan, window, scale)
            slab_times.append(time.perf_counter() - t_slab)
        volume_times.append(time.perf_counter() - t0)
    np.save(out_dir / f"{config.replace('/', '_')}.npy", out)
    return {
        "config": config,
        "warmup_s": warmup,
        "slab_s": statistics.median(slab_times),
        "volume_s": statistics.median(volume_times),
        "volume_runs_s": volume_times,
        "slabs_per_volume": len(plan.windows),
        "window": list(engine.window_shape(echoes.shape[-2:])),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS), help="backend/precision list")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.input, args.workdir, args.runs, args.threads)
        print(json.dumps(result))
        return 0

    manifest = default_manifest()
    auto_backend, auto_precision, why = resolve_auto(manifest)
    auto = f"{auto_backend}/{auto_precision.value}"
    native = {p.value for p in native_precisions()}
    configs = [c for c in args.configs.split(",") if c.split("/")[1] in native]
    skipped = [c for c in args.configs.split(",") if c not in configs]
    if REFERENCE not in configs:
        configs.insert(0, REFERENCE)
    with tempfile.TemporaryDirectory(prefix="sct-bench-") as tmp:
        workdir = Path(tmp)
        echoes = generate_case(BENCH_SEED, SEED_PROTOCOL).echoes
        np.save(workdir / "echoes.npy", echoes)
        results = []
        for config in configs:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    config,
                    "--input",
                    str(workdir / "echoes.npy"),
                    "--workdir",
                    str(workdir),
                    "--runs",
                    str(args.runs),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                print(f"{config}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        reference = np.load(workdir / f"{REFERENCE.replace('/', '_')}.npy")
        for r in results:
            delta = np.abs(np.load(workdir / f"{r['config'].replace('/', '_')}.npy") - reference)
            r["mean_abs_hu"] = float(delta.mean())
            r["max_abs_hu"] = float(delta.max())

    shape = "x".join(map(str, echoes.shape))
    print(f"sCT engine, {manifest.label}, volume {shape}, {args.threads} threads, median of {args.runs} runs")
    print(f"default backend (auto): {auto} ({why})")
    print()
    print(
        "| backend/precision | warm-up s | s/slab | slabs | s/volume | peak RSS GB | mean abs dHU | max abs dHU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        mark = " (default)" if r["config"] == auto else ""
        print(
            f"| {r['config']}{mark} | {r['warmup_s']:.1f} | {r['slab_s']:.2f} | {r['slabs_per_volume']} | "
            f"{r['volume_s']:.2f} | {r['peak_rss_gb']:.2f} | {r['mean_abs_hu']:.3f} | {r['max_abs_hu']:.2f} |"
        )
    if skipped:
        print(f"\nnot run (precision not native on this CPU): {', '.join(skipped)}")
    by = {r["config"]: r for r in results}
    if auto in by:
        default_s = by[auto]["volume_s"]
        rivals = [by[c]["volume_s"] for c in (REFERENCE, "onnxruntime/fp32") if c in by]
        print(
            f"\ndefault: {default_s:.2f} s/volume; target <= {TARGET_VOLUME_S:.0f} s -> "
            f"{'met' if default_s <= TARGET_VOLUME_S else 'NOT met'}; "
            f"vs faster of eager/ONNX ({min(rivals):.2f} s): {min(rivals) / default_s:.2f}x faster"
        )
    if args.json:
        args.json.write_text(json.dumps({"auto": auto, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
