"""Patch sampling and augmentation for one training batch, deterministic per (recipe seed, step)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engines.model.unet import HU_SCALE
from engines.training.cases import PreparedCase
from engines.training.recipe import TrainingRecipe

F32 = npt.NDArray[np.float32]


def sample_batch(recipe: TrainingRecipe, cases: list[PreparedCase], step: int) -> tuple[F32, F32]:
    """Inputs ``[B, echoes, *patch]`` (normalised) and targets ``[B, 1, *patch]`` (HU / HU_SCALE)."""
    rng = np.random.default_rng([recipe.seed, step, 0xBA7C])
    inputs, targets = [], []
    for _ in range(recipe.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        x, y = _sample_patch(recipe, case, rng)
        inputs.append(x)
        targets.append(y)
    return np.stack(inputs), np.stack(targets)


def _sample_patch(recipe: TrainingRecipe, case: PreparedCase, rng: np.random.Generator) -> tuple[F32, F32]:
    shape = case.ct_hu.shape
    centres = case.bone_centres if (rng.random() < recipe.bone_fraction and case.bone_centres.size) else None
    if centres is None:
        centres = case.body_centres
    centre = np.unravel_index(int(centres[int(rng.integers(centres.size))]), shape)
    jitter = rng.integers(-4, 5, size=3)
    corner = [
        int(np.clip(c + j - p // 2, 0, n - p))
        for c, j, p, n in zip(centre, jitter, recipe.patch, shape, strict=True)
    ]
    region = tuple(slice(c, c + p) for c, p in zip(corner, recipe.patch, strict=True))
    x = case.echoes[(slice(None), *region)].astype(np.float32) / np.float32(case.scale)
    gain = 1.0 + rng.uniform(-recipe.intensity_jitter, recipe.intensity_jitter)
    per_echo = 1.0 + rng.uniform(-recipe.echo_jitter, recipe.echo_jitter, size=(x.shape[0], 1, 1, 1))
    x *= (gain * per_echo).astype(np.float32)
    y = (case.ct_hu[region].astype(np.float32) / np.float32(HU_SCALE))[None]
    if rng.random() < recipe.flip_probability:
        x = x[:, ::-1]
        y = y[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)
