"""Training subjects: a phantom per seed, scanned with a jittered seed protocol, prepared for patch sampling.

The pool of subjects held in memory at a given step is a pure function of the recipe and the step, so a resumed
run regenerates exactly the pool it had, without storing volumes in checkpoints. Whether a subject was generated
here or ahead of need in a worker process (:mod:`engines.training.prefetch`) does not change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from engines.model.normalisation import Normalisation
from engines.phantom.acquisition import SEED_PROTOCOL, Acquisition
from engines.phantom.generate import generate_case
from engines.phantom.tissues import CORTICAL_TISSUES, TRABECULAR_TISSUES
from engines.training.hard_cases import HardCase, training_subject
from engines.training.recipe import TRAIN_SEED_BASE, TrainingRecipe

#: Voxel centres kept per subject for patch sampling (a sample, to bound memory).
_CENTRES_KEPT = 200_000
#: Rendering threads of a subject generated in the training process (worker processes render with one each:
#: the processes are their parallelism).
RENDER_THREADS = 2


def training_acquisition(recipe: TrainingRecipe, subject_seed: int) -> Acquisition:
    """The seed protocol with this subject's acquisition jitter (deterministic per subject)."""
    rng = np.random.default_rng([recipe.seed, subject_seed, 0xAC0])
    te1, te2 = SEED_PROTOCOL.echo_times_ms
    return SEED_PROTOCOL.with_changes(
        echo_times_ms=(
            round(te1 + rng.uniform(-recipe.te1_jitter_ms, recipe.te1_jitter_ms), 3),
            round(te2 + rng.uniform(-recipe.te2_jitter_ms, recipe.te2_jitter_ms), 3),
        ),
        repetition_time_ms=round(
            SEED_PROTOCOL.repetition_time_ms + rng.uniform(-recipe.tr_jitter_ms, recipe.tr_jitter_ms), 3
        ),
        flip_angle_deg=round(float(rng.uniform(*recipe.flip_angle_range_deg)), 2),
        pixel_bandwidth_hz=round(float(rng.uniform(*recipe.pixel_bandwidth_range_hz)), 1),
        noise_scale=round(float(rng.uniform(*recipe.noise_scale_range)), 3),
        oblique_deg=round(float(rng.uniform(*recipe.oblique_range_deg)), 2),
    )


@dataclass(frozen=True, slots=True, eq=False)
class PreparedCase:
    """One subject ready for patch sampling: raw echoes with their scale, HU target and candidate centres."""

    seed: int
    echoes: npt.NDArray[np.uint16]
    scale: float
    ct_hu: npt.NDArray[np.int16]
    bone_centres: npt.NDArray[np.int64]
    body_centres: npt.NDArray[np.int64]
    #: The hard-case kind this subject was drawn as (``HardCase`` value).
    hard_case: str = HardCase.NORMAL.value


def prepare_case(
    recipe: TrainingRecipe,
    subject_seed: int,
    normalisation: Normalisation,
    *,
    render_threads: int = RENDER_THREADS,
) -> PreparedCase:
    """Generate and prepare one training subject (deterministic: ``render_threads`` does not change it)."""
    subject, kind = training_subject(recipe, subject_seed)
    case = generate_case(
        subject_seed,
        training_acquisition(recipe, subject_seed),
        supersample=recipe.supersample,
        workers=render_threads,
        subject=subject,
    )
    rng = np.random.default_rng([recipe.seed, subject_seed, 0xCE7])
    bone_labels = np.array(sorted(int(t) for t in CORTICAL_TISSUES | TRABECULAR_TISSUES), dtype=np.uint8)
    bone = np.flatnonzero(np.isin(case.labels, bone_labels))
    body = np.flatnonzero(case.body_mask)
    return PreparedCase(
        seed=subject_seed,
        echoes=case.echoes,
        scale=normalisation.scale(case.echoes),
        ct_hu=case.ct_hu,
        bone_centres=_subsample(rng, bone),
        body_centres=_subsample(rng, body),
        hard_case=kind.value,
    )


def _subsample(rng: np.random.Generator, indices: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    if indices.size <= _CENTRES_KEPT:
        return indices
    return np.sort(rng.choice(indices, _CENTRES_KEPT, replace=False))


def pool_seeds(recipe: TrainingRecipe, step: int) -> list[int]:
    """Subject seeds in memory at ``step`` (0-based): a sliding window over the training seeds."""
    newest = recipe.pool_size - 1 + step // recipe.replace_every
    return [TRAIN_SEED_BASE + i for i in range(newest - recipe.pool_size + 1, newest + 1)]


def upcoming_seeds(recipe: TrainingRecipe, step: int, count: int) -> list[int]:
    """The next ``count`` subject seeds the run will need after the pool at ``step`` (none past its last)."""
    after = pool_seeds(recipe, step)[-1] + 1
    return list(range(after, min(after + count, recipe.training_seeds.stop)))


class SubjectSource(Protocol):
    """Where the pool gets subjects it has not generated itself (a prefetcher of worker processes)."""

    def request(self, seeds: list[int]) -> None:
        """Start preparing these subjects (those already requested are not prepared again)."""

    def take(self, seed: int) -> PreparedCase:
        """The prepared subject ``seed``, waiting for it if it is not ready."""

    @property
    def lookahead(self) -> int:
        """How many subjects beyond the current pool to keep in preparation."""


class CasePool:
    """Keeps the prepared subjects of the current window, generating newcomers and dropping leavers.

    With a ``source`` (a prefetcher), subjects come from there and the next ones are requested ahead of need,
    so their generation overlaps training; without one they are generated here when first needed.
    """

    def __init__(
        self, recipe: TrainingRecipe, normalisation: Normalisation, source: SubjectSource | None = None
    ) -> None:
        self._recipe = recipe
        self._normalisation = normalisation
        self._source = source
        self._cases: dict[int, PreparedCase] = {}

    def at_step(self, step: int) -> list[PreparedCase]:
        wanted = pool_seeds(self._recipe, step)
        for seed in list(self._cases):
            if seed not in wanted:
                del self._cases[seed]
        if self._source is not None:
            self._source.request(
                [s for s in wanted if s not in self._cases]
                + upcoming_seeds(self._recipe, step, self._source.lookahead)
            )
        for seed in wanted:
            if seed not in self._cases:
                self._cases[seed] = (
                    self._source.take(seed)
                    if self._source is not None
                    else prepare_case(self._recipe, seed, self._normalisation)
                )
        return [self._cases[s] for s in wanted]
