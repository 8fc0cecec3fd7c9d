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
import numpy.typing as npt
import torch

from engines.backends.base import BackendOptions, Precision
from engines.backends.cpu_features import native_precisions
from engines.backends.registry import resolve_auto
from engines.inference.engine import SctEngine, network_input, to_hu
from engines.inference.slabs import SlabPlan
from engines.model.manifest import default_manifest
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.training.recipe import EVALUATION_SEED_BASE

TARGET_VOLUME_S = 5.0
BENCH_SEED = EVALUATION_SEED_BASE + 900
REFERENCE = "torch-eager/fp32"
#: Backends that run on a GPU (not filtered by the CPU's native precisions).
GPU_BACKENDS = ("torch-cuda", "tensorrt")
#: Backends with an engine cached on disk: each is started twice, the second start measures ready time.
CACHED_BACKENDS = ("torch-aot", "torch-cuda", "tensorrt")
ALL_CONFIGS = (
    REFERENCE,
    "onnxruntime/fp32",
    "torch-optimised/fp32",
    "torch-optimised/bf16",
    "torch-optimised/fp16",
    "torch-aot/fp32",
)


def child(
    config: str, input_path: Path, out_dir: Path, runs: int, threads: int, cache_dir: Path
) -> dict[str, Any]:
    """Runs in a fresh process: load, warm up, time ``runs`` volumes slab by slab."""
    backend_name, precision = config.split("/")
    echoes = np.load(input_path)
    started = time.perf_counter()
    engine = SctEngine.load(
        backend=backend_name,
        options=BackendOptions(threads=threads, precision=Precision(precision), cache_dir=cache_dir),
    )
    warmup = time.perf_counter() - started
    plan = engine.plan(echoes.shape[1])
    rows, cols = echoes.shape[-2:]
    backend = engine.backend_for((rows, cols))
    volume_times, slab_times, host_slab_times, compute_times, upload_times = [], [], [], [], []
    out = engine.new_output(echoes.shape[1:])
    resident = torch.zeros(backend.input_shape, dtype=torch.float32, device=backend.device)
    for _ in range(runs):
        t0 = time.perf_counter()
        # The agent's path: host uint16 slices in (uploaded as they "arrive"), int16 slabs out.
        volume = engine.new_volume(echoes.shape[0], echoes.shape[1:])
        scale = engine.scale(echoes)
        for k in range(echoes.shape[1]):
            t_up = time.perf_counter()
            for e in range(echoes.shape[0]):
                volume.put(e, k, echoes[e, k])
            upload_times.append(time.perf_counter() - t_up)
        for window in plan.windows:
            t_slab = time.perf_counter()
            engine.run_slab(volume, plan, window, scale, out=out[window.core_start : window.core_stop])
            slab_times.append(time.perf_counter() - t_slab)
        volume_times.append(time.perf_counter() - t0)
        # The network alone on a window already on the device (what the engine path is compared with).
        with torch.inference_mode(), backend.stream_context():
            t_compute = time.perf_counter()
            backend.run(resident)
            backend.synchronize()
            compute_times.append(time.perf_counter() - t_compute)
        # The host path the agent used before the volume moved to the device, on the same backend.
        for k in range(len(plan.windows)):
            t_host = time.perf_counter()
            host_path_slab(engine, echoes, plan, k, scale)
            host_slab_times.append(time.perf_counter() - t_host)
    np.save(out_dir / f"{config.replace('/', '_')}.npy", out.astype(np.float32))
    slab_s, compute_s = statistics.median(slab_times), statistics.median(compute_times)
    return {
        "config": config,
        "device": str(backend.device),
        "warmup_s": warmup,
        "engine": backend.info.details.get("engine", ""),
        "slab_s": slab_s,
        "compute_s": compute_s,
        "path_over_compute": slab_s / compute_s,
        "host_path_slab_s": statistics.median(host_slab_times),
        "device_over_host_path": slab_s / statistics.median(host_slab_times),
        "upload_slice_s": statistics.median(upload_times),
        "volume_s": statistics.median(volume_times),
        "volume_runs_s": volume_times,
        "slabs_per_volume": len(plan.windows),
        "window": list(engine.window_shape((rows, cols))),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if backend.device.type == "cuda" else 0.0,
    }


def host_path_slab(
    engine: SctEngine, echoes: np.ndarray, plan: SlabPlan, k: int, scale: float
) -> npt.NDArray[np.int16]:
    """Numpy gather, pad and float32 on the host, the backend, HU and rint on the host: the path before #14."""
    window = plan.windows[k]
    rows, cols = echoes.shape[-2:]
    x = network_input(engine.manifest, echoes, plan.slice_indices(window), scale)
    raw = engine.backend_for((rows, cols)).infer(x)
    core = raw[plan.halo : plan.halo + window.core_stop - window.core_start, :rows, :cols]
    return np.rint(to_hu(engine.manifest, core)).astype(np.int16)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS), help="backend/precision list")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--cache-dir", type=Path, help="engine cache folder (default: a fresh one per run, removed after)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cache = args.cache_dir or args.workdir / "cache"
        print(json.dumps(child(args.child, args.input, args.workdir, args.runs, args.threads, cache)))
        return 0

    manifest = default_manifest()
    auto_backend, auto_precision, why = resolve_auto(manifest)
    auto = f"{auto_backend}/{auto_precision.value}"
    native = {p.value for p in native_precisions()}
    configs = [
        c for c in args.configs.split(",") if c.split("/")[0] in GPU_BACKENDS or c.split("/")[1] in native
    ]
    skipped = [c for c in args.configs.split(",") if c not in configs]
    if REFERENCE not in configs:
        configs.insert(0, REFERENCE)
    with tempfile.TemporaryDirectory(prefix="sct-bench-") as tmp:
        workdir = Path(tmp)
        echoes = generate_case(BENCH_SEED, SEED_PROTOCOL).echoes
        np.save(workdir / "echoes.npy", echoes)
        results: list[dict[str, Any]] = []
        for config in configs:
            result: dict[str, Any] | None = None
            for start in ("first", "cached") if config.split("/")[0] in CACHED_BACKENDS else ("first",):
                result = run_child(config, workdir, args, result, start)
            if result is not None:
                results.append(result)
        reference = np.load(workdir / f"{REFERENCE.replace('/', '_')}.npy")
        for r in results:
            delta = np.abs(np.load(workdir / f"{r['config'].replace('/', '_')}.npy") - reference)
            r["mean_abs_hu"] = float(delta.mean())
            r["max_abs_hu"] = float(delta.max())
    report(args, manifest, echoes.shape, auto, why, results, skipped)
    return 0


def run_child(
    config: str, workdir: Path, args: argparse.Namespace, first: dict[str, Any] | None, start: str
) -> dict[str, Any] | None:
    """One configuration in a fresh process; a second start of a cached engine records its ready time."""
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
            *(["--cache-dir", str(args.cache_dir)] if args.cache_dir else []),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        print(f"{config} ({start} start): failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return first
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if first is None:
        return result
    first["ready_cached_s"] = result["warmup_s"]
    first["engine_second_start"] = result["engine"]
    return first


def report(
    args: argparse.Namespace,
    manifest: Any,
    shape_tuple: tuple[int, ...],
    auto: str,
    why: str,
    results: list[dict[str, Any]],
    skipped: list[str],
) -> None:
    shape = "x".join(map(str, shape_tuple))
    print(f"sCT engine, {manifest.label}, volume {shape}, {args.threads} threads, median of {args.runs} runs")
    print(f"default backend (auto, CPU rule): {auto} ({why})")
    print()
    print(
        "| backend/precision | device | warm-up s | ready, cached engine s | s/slab | compute s | path/compute "
        "| device/host path | slabs | s/volume | peak RSS GB | mean abs dHU | max abs dHU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mark = " (default)" if r["config"] == auto else ""
        cached = f"{r['ready_cached_s']:.1f}" if "ready_cached_s" in r else "-"
        print(
            f"| {r['config']}{mark} | {r['device']} | {r['warmup_s']:.1f} | {cached} | {r['slab_s']:.4f} | "
            f"{r['compute_s']:.4f} | {r['path_over_compute']:.2f} | {r['device_over_host_path']:.2f} | "
            f"{r['slabs_per_volume']} | {r['volume_s']:.2f} | {r['peak_rss_gb']:.2f} | {r['mean_abs_hu']:.3f} | "
            f"{r['max_abs_hu']:.2f} |"
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


if __name__ == "__main__":
    raise SystemExit(main())
