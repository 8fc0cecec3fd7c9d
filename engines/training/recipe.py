"""Everything that determines a training run, in one frozen record that checkpoints and the manifest carry.

Two runs with the same recipe and the same torch build produce the same weights (up to thread scheduling of
floating-point sums); a checkpoint refuses to resume under a different recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

#: Subjects used for training are ``TRAIN_SEED_BASE + i``. Validation and evaluation seeds live in disjoint ranges
#: so that a held-out figure can never include a training subject.
TRAIN_SEED_BASE = 100_000
VALIDATION_SEED_BASE = 800_000
EVALUATION_SEED_BASE = 900_000
#: No recipe may train on more subjects than this, which keeps the ranges above disjoint.
MAX_TRAINING_CASES = VALIDATION_SEED_BASE - TRAIN_SEED_BASE


@dataclass(frozen=True, slots=True)
class TrainingRecipe:
    """Optimisation, data and augmentation settings of one run."""

    seed: int = 2026
    steps: int = 5000
    batch_size: int = 2
    #: Patch (slices, rows, columns); multiples of the network's downsampling factor.
    patch: tuple[int, int, int] = (32, 96, 96)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    #: Cosine decay ends at this fraction of the peak learning rate.
    final_lr_fraction: float = 0.02
    #: Subjects held in memory at once; one is replaced every ``replace_every`` steps by a new subject.
    pool_size: int = 6
    replace_every: int = 200
    #: Share of patches centred on bone (the tissue the product exists for); the rest are centred in the body.
    bone_fraction: float = 0.5
    #: Phantom rendering supersampling (partial volume), as the scanner simulator uses.
    supersample: int = 2
    #: Acquisition jitter around the seed protocol (half-widths of uniform ranges, or ranges).
    te1_jitter_ms: float = 0.15
    te2_jitter_ms: float = 0.2
    tr_jitter_ms: float = 0.5
    flip_angle_range_deg: tuple[float, float] = (8.0, 12.0)
    pixel_bandwidth_range_hz: tuple[float, float] = (470.0, 640.0)
    noise_scale_range: tuple[float, float] = (0.6, 1.6)
    oblique_range_deg: tuple[float, float] = (-8.0, 8.0)
    #: Common intensity scale jitter (robustness to the normalisation estimate) and per-echo jitter.
    intensity_jitter: float = 0.15
    echo_jitter: float = 0.03
    #: Probability of mirroring left-right (the slice axis of a sagittal volume).
    flip_probability: float = 0.5
    #: Batches used to re-estimate BatchNorm statistics at the end (momentum-free average).
    bn_recalibration_batches: int = 48
    checkpoint_every: int = 200
    #: bf16 autocast for training speed on AMX/AVX-512 CPUs (weights and the loss stay fp32).
    bf16_autocast: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.pool_size < 1 or self.replace_every < 1:
            raise ValueError("steps, batch_size, pool_size and replace_every must be >= 1")
        if self.case_count > MAX_TRAINING_CASES:
            raise ValueError(f"recipe needs {self.case_count} subjects; at most {MAX_TRAINING_CASES} allowed")
        if not 0.0 <= self.bone_fraction <= 1.0:
            raise ValueError(f"bone_fraction: found {self.bone_fraction}, expected 0-1")

    @property
    def case_count(self) -> int:
        """Distinct training subjects the run will generate."""
        return self.pool_size + (self.steps - 1) // self.replace_every

    @property
    def training_seeds(self) -> range:
        return range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + self.case_count)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingRecipe:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"training recipe: unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def with_changes(self, **changes: Any) -> TrainingRecipe:
        return TrainingRecipe.from_dict({**self.to_dict(), **changes})
