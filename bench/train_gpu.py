# ruff: noqa: PLC0415 - heavy imports inside main(), see the last paragraph of the docstring
"""Benchmark: training throughput on a device (a lent GPU above all): optimiser steps/s and subjects/min.

Usage: python bench/train_gpu.py [--device cuda] [--workers 14] [--steps 500] [--json FILE]

Two figures decide how long a recipe takes on a machine, and which one bounds it:

1. subjects: ``--workers`` worker processes (:class:`SubjectPrefetcher`, as ``train --workers``) prepare that
   many training subjects of the v2 recipe at once; reported as subjects per minute;
2. steps: the trainer's own ``train_step`` (bf16 autocast where native, pinned host batches) on an in-memory
   pool of those subjects, after a warm-up, synchronised at the end; reported as steps per second.

It then prints the v2 recipe's time on this machine: the larger of its steps at that rate and its subjects at
that rate (the prefetcher overlaps the two). ``bench/gpu.sh training`` runs it on the lent GPU. With
``--device cpu`` it runs here too (use few steps: the CPU is shared).

Heavy modules are imported inside ``main``: worker processes import this script before their initializer runs,
and numpy loaded at that point would keep its BLAS threads (engines/training/worker_threads.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: Optimiser steps before timing (cuDNN autotuning, allocator warm-up, the first bf16 kernels).
WARMUP_STEPS = 20


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 2, 1))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from engines.model.normalisation import Normalisation
    from engines.model.unet import LightUNet3d, UNetConfig
    from engines.training.cases import PreparedCase
    from engines.training.device import bf16_autocast, training_device
    from engines.training.patches import sample_batch
    from engines.training.prefetch import SubjectPrefetcher
    from engines.training.recipe import RECIPE_V2, TRAIN_SEED_BASE
    from engines.training.trainer import train_step

    device = training_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = RECIPE_V2
    seeds = [TRAIN_SEED_BASE + i for i in range(args.workers)]
    started = time.perf_counter()
    with SubjectPrefetcher(recipe, Normalisation(), args.workers) as prefetcher:
        prefetcher.request(seeds)
        cases: list[PreparedCase] = [prefetcher.take(s) for s in seeds]
    subjects_s = time.perf_counter() - started
    subjects_per_min = 60.0 * len(seeds) / subjects_s
    print(
        f"{len(seeds)} subjects in {subjects_s:.1f} s with {args.workers} workers: {subjects_per_min:.1f}/min"
    )

    torch.manual_seed(recipe.seed)
    model = LightUNet3d(UNetConfig()).to(device=device, memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    model.train()
    autocast, precision = bf16_autocast(recipe.bf16_autocast, device)

    def run(first: int, count: int) -> float:
        loss = torch.zeros((), device=device)
        for step in range(first, first + count):
            loss = train_step(model, optimiser, *sample_batch(recipe, cases, step), device, autocast=autocast)
        return float(loss)  # synchronises

    run(0, WARMUP_STEPS)
    started = time.perf_counter()
    last_loss = run(WARMUP_STEPS, args.steps)
    steps_s = time.perf_counter() - started
    steps_per_s = args.steps / steps_s
    print(
        f"{args.steps} steps in {steps_s:.1f} s on {device}, {precision}: {steps_per_s:.2f} steps/s "
        f"(last L1 {last_loss:.4f})"
    )

    training_min = recipe.steps / steps_per_s / 60.0
    generation_min = recipe.case_count / subjects_per_min
    print(
        f"recipe v2 here: {recipe.steps} steps {training_min:.1f} min, {recipe.case_count} subjects "
        f"{generation_min:.1f} min with {args.workers} workers: about {max(training_min, generation_min):.1f} min "
        f"({'subject generation' if generation_min > training_min else 'the optimiser'} bounds it)"
    )
    result: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "workers": args.workers,
        "subjects": len(seeds),
        "subjects_per_min": round(subjects_per_min, 2),
        "steps": args.steps,
        "steps_per_s": round(steps_per_s, 2),
        "batch_size": recipe.batch_size,
        "patch": list(recipe.patch),
        "precision": precision,
        "v2_training_min": round(training_min, 1),
        "v2_generation_min": round(generation_min, 1),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
