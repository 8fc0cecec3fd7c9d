"""Tissue classes of the phantom and their MR and CT properties (docs/phantom.md, Physics reference).

Each voxel is a mixture of these tissues (partial volume); MR signal and HU are summed over the mixture. Two
tissues, trabecular marrow of the vertebral bodies and of the posterior elements, carry per-voxel bone volume
fraction and fat fraction instead of fixed values; :mod:`engines.phantom.generate` handles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Tissue(IntEnum):
    """Label values. Order is the label value stored in ``PhantomCase.labels``; 0 is air outside the body."""

    AIR = 0
    SKIN = 1
    SUBCUTANEOUS_FAT = 2
    MUSCLE = 3
    INTERMUSCULAR_FAT = 4
    VISCERA = 5
    VISCERAL_FAT = 6
    BOWEL_GAS = 7
    BLOOD = 8
    EPIDURAL_FAT = 9
    CSF = 10
    NERVE = 11
    DISC_NUCLEUS = 12
    DISC_ANNULUS = 13
    DISC_DEGENERATED = 14
    DISC_GAS = 15
    LIGAMENT = 16
    FACET_CARTILAGE = 17
    CORTICAL_BONE = 18
    MARROW_BODY = 19
    MARROW_POSTERIOR = 20


N_TISSUES = len(Tissue)

#: Groupings used by evaluation metrics: bone, trabecular bone, soft tissue, fat (docs/model.md, Metric
#: definitions).
CORTICAL_TISSUES = frozenset({Tissue.CORTICAL_BONE})
TRABECULAR_TISSUES = frozenset({Tissue.MARROW_BODY, Tissue.MARROW_POSTERIOR})
FAT_TISSUES = frozenset(
    {Tissue.SUBCUTANEOUS_FAT, Tissue.INTERMUSCULAR_FAT, Tissue.VISCERAL_FAT, Tissue.EPIDURAL_FAT}
)
GAS_TISSUES = frozenset({Tissue.AIR, Tissue.BOWEL_GAS, Tissue.DISC_GAS})
SOFT_TISSUES = frozenset(set(Tissue) - CORTICAL_TISSUES - TRABECULAR_TISSUES - FAT_TISSUES - GAS_TISSUES)


@dataclass(frozen=True, slots=True)
class TissueProperties:
    """MR two-pool (water + fat) and CT properties of one tissue.

    ``proton_density`` is the total 1H density relative to pure water; ``fat_fraction`` the share of it in fat
    (PDFF). Relaxation times are per field strength, keyed 1.5 and 3.0 T. ``hu`` is the CT number at 120 kVp.
    """

    proton_density: float
    fat_fraction: float
    t1_water_ms: dict[float, float]
    t2star_water_ms: dict[float, float]
    hu: float


#: Fat pool relaxation (subcutaneous-fat values, docs/phantom.md Physics reference; used for the fat part of
#: every tissue).
FAT_T1_MS = {1.5: 290.0, 3.0: 370.0}
FAT_T2STAR_MS = {1.5: 30.0, 3.0: 20.0}
#: HU of pure fat and of fat-free soft tissue, the end members of every mixing rule.
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
#: HU of mineralised bone tissue (trabecular mixing rule, calibrated with BV/TV 0.10-0.20; docs/phantom.md).
HU_BONE_TISSUE = 1800.0

_NONE = {1.5: 1.0, 3.0: 1.0}

TISSUE_TABLE: dict[Tissue, TissueProperties] = {
    Tissue.AIR: TissueProperties(0.0, 0.0, _NONE, _NONE, -1000.0),
    Tissue.SKIN: TissueProperties(0.70, 0.05, {1.5: 800.0, 3.0: 1000.0}, {1.5: 20.0, 3.0: 14.0}, 30.0),
    Tissue.SUBCUTANEOUS_FAT: TissueProperties(
        0.95, 0.92, {1.5: 800.0, 3.0: 1000.0}, {1.5: 30.0, 3.0: 20.0}, -105.0
    ),
    # MUSCLE fat fraction is per subject (SubjectParameters.muscle_fat_fraction); 0.03 is the young adult value.
    Tissue.MUSCLE: TissueProperties(0.75, 0.03, {1.5: 1008.0, 3.0: 1412.0}, {1.5: 30.0, 3.0: 22.0}, 50.0),
    Tissue.INTERMUSCULAR_FAT: TissueProperties(
        0.92, 0.85, {1.5: 800.0, 3.0: 1000.0}, {1.5: 28.0, 3.0: 18.0}, -90.0
    ),
    Tissue.VISCERA: TissueProperties(0.80, 0.05, {1.5: 650.0, 3.0: 850.0}, {1.5: 30.0, 3.0: 20.0}, 40.0),
    Tissue.VISCERAL_FAT: TissueProperties(
        0.93, 0.90, {1.5: 800.0, 3.0: 1000.0}, {1.5: 28.0, 3.0: 18.0}, -95.0
    ),
    Tissue.BOWEL_GAS: TissueProperties(0.0, 0.0, _NONE, _NONE, -950.0),
    Tissue.BLOOD: TissueProperties(0.85, 0.0, {1.5: 1441.0, 3.0: 1932.0}, {1.5: 60.0, 3.0: 35.0}, 50.0),
    Tissue.EPIDURAL_FAT: TissueProperties(
        0.95, 0.90, {1.5: 800.0, 3.0: 1000.0}, {1.5: 30.0, 3.0: 20.0}, -95.0
    ),
    Tissue.CSF: TissueProperties(1.0, 0.0, {1.5: 4273.0, 3.0: 4300.0}, {1.5: 300.0, 3.0: 200.0}, 8.0),
    Tissue.NERVE: TissueProperties(0.60, 0.0, {1.5: 745.0, 3.0: 993.0}, {1.5: 50.0, 3.0: 40.0}, 32.0),
    Tissue.DISC_NUCLEUS: TissueProperties(
        0.79, 0.0, {1.5: 1165.0, 3.0: 1350.0}, {1.5: 50.0, 3.0: 35.0}, 80.0
    ),
    Tissue.DISC_ANNULUS: TissueProperties(
        0.55, 0.0, {1.5: 800.0, 3.0: 1000.0}, {1.5: 15.0, 3.0: 10.0}, 100.0
    ),
    Tissue.DISC_DEGENERATED: TissueProperties(
        0.55, 0.0, {1.5: 640.0, 3.0: 800.0}, {1.5: 30.0, 3.0: 20.0}, 100.0
    ),
    Tissue.DISC_GAS: TissueProperties(0.0, 0.0, _NONE, _NONE, -700.0),
    Tissue.LIGAMENT: TissueProperties(0.45, 0.0, {1.5: 800.0, 3.0: 1000.0}, {1.5: 6.0, 3.0: 4.0}, 90.0),
    Tissue.FACET_CARTILAGE: TissueProperties(
        0.70, 0.0, {1.5: 1000.0, 3.0: 1200.0}, {1.5: 15.0, 3.0: 10.0}, 70.0
    ),
    # Cortical bone: dense (BV/TV ~0.9) bone with ~20 % water by volume and no signal at TE >= 2 ms.
    Tissue.CORTICAL_BONE: TissueProperties(0.20, 0.0, {1.5: 200.0, 3.0: 302.0}, {1.5: 0.8, 3.0: 0.5}, 1850.0),
    # Marrow: water pool values; PD, FF and HU are replaced per voxel from BV/TV and marrow fat fraction.
    Tissue.MARROW_BODY: TissueProperties(
        0.91, 0.30, {1.5: 1000.0, 3.0: 1300.0}, {1.5: 40.0, 3.0: 30.0}, 220.0
    ),
    Tissue.MARROW_POSTERIOR: TissueProperties(
        0.91, 0.30, {1.5: 1000.0, 3.0: 1300.0}, {1.5: 40.0, 3.0: 30.0}, 400.0
    ),
}
