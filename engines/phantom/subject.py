"""The simulated subject: every anatomical and tissue parameter that varies between people, drawn from a seed.

Keeping all randomness of the anatomy in one frozen record, drawn once from one seed, is what makes a phantom
case reproducible and lets training, tests and benchmarks name a case by its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Levels rendered, cranial to caudal. T11/T12 fill the top of a 250 mm sagittal FOV centred on L3; the sacrum
#: is S1 to S3 fused.
VERTEBRA_LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
#: Intervertebral discs, named by the level above them.
DISC_LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")


@dataclass(frozen=True, slots=True)
class SubjectParameters:
    """One synthetic person. Lengths in mm, angles in degrees, fractions in [0, 1]."""

    seed: int
    sex: str  # "F" or "M", as DICOM PatientSex
    age_years: float
    height_m: float
    weight_kg: float
    #: Scales every vertebral dimension (people differ in size more than in shape).
    spine_scale: float
    #: L1-S1 lordosis (sum of disc and body wedges) and the sacral slope of the S1 endplate.
    lordosis_deg: float
    sacral_slope_deg: float
    #: Tilt of the L1-S1 chord from the table's long axis (supine patients lie with it nearly horizontal).
    spine_tilt_deg: float
    #: Peak lateral deviation of a lumbar scoliotic curve (signed: + to the patient's left) and its apex level.
    scoliosis_mm: float
    scoliosis_apex: float  # index into VERTEBRA_LEVELS, fractional
    #: Anterior slip of one vertebra over the one below, as a fraction of its depth (Meyerding grade x 25 %).
    listhesis_level: str  # "" for none, else "L4" or "L5"
    listhesis_fraction: float
    #: Per-disc degeneration grade 0 (healthy) .. 1 (collapsed, dehydrated); same order as DISC_LEVELS.
    disc_degeneration: tuple[float, ...]
    #: Whether the most degenerated disc holds gas (vacuum phenomenon).
    disc_vacuum: bool
    #: Trabecular bone volume fraction of L1 and the per-level multipliers (lower levels are denser).
    trabecular_bvtv: float
    #: Marrow proton-density fat fraction of the vertebral bodies.
    marrow_fat_fraction: float
    #: Fat fraction of the paraspinal muscles (fatty infiltration rises with age).
    muscle_fat_fraction: float
    #: Subcutaneous fat thickness over the back, and scale of the body cross-section.
    subcutaneous_fat_mm: float
    body_half_width_mm: float
    body_half_depth_mm: float
    #: Fraction of the abdominal cavity that is visceral fat rather than organ / bowel tissue.
    visceral_fat_fraction: float
    #: Where the technologist centred the FOV relative to the L3 body centre (LPS mm).
    fov_offset_mm: tuple[float, float, float]

    @classmethod
    def from_seed(cls, seed: int) -> SubjectParameters:
        """Draw a subject. Distributions are centred on adult means with population spread (docs/phantom.md)."""
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer; found {seed}")
        rng = np.random.default_rng([seed, 0x5C7])
        sex = "F" if rng.random() < 0.5 else "M"
        age = float(rng.uniform(18.0, 85.0))
        male = sex == "M"
        height = float(np.clip(rng.normal(1.77 if male else 1.64, 0.07), 1.45, 2.02))
        bmi = float(np.clip(rng.lognormal(np.log(26.0), 0.15), 18.0, 40.0))
        weight = bmi * height**2
        # Bone loss: BV/TV falls ~0.001 per year after 25 (faster in women after 50); gives L1 ~ 210 HU at 25 and
        # ~ 90 HU at 85 through the mixing rule, the trend of Jang 2019 (docs/phantom.md, Physics reference).
        decline = 0.001 * max(age - 25.0, 0.0) + (0.0006 * max(age - 50.0, 0.0) if not male else 0.0)
        bvtv = float(np.clip(rng.normal(0.125, 0.012) - decline, 0.045, 0.18))
        # Marrow fat rises ~0.45 %/year (Baum 2018: 27-35 % in the 20s-30s at 3 T).
        marrow_ff = float(
            np.clip(rng.normal(0.30 if male else 0.27, 0.06) + 0.0045 * max(age - 25.0, 0.0), 0.12, 0.85)
        )
        muscle_ff = float(np.clip(rng.normal(0.03, 0.015) + 0.0012 * max(age - 30.0, 0.0), 0.01, 0.35))
        degen_base = np.clip((age - 25.0) / 60.0, 0.0, 1.0)
        # Lower discs degenerate first.
        level_weight = np.array([0.2, 0.25, 0.3, 0.4, 0.55, 0.9, 1.0])
        degeneration = np.clip(degen_base * level_weight * rng.uniform(0.3, 1.5, size=7), 0.0, 1.0)
        degeneration = np.where(rng.random(7) < 0.15, np.clip(degeneration + 0.4, 0, 1), degeneration)
        listhesis_level = ""
        listhesis_fraction = 0.0
        if rng.random() < 0.2:
            listhesis_level = "L5" if rng.random() < 0.5 else "L4"
            listhesis_fraction = float(rng.uniform(0.05, 0.3))
        scoliosis = float(rng.normal(0.0, 6.0)) if rng.random() < 0.35 else 0.0
        fat_scale = (bmi - 18.0) / 12.0
        return cls(
            seed=seed,
            sex=sex,
            age_years=round(age, 1),
            height_m=round(height, 2),
            weight_kg=round(weight, 1),
            spine_scale=float(np.clip(rng.normal(1.0 + (0.04 if male else -0.04), 0.05), 0.82, 1.18)),
            # Supine values (lower than standing): lordosis ~44°, sacral slope ~34°.
            lordosis_deg=float(np.clip(rng.normal(44.0, 8.0), 22.0, 68.0)),
            sacral_slope_deg=float(np.clip(rng.normal(34.0, 6.0), 18.0, 52.0)),
            spine_tilt_deg=float(rng.normal(0.0, 4.0)),
            scoliosis_mm=scoliosis,
            scoliosis_apex=float(rng.uniform(2.5, 5.5)),
            listhesis_level=listhesis_level,
            listhesis_fraction=listhesis_fraction,
            disc_degeneration=tuple(float(d) for d in degeneration),
            disc_vacuum=bool(degeneration.max() > 0.75 and rng.random() < 0.4),
            trabecular_bvtv=bvtv,
            marrow_fat_fraction=marrow_ff,
            muscle_fat_fraction=muscle_ff,
            subcutaneous_fat_mm=float(np.clip(4.0 + 18.0 * fat_scale + rng.normal(0, 3.0), 3.0, 45.0)),
            body_half_width_mm=float(np.clip(140.0 + 35.0 * fat_scale + rng.normal(0, 8), 115.0, 210.0)),
            body_half_depth_mm=float(np.clip(95.0 + 30.0 * fat_scale + rng.normal(0, 7), 80.0, 165.0)),
            visceral_fat_fraction=float(
                np.clip(0.15 + 0.25 * fat_scale + (0.08 if male else 0.0), 0.05, 0.7)
            ),
            fov_offset_mm=(
                float(rng.normal(0.0, 3.0)),
                float(rng.normal(0.0, 4.0)),
                float(rng.normal(0.0, 6.0)),
            ),
        )
