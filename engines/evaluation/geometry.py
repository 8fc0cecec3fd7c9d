"""Geometry of one evaluated case: bone surface distance, and per lumbar level the body heights and canal depth.

Kept apart from the HU metrics because it needs more than two volumes: the grid's spacing and orientation, and
for the vertebral measures where each vertebra is, which only a phantom knows; a DICOM pair gets the surface
distance alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.evaluation.metrics import BoolArray, HuArray, RegionMasks
from engines.evaluation.surface_distance import (
    FOV_MARGIN_MM,
    ISO_LEVEL_HU,
    SurfaceDistance,
    bone_interior_from_ct,
    bone_surface_distance,
)
from engines.evaluation.vertebral_geometry import (
    LEVEL_HU,
    MEASURES,
    WALL_INSET_MM,
    LevelComparison,
    compare_levels,
    lumbar_placements,
    summarise_levels,
)
from engines.phantom.case import PhantomCase
from sct_core.geometry import VolumeGeometry

PHANTOM_INTERIOR = "the phantom's trabecular marrow labels (ground truth)"
CT_INTERIOR = (
    "the CT's own bone above 200 HU with its enclosed cavities filled, less its outermost voxel layer"
)


@dataclass(frozen=True, slots=True)
class CaseGeometry:
    """Geometry of one sCT against its CT; ``levels`` is empty where vertebra positions are unknown."""

    surface: SurfaceDistance
    levels: tuple[LevelComparison, ...]
    #: What counted as bone interior when choosing the outer surface (engines/evaluation/surface_distance.py).
    interior_definition: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "surface_distance": self.surface.to_dict(),
            "bone_interior": self.interior_definition,
            "vertebrae": [lv.to_dict() for lv in self.levels],
            "seconds": round(self.seconds, 3),
        }


def phantom_geometry(sct_hu: HuArray, case: PhantomCase, masks: RegionMasks) -> CaseGeometry:
    """Surface distance inside the labelled body (marrow labels as bone interior) and L1-L5 measures."""
    started = time.perf_counter()
    surface = bone_surface_distance(sct_hu, case.ct_hu, case.geometry.spacing, masks.body, masks.trabecular)
    levels = compare_levels(sct_hu, case.ct_hu, case.geometry, lumbar_placements(case.subject))
    return CaseGeometry(surface, levels, PHANTOM_INTERIOR, time.perf_counter() - started)


def dicom_geometry(
    sct_hu: HuArray, ct_hu: HuArray, geometry: VolumeGeometry, body: BoolArray
) -> CaseGeometry:
    """Surface distance of a DICOM pair; no vertebral measures (nothing says where the vertebrae are)."""
    started = time.perf_counter()
    surface = bone_surface_distance(sct_hu, ct_hu, geometry.spacing, body, bone_interior_from_ct(ct_hu))
    return CaseGeometry(surface, (), CT_INTERIOR, time.perf_counter() - started)


#: Summary keys of the vertebral measures: mean ± SD of |sCT − CT| over every level of every case.
VERTEBRA_KEYS = {name: f"vertebra.{name}_abs_diff_mm" for name in MEASURES}
SURFACE_KEYS = ("surface_distance.mean_mm", "surface_distance.p95_mm", "surface_distance.within_1mm")


def summarise_geometry(cases: Sequence[CaseGeometry]) -> dict[str, dict[str, float]]:
    """Keys as :data:`SURFACE_KEYS` and :data:`VERTEBRA_KEYS`, each ``{"mean", "std", "n", "missing"}``.

    Surface figures: mean and population SD over cases, a case without a measurable surface left out. Vertebral
    measures: mean absolute difference and the SD of the absolute differences over all levels of all cases (as
    the sCT literature reports them), a level missing in either volume left out; ``missing`` counts what was
    left out.
    """
    out: dict[str, dict[str, float]] = {}
    for key in SURFACE_KEYS:
        values = np.array([c.surface.scalars()[key] for c in cases], dtype=np.float64)
        kept = values[np.isfinite(values)]
        out[key] = {
            "mean": float(kept.mean()) if kept.size else math.nan,
            "std": float(kept.std(ddof=0)) if kept.size else math.nan,
            "n": float(kept.size),
            "missing": float(values.size - kept.size),
        }
    levels = [lv for c in cases for lv in c.levels]
    if levels:
        for name, stats in summarise_levels(levels).items():
            out[VERTEBRA_KEYS[name]] = {
                "mean": stats["mad_mm"],
                "std": stats["sd_mm"],
                "n": stats["n"],
                "missing": stats["missing"],
            }
    return out


def geometry_definition() -> str:
    """One sentence per figure, for reports: what was measured and how."""
    return (
        f"Bone surface distance: outer {ISO_LEVEL_HU:g} HU iso-surfaces of sCT and CT inside the body, sub-voxel "
        f"(edge crossings, point-to-iso-surface), symmetric: mean = area-weighted average symmetric surface "
        f"distance, p95 = larger directed 95th percentile, within_1mm = share of both surfaces' area; samples "
        f"within {FOV_MARGIN_MM:g} mm of the grid's faces not measured from. Vertebral measures (phantoms only): "
        f"L1-L5 anterior and posterior body heights between the outer {LEVEL_HU:g} HU endplate crossings "
        f"{WALL_INSET_MM:g} mm inside the walls, and the canal's mid-sagittal diameter at mid-body height, from the posterior body "
        f"wall to the posterior arch; the same automatic method on sCT and CT; mean ± SD of |sCT - CT|."
    )
