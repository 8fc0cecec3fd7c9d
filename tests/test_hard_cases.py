"""Hard training cases: drawn in the recipe's fractions, deterministic, within physiological bounds, rendered."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

from engines.phantom.acquisition import Acquisition
from engines.phantom.generate import generate_case
from engines.phantom.spine import build_spine
from engines.phantom.subject import DISC_LEVELS, SubjectParameters
from engines.phantom.tissues import HU_BONE_TISSUE, HU_FAT, HU_SOFT_TISSUE, Tissue
from engines.training.hard_cases import (
    DEGENERATED_LOWER_GRADE,
    DEGENERATED_UPPER_GRADE,
    LOWER_DISCS,
    OSTEOPOROTIC_AGE_YEARS,
    OSTEOPOROTIC_BVTV,
    OSTEOPOROTIC_MARROW_FF,
    SCOLIOSIS_APEX,
    SCOLIOSIS_DEVIATION_MM,
    UPPER_DISCS,
    VACUUM_MIN_GRADE,
    HardCase,
    hard_case_kind,
    training_subject,
)
from engines.training.recipe import RECIPE_V1, RECIPE_V2, TRAIN_SEED_BASE, TrainingRecipe

SEEDS = range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + 2000)
#: A binomial share over 2000 subjects lies within this of its fraction (more than 4 standard deviations).
SHARE_TOLERANCE = 0.035
#: Opportunistic CT: L1 trabecular attenuation at or below 110 HU indicates osteoporosis (Pickhardt 2013).
OSTEOPOROSIS_L1_HU = 110.0
#: Adult scoliosis is a coronal Cobb angle of at least 10 degrees; the hard cases stay below a surgical 45.
COBB_RANGE_DEG = (15.0, 45.0)
#: The phantom's own bounds of a natural subject (SubjectParameters.from_seed clips).
BVTV_BOUNDS = (0.045, 0.18)
MARROW_FF_BOUNDS = (0.12, 0.85)
#: Small FOV around the lower lumbar spine, noiseless: vertebral bodies in well under a second.
SMALL = Acquisition(fov_mm=(120.0, 120.0, 27.0), noise_scale=0.0, sampling_fraction=(1.0, 1.0, 1.0))


def _by_kind(recipe: TrainingRecipe) -> dict[HardCase, list[int]]:
    kinds: dict[HardCase, list[int]] = {k: [] for k in HardCase}
    for seed in SEEDS:
        kinds[hard_case_kind(recipe, seed)].append(seed)
    return kinds


def _l1_hu(subject: SubjectParameters) -> float:
    """The mixing rule of docs/phantom.md at L1's BV/TV and marrow fat (without the texture)."""
    b, ff = subject.trabecular_bvtv, subject.marrow_fat_fraction
    return b * HU_BONE_TISSUE + (1 - b) * (ff * HU_FAT + (1 - ff) * HU_SOFT_TISSUE)


def _changed_fields(a: SubjectParameters, b: SubjectParameters) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_kinds_follow_the_recipe_fractions_and_are_deterministic() -> None:
    recipe = RECIPE_V2
    kinds = _by_kind(recipe)
    share = {k: len(v) / len(SEEDS) for k, v in kinds.items()}
    assert abs(share[HardCase.OSTEOPOROTIC] - recipe.osteoporotic_fraction) < SHARE_TOLERANCE
    assert abs(share[HardCase.SCOLIOSIS] - recipe.scoliosis_fraction) < SHARE_TOLERANCE
    assert abs(share[HardCase.DEGENERATED_DISCS] - recipe.degenerated_disc_fraction) < SHARE_TOLERANCE
    seed = kinds[HardCase.SCOLIOSIS][0]
    assert training_subject(recipe, seed) == training_subject(recipe, seed)
    # Another recipe seed draws other subjects as hard cases.
    other = _by_kind(recipe.with_changes(seed=recipe.seed + 1))
    assert other[HardCase.OSTEOPOROTIC] != kinds[HardCase.OSTEOPOROTIC]
    # v1 has no hard cases: every subject is the phantom's own draw.
    assert all(
        training_subject(RECIPE_V1, s) == (SubjectParameters.from_seed(s), HardCase.NORMAL) for s in SEEDS
    )
    with pytest.raises(ValueError, match="hard-case fractions"):
        recipe.with_changes(osteoporotic_fraction=0.6, scoliosis_fraction=0.5)


def test_osteoporotic_subjects_have_low_bone_density_and_fatty_marrow() -> None:
    seeds = _by_kind(RECIPE_V2)[HardCase.OSTEOPOROTIC]
    assert len(seeds) > 200
    for seed in seeds:
        natural = SubjectParameters.from_seed(seed)
        hard, kind = training_subject(RECIPE_V2, seed)
        assert kind is HardCase.OSTEOPOROTIC
        assert _changed_fields(natural, hard) <= {"age_years", "trabecular_bvtv", "marrow_fat_fraction"}
        assert OSTEOPOROTIC_BVTV[0] <= hard.trabecular_bvtv <= OSTEOPOROTIC_BVTV[1]
        assert hard.trabecular_bvtv <= natural.trabecular_bvtv
        assert BVTV_BOUNDS[0] <= hard.trabecular_bvtv
        assert OSTEOPOROTIC_MARROW_FF[0] <= hard.marrow_fat_fraction <= MARROW_FF_BOUNDS[1]
        assert hard.age_years >= OSTEOPOROTIC_AGE_YEARS[0]
        assert 0.0 < _l1_hu(hard) <= OSTEOPOROSIS_L1_HU


def test_scoliotic_subjects_have_a_clear_lumbar_curve_with_rotation() -> None:
    seeds = _by_kind(RECIPE_V2)[HardCase.SCOLIOSIS]
    assert len(seeds) > 100
    sides = set()
    for seed in seeds:
        natural = SubjectParameters.from_seed(seed)
        hard, _ = training_subject(RECIPE_V2, seed)
        assert _changed_fields(natural, hard) <= {"scoliosis_mm", "scoliosis_apex"}
        assert SCOLIOSIS_DEVIATION_MM[0] <= abs(hard.scoliosis_mm) <= SCOLIOSIS_DEVIATION_MM[1]
        assert SCOLIOSIS_APEX[0] <= hard.scoliosis_apex <= SCOLIOSIS_APEX[1]
        sides.add(math.copysign(1.0, hard.scoliosis_mm))
    assert sides == {-1.0, 1.0}
    for seed in seeds[:20]:
        hard, _ = training_subject(RECIPE_V2, seed)
        vertebrae = [s for s in build_spine(hard) if s.kind == "vertebra"]
        # Coronal tilt of each vertebra's axis, and its axial rotation (the local x axis in the axial plane).
        tilt = [math.degrees(math.atan2(v.frame[0, 2], v.frame[2, 2])) for v in vertebrae]
        spin = [abs(math.degrees(math.atan2(v.frame[1, 0], v.frame[0, 0]))) for v in vertebrae]
        cobb = max(tilt) - min(tilt)
        assert COBB_RANGE_DEG[0] <= cobb <= COBB_RANGE_DEG[1], (seed, cobb)
        assert 8.0 <= max(spin) <= 21.0, (seed, spin)


def test_degenerated_disc_subjects_have_high_grades_and_vacuum() -> None:
    seeds = _by_kind(RECIPE_V2)[HardCase.DEGENERATED_DISCS]
    assert len(seeds) > 100
    vacuum = Counter[bool]()
    for seed in seeds:
        natural = SubjectParameters.from_seed(seed)
        hard, _ = training_subject(RECIPE_V2, seed)
        assert _changed_fields(natural, hard) <= {"disc_degeneration", "disc_vacuum"}
        grades = dict(zip(DISC_LEVELS, hard.disc_degeneration, strict=True))
        assert all(0.0 <= g <= 1.0 for g in grades.values())
        assert all(grades[level] >= DEGENERATED_LOWER_GRADE[0] for level in LOWER_DISCS)
        assert all(grades[level] >= DEGENERATED_UPPER_GRADE[0] for level in UPPER_DISCS)
        assert all(h >= n for h, n in zip(hard.disc_degeneration, natural.disc_degeneration, strict=True))
        assert not hard.disc_vacuum or max(grades.values()) > VACUUM_MIN_GRADE
        vacuum[hard.disc_vacuum] += 1
    assert vacuum[True] > len(seeds) * 0.4 and vacuum[False] > 0


def test_an_osteoporotic_subject_renders_lower_vertebral_hu() -> None:
    seed = _by_kind(RECIPE_V2)[HardCase.OSTEOPOROTIC][0]
    hard, _ = training_subject(RECIPE_V2, seed)
    natural_case = generate_case(seed, SMALL, supersample=1)
    hard_case = generate_case(seed, SMALL, supersample=1, subject=hard)
    assert hard_case.subject == hard and natural_case.subject == SubjectParameters.from_seed(seed)
    body = hard_case.labels == Tissue.MARROW_BODY
    assert body.sum() > 1000
    natural_hu = float(natural_case.ct_hu[natural_case.labels == Tissue.MARROW_BODY].mean())
    hard_hu = float(np.mean(hard_case.ct_hu[body]))
    assert hard_hu < natural_hu - 20.0
    assert hard_hu <= OSTEOPOROSIS_L1_HU * 1.1  # lower levels are up to 8 % denser than L1
    with pytest.raises(ValueError, match="seed"):
        generate_case(seed + 1, SMALL, supersample=1, subject=hard)
