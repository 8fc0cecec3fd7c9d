"""The training loop: resumable from atomic checkpoints, deterministic batches, BatchNorm recalibration at the end.

Output folder layout (``train`` writes, ``package`` reads):

- ``checkpoint.pt``: model, optimiser and scheduler state, step, loss history and the recipe; replaced atomically.
- ``weights.pt``: the final fp32 state dict (written once training and BatchNorm recalibration are done).
- ``training.json``: recipe, architecture, normalisation, seeds, hard-case counts, wall time, the devices the
  run's sessions used, and the loss curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from engines.model.normalisation import Normalisation
from engines.model.unet import LightUNet3d, UNetConfig
from engines.training.cases import CasePool
from engines.training.device import bf16_autocast, training_device
from engines.training.hard_cases import HardCase, hard_case_kind
from engines.training.patches import sample_batch
from engines.training.prefetch import SubjectPrefetcher
from engines.training.progress import Progress
from engines.training.recipe import TrainingRecipe
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "weights.pt"
RECORD_NAME = "training.json"
#: Steps per loss-history entry (mean L1 over the interval, in HU).
LOSS_LOG_EVERY = 50
_CPU = torch.device("cpu")


class RecipeMismatchError(SctError, RuntimeError):
    """A checkpoint exists in the output folder but was made with another recipe."""

    def __init__(
        self, message: str, *, attribute: str = "training recipe", found: object = None, expected: str = ""
    ) -> None:
        super().__init__(message, attribute=attribute, found=found, expected=expected)


class TrainingDivergedError(SctError, RuntimeError):
    """The training loss became NaN or infinite: continuing would only spend hours on a broken model."""


def _lr_factor(recipe: TrainingRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    span = max(recipe.steps - recipe.warmup_steps, 1)
    progress = min((step - recipe.warmup_steps) / span, 1.0)
    floor = recipe.final_lr_fraction
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def train(
    out_dir: Path,
    recipe: TrainingRecipe = TrainingRecipe(),
    *,
    architecture: UNetConfig = UNetConfig(),
    normalisation: Normalisation = Normalisation(),
    threads: int | None = None,
    progress_stream: TextIO | None = None,
    stop_after: int | None = None,
    device: torch.device | str = "cpu",
    workers: int = 0,
) -> Path | None:
    """Train (or resume) in ``out_dir``; returns the final weights, or None when ``stop_after`` ended the run.

    ``stop_after`` checkpoints and returns once that many steps are done in total, so a long run can be split
    across sessions (and tests can prove that an interrupted run resumes to the same weights). ``device`` is
    ``cpu`` or ``cuda[:i]``; a checkpoint holds CPU tensors, so a run may continue on another device. ``workers``
    > 0 generates subjects in that many worker processes ahead of need (the subjects are the same).
    """
    device = training_device(device) if isinstance(device, str) else device
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        # Fixed patch shapes: let cuDNN pick the fastest convolution once (bit-identity is a CPU fp32 promise).
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(recipe.seed)
    model = LightUNet3d(architecture).to(device=device, memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _lr_factor(recipe, s))
    step, history, wall_s = 0, [], 0.0
    sessions: list[dict[str, Any]] = []
    ckpt_path = out_dir / CHECKPOINT_NAME
    if ckpt_path.exists():
        # map_location: a checkpoint written on a GPU resumes on a CPU-only machine and vice versa; the
        # optimiser moves its state to the parameters' device when it loads.
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["recipe"] != recipe.to_dict():
            raise RecipeMismatchError(
                f"{ckpt_path} was made with another recipe; use a new output folder or the same recipe "
                f"(differences: {_diff(state['recipe'], recipe.to_dict())})"
            )
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        step, history, wall_s = state["step"], state["history"], state["wall_s"]
        sessions = list(state.get("sessions", []))
        logger.info("resuming from step %d of %d on %s", step, recipe.steps, device)

    weights_path = out_dir / WEIGHTS_NAME
    if step >= recipe.steps and weights_path.exists():
        return weights_path
    autocast, precision = bf16_autocast(recipe.bf16_autocast, device)
    if recipe.bf16_autocast and not autocast:
        logger.warning("training on %s in %s", device, precision)
    session = {
        "device": _device_name(device),
        "precision": precision,
        "workers": workers,
        "from_step": step,
        "to_step": step,
    }
    sessions.append(session)
    with contextlib.ExitStack() as stack:
        source = (
            stack.enter_context(SubjectPrefetcher(recipe, normalisation, workers)) if workers > 0 else None
        )
        pool = CasePool(recipe, normalisation, source)
        progress = Progress(recipe.steps, start=step, stream=progress_stream, label="train ")
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        loss_n = 0
        t_start = time.monotonic() - wall_s
        while step < recipe.steps:
            cases = pool.at_step(step)
            loss = train_step(model, optimiser, *sample_batch(recipe, cases, step), device, autocast=autocast)
            scheduler.step()
            step += 1
            loss_sum += loss.detach()
            loss_n += 1
            if step % LOSS_LOG_EVERY == 0 or step == recipe.steps:
                mean_hu = float(loss_sum) * 1000.0 / loss_n
                if not math.isfinite(mean_hu):
                    raise TrainingDivergedError(
                        f"training loss is {mean_hu} at step {step}; the last checkpoint is step "
                        f"{step - step % recipe.checkpoint_every} (lower the learning rate in a new folder)",
                        attribute="training loss",
                        found=mean_hu,
                        expected="a finite L1",
                    )
                history.append([step, mean_hu])
                loss_sum.zero_()
                loss_n = 0
            progress.update(step, l1_hu=history[-1][1] if history else float("nan"))
            stopping = stop_after is not None and step >= stop_after and step < recipe.steps
            if step % recipe.checkpoint_every == 0 or step == recipe.steps or stopping:
                wall_s = time.monotonic() - t_start
                session["to_step"] = step
                _save_atomic(
                    {
                        "recipe": recipe.to_dict(),
                        "model": _cpu(model.state_dict()),
                        "optimiser": _cpu(optimiser.state_dict()),
                        "scheduler": scheduler.state_dict(),
                        "step": step,
                        "history": history,
                        "wall_s": wall_s,
                        "sessions": sessions,
                    },
                    ckpt_path,
                )
            if stopping:
                logger.info("stopped at step %d of %d; run again to resume", step, recipe.steps)
                return None
        recalibrate_batchnorm(model, recipe, pool, device)
    wall_s = time.monotonic() - t_start
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save_atomic(state_dict, weights_path)
    record = {
        "recipe": recipe.to_dict(),
        "architecture": {**asdict(architecture), "channels": list(architecture.channels)},
        "normalisation": normalisation.to_dict(),
        "training_seeds": [recipe.training_seeds.start, recipe.training_seeds.stop - 1],
        "hard_cases": hard_case_counts(recipe),
        "steps": step,
        "wall_s": round(wall_s, 1),
        "threads": torch.get_num_threads(),
        "device": _device_name(device),
        "sessions": sessions,
        "torch": torch.__version__,
        "loss_history_l1_hu": [[s, round(v, 2)] for s, v in history],
    }
    (out_dir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return weights_path


def train_step(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    x_np: npt.NDArray[np.float32],
    y_np: npt.NDArray[np.float32],
    device: torch.device,
    *,
    autocast: bool,
) -> torch.Tensor:
    """One optimiser step on a host batch; returns the L1 loss on ``device`` (not synchronised, so a GPU keeps
    working while the host samples the next batch). ``bench/train_gpu.py`` times this same step."""
    x, y = _to_device(x_np, device), _to_device(y_np, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        pred = model(x.to(memory_format=torch.channels_last_3d))
    loss = nn.functional.l1_loss(pred.float(), y)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimiser.step()
    return loss


def hard_case_counts(recipe: TrainingRecipe) -> dict[str, int]:
    """How many of the run's training subjects are drawn as each hard-case kind (recorded in training.json)."""
    kinds = Counter(hard_case_kind(recipe, seed).value for seed in recipe.training_seeds)
    return {kind.value: kinds.get(kind.value, 0) for kind in HardCase}


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, recipe: TrainingRecipe, pool: CasePool, device: torch.device = _CPU
) -> None:
    """Replace the running BatchNorm statistics with a plain average over fresh fp32 batches.

    The exponential running average of training carries the noise of the last few small batches and statistics
    of bf16 activations; inference runs fp32 or fp16, so the statistics are re-estimated in fp32.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    cases = pool.at_step(recipe.steps - 1)
    for i in range(recipe.bn_recalibration_batches):
        x_np, _ = sample_batch(recipe, cases, recipe.steps + 1 + i)
        model(_to_device(x_np, device).to(memory_format=torch.channels_last_3d))
    for m in norms:
        m.momentum = 0.1
    model.eval()


def _to_device(array: npt.NDArray[np.float32], device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: through pinned memory and an asynchronous copy on CUDA."""
    tensor = torch.from_numpy(array)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _cpu(obj: Any) -> Any:
    """``obj`` (a state dict, nested) with every tensor on the CPU, so a checkpoint loads on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}"
    return "cpu"


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys)
