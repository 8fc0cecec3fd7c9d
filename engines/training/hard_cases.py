"""Harder training subjects: osteoporotic bone, scoliosis and degenerated discs, drawn more often than chance.

The phantom draws a population (``SubjectParameters.from_seed``) in which the cases that limit the shipped model
are rare: trabecular HU near the bone thresholds (osteoporosis), a lumbar curve with rotated vertebrae
(scoliosis), collapsed discs holding gas. A recipe names the fraction of training subjects to draw as each kind;
the kind and its parameters are a pure function of (recipe seed, subject seed), so the pool at any step stays a
function of the recipe and a resumed run regenerates the same subjects.

Only anatomy the normal population also shows is changed, within the phantom's own physiological bounds
(docs/model.md states the ranges and their sources). Pathology the model must never see (implants, lesions,
metastases, motion) is not a hard case and is never drawn here.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum

import numpy as np

from engines.phantom.subject import DISC_LEVELS, VERTEBRA_LEVELS, SubjectParameters
from engines.training.recipe import TrainingRecipe

#: Stream tag of the hard-case draws (distinct from the acquisition jitter and patch-centre streams).
_HARD_CASE_STREAM = 0x4A2D


class HardCase(StrEnum):
    NORMAL = "normal"
    OSTEOPOROTIC = "osteoporotic"
    SCOLIOSIS = "scoliosis"
    DEGENERATED_DISCS = "degenerated_discs"


#: Osteoporotic bone. L1 BV/TV in the phantom's calibration (0.125 gives ~210 HU at 25 years): 0.045-0.080 gives
#: L1 trabecular HU of about 10-110 through the mixing rule, below the 110 HU opportunistic-CT threshold for
#: osteoporosis (Pickhardt 2013). The lower bound is the phantom's own floor for a natural subject.
OSTEOPOROTIC_BVTV = (0.045, 0.080)
#: Marrow proton-density fat fraction: raised in osteoporosis (Griffith 2005: ~67 % against ~59 % in controls of
#: the same age; Li 2014); the upper bound is the phantom's clip.
OSTEOPOROTIC_MARROW_FF = (0.55, 0.80)
#: Osteoporotic subjects are at least this old (the age also thins the cortical shell and drives muscle bulk).
OSTEOPOROTIC_AGE_YEARS = (55.0, 85.0)
#: Scoliosis: peak lateral deviation of the lumbar curve (either side) and its apex (index into VERTEBRA_LEVELS,
#: L2 to L4). With the phantom's curve shape this is a Cobb angle of about 18-40 degrees (adult degenerative
#: scoliosis: Cobb >= 10 degrees, typically 10-40) and an apical axial rotation of 10-20 degrees.
SCOLIOSIS_DEVIATION_MM = (12.0, 28.0)
SCOLIOSIS_APEX = (float(VERTEBRA_LEVELS.index("L2")), float(VERTEBRA_LEVELS.index("L4")))
#: Degenerated discs: grade (0 healthy .. 1 collapsed; 1 loses 55 % of the disc height) of the three lowest
#: lumbar discs (L3-L4, L4-L5, L5-S1: Pfirrmann IV-V), and at least this for L1-L2 and L2-L3.
DEGENERATED_LOWER_GRADE = (0.6, 1.0)
DEGENERATED_UPPER_GRADE = (0.3, 0.7)
LOWER_DISCS = ("L3", "L4", "L5")
UPPER_DISCS = ("L1", "L2")
#: Vacuum phenomenon in the worst disc when it is graded above VACUUM_MIN_GRADE (the phantom's own rule), with
#: this probability (gas is common in collapsed lumbar discs of older adults).
VACUUM_PROBABILITY = 0.6
VACUUM_MIN_GRADE = 0.75


def hard_case_kind(recipe: TrainingRecipe, subject_seed: int) -> HardCase:
    """Which kind subject ``subject_seed`` is drawn as: the recipe's fractions partition [0, 1)."""
    u = float(np.random.default_rng([recipe.seed, subject_seed, _HARD_CASE_STREAM]).random())
    edge = 0.0
    for kind, fraction in (
        (HardCase.OSTEOPOROTIC, recipe.osteoporotic_fraction),
        (HardCase.SCOLIOSIS, recipe.scoliosis_fraction),
        (HardCase.DEGENERATED_DISCS, recipe.degenerated_disc_fraction),
    ):
        edge += fraction
        if u < edge:
            return kind
    return HardCase.NORMAL


def training_subject(recipe: TrainingRecipe, subject_seed: int) -> tuple[SubjectParameters, HardCase]:
    """The person training subject ``subject_seed`` is: the phantom's draw, transformed if it is a hard case."""
    natural = SubjectParameters.from_seed(subject_seed)
    kind = hard_case_kind(recipe, subject_seed)
    if kind is HardCase.NORMAL:
        return natural, kind
    rng = np.random.default_rng([recipe.seed, subject_seed, _HARD_CASE_STREAM, 1])
    if kind is HardCase.OSTEOPOROTIC:
        return _osteoporotic(natural, rng), kind
    if kind is HardCase.SCOLIOSIS:
        return _scoliotic(natural, rng), kind
    return _degenerated(natural, rng), kind


def _osteoporotic(s: SubjectParameters, rng: np.random.Generator) -> SubjectParameters:
    age = max(s.age_years, float(rng.uniform(*OSTEOPOROTIC_AGE_YEARS)))
    return dataclasses.replace(
        s,
        age_years=round(age, 1),
        trabecular_bvtv=min(s.trabecular_bvtv, float(rng.uniform(*OSTEOPOROTIC_BVTV))),
        marrow_fat_fraction=max(s.marrow_fat_fraction, float(rng.uniform(*OSTEOPOROTIC_MARROW_FF))),
    )


def _scoliotic(s: SubjectParameters, rng: np.random.Generator) -> SubjectParameters:
    side = 1.0 if rng.random() < 0.5 else -1.0
    return dataclasses.replace(
        s,
        scoliosis_mm=side * float(rng.uniform(*SCOLIOSIS_DEVIATION_MM)),
        scoliosis_apex=float(rng.uniform(*SCOLIOSIS_APEX)),
    )


def _degenerated(s: SubjectParameters, rng: np.random.Generator) -> SubjectParameters:
    grades = list(s.disc_degeneration)
    for level in LOWER_DISCS:
        i = DISC_LEVELS.index(level)
        grades[i] = max(grades[i], float(rng.uniform(*DEGENERATED_LOWER_GRADE)))
    for level in UPPER_DISCS:
        i = DISC_LEVELS.index(level)
        grades[i] = max(grades[i], float(rng.uniform(*DEGENERATED_UPPER_GRADE)))
    vacuum = s.disc_vacuum or (max(grades) > VACUUM_MIN_GRADE and rng.random() < VACUUM_PROBABILITY)
    return dataclasses.replace(s, disc_degeneration=tuple(grades), disc_vacuum=bool(vacuum))
