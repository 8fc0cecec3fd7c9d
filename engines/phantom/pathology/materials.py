"""MR, CT and magnetic properties of what pathology puts into the body (docs/phantom.md, Pathology).

Tissue-like materials use the phantom's two-pool spoiled-GRE signal model with their own proton density, fat
fraction, T1 and T2*; titanium has no protons and carries the susceptibility difference that distorts B0.
Values marked *assumed* in the docs are engineering choices within published ranges, to tune, not facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engines.phantom import mr_signal
from engines.phantom.tissues import FAT_T1_MS, FAT_T2STAR_MS

F64 = npt.NDArray[np.float64]
C128 = npt.NDArray[np.complex128]

#: Volume magnetic susceptibility (SI, ppm): titanium (commercially pure and Ti-6Al-4V are within ~10 % of
#: this) and soft tissue (water-like). Only the difference perturbs the field.
CHI_TITANIUM_PPM = 182.0
CHI_TISSUE_PPM = -9.05
#: CT number of titanium at 120 kVp before the 12-bit clip (*assumed*; real values exceed the 3071 HU a
#: 12-bit scanner stores, which is what the CT shows). Also sets the metal's attenuation in the streak model.
HU_TITANIUM = 7000.0


@dataclass(frozen=True, slots=True)
class Material:
    """One material a pathological object is made of.

    ``proton_density`` is relative to pure water; ``fat_fraction`` the share of it in fat; relaxation times per
    field strength (1.5, 3.0 T) in ms; ``fat_t2star_ms`` None means the phantom's ordinary fat T2*.
    ``chi_ppm`` is None for materials whose susceptibility difference from tissue is neglected.
    """

    name: str
    proton_density: float
    fat_fraction: float
    t1_water_ms: dict[float, float]
    t2star_water_ms: dict[float, float]
    fat_t2star_ms: dict[float, float] | None = None
    chi_ppm: float | None = None

    @property
    def is_metal(self) -> bool:
        return self.chi_ppm is not None

    def signal(self, te_ms: float, field_t: float, tr_ms: float, flip_rad: F64) -> tuple[F64, C128]:
        """Water and complex fat signal per unit volume at one echo, for per-voxel flip angles (B1 included)."""
        if self.proton_density == 0.0:
            zero = np.zeros_like(flip_rad)
            return zero, zero.astype(np.complex128)
        water_ernst = _ernst(self.t1_water_ms[field_t], tr_ms, flip_rad)
        fat_ernst = _ernst(FAT_T1_MS[field_t], tr_ms, flip_rad)
        fat_t2s = (self.fat_t2star_ms or FAT_T2STAR_MS)[field_t]
        pd, ff = self.proton_density, self.fat_fraction
        water = pd * (1 - ff) * water_ernst * math.exp(-te_ms / self.t2star_water_ms[field_t])
        phasor = mr_signal.fat_phasor(te_ms, field_t)
        fat = pd * ff * fat_ernst * math.exp(-te_ms / fat_t2s) * phasor
        return np.asarray(water), np.asarray(fat, dtype=np.complex128)


def _ernst(t1_ms: float, tr_ms: float, flip_rad: F64) -> F64:
    e1 = math.exp(-tr_ms / t1_ms)
    return np.asarray(np.sin(flip_rad) * (1 - e1) / (1 - e1 * np.cos(flip_rad)))


#: Pedicle screws, tulip heads and rods: no protons, so no MR signal at all; the field it perturbs does the rest.
TITANIUM = Material(
    "titanium", 0.0, 0.0, {1.5: 1.0, 3.0: 1.0}, {1.5: 1.0, 3.0: 1.0}, chi_ppm=CHI_TITANIUM_PPM
)
#: Calcified intradural tumour (psammomatous meningioma-like): little water, bound to mineral, very short T2*.
CALCIFICATION = Material("calcification", 0.20, 0.0, {1.5: 500.0, 3.0: 600.0}, {1.5: 1.0, 3.0: 0.6})
#: Osteoblastic (sclerotic) metastasis: dense new bone, little marrow fat, T2* shortened by the bone's
#: microscopic field gradients in both pools.
SCLEROTIC_BONE = Material(
    "sclerotic bone",
    0.25,
    0.10,
    {1.5: 600.0, 3.0: 750.0},
    {1.5: 2.0, 3.0: 1.2},
    fat_t2star_ms={1.5: 2.0, 3.0: 1.2},
)
#: Tumour tissue of an osteolytic metastasis: cellular, water-rich, no fat, long T2* (no trabeculae left).
TUMOUR = Material("tumour", 0.85, 0.0, {1.5: 1100.0, 3.0: 1450.0}, {1.5: 45.0, 3.0: 32.0})
