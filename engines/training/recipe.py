"""Everything that determines a training run, in one frozen record that checkpoints and the manifest carry.

Two runs with the same recipe and the same torch build produce the same weights (up to thread scheduling of
floating-point sums); a checkpoint refuses to resume under a different recipe. Where the run happens (device,
threads, subject workers) is not part of the recipe: it does not change the subjects or the batches, so a run
may continue on another machine.

Named recipes (:data:`RECIPES`): ``v1`` trained the first shipped model; ``v2``, the default, trains longer on
more subjects with a share of harder ones (docs/model.md, Training).
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
    """Optimisation, data and augmentation settings of one run (the defaults are recipe ``v2``)."""

    #: The named recipe this one is (or was derived from, when options changed fields); recorded, not used.
    name: str = "v2"
    seed: int = 2026
    steps: int = 36000
    batch_size: int = 2
    #: Patch (slices, rows, columns); multiples of the network's downsampling factor.
    patch: tuple[int, int, int] = (32, 96, 96)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    #: Cosine decay ends at this fraction of the peak learning rate.
    final_lr_fraction: float = 0.02
    #: Subjects held in memory at once; one is replaced every ``replace_every`` steps by a new subject.
    pool_size: int = 8
    replace_every: int = 100
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
    #: Fractions of training subjects drawn as hard cases (engines/training/hard_cases.py); the rest are the
    #: phantom's natural draw. Never pathology: implants, lesions and motion stay out of training.
    osteoporotic_fraction: float = 0.15
    scoliosis_fraction: float = 0.10
    degenerated_disc_fraction: float = 0.10
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
        hard = (self.osteoporotic_fraction, self.scoliosis_fraction, self.degenerated_disc_fraction)
        if min(hard) < 0.0 or sum(hard) > 1.0:
            raise ValueError(f"hard-case fractions: found {hard}, expected each >= 0 and a sum <= 1")

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


#: The recipe of the first shipped model (5000 steps, 6 subjects in memory, a new one every 200 steps, no hard
#: cases): kept so that run can be reproduced and compared.
RECIPE_V1 = TrainingRecipe(
    name="v1",
    steps=5000,
    pool_size=6,
    replace_every=200,
    osteoporotic_fraction=0.0,
    scoliosis_fraction=0.0,
    degenerated_disc_fraction=0.0,
)
#: Longer (the v1 loss was still falling at 5000 steps), a new subject twice as often, 35 % hard cases.
RECIPE_V2 = TrainingRecipe()
RECIPES = {"v1": RECIPE_V1, "v2": RECIPE_V2}
