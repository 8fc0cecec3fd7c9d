"""sCT-versus-CT metrics as the sCT literature reports them (docs/model.md, Metric definitions).

Every metric is computed inside a body mask: outside it both volumes are air, and including that air would dilute
MAE towards zero and make numbers incomparable between fields of view. Region masks come either from phantom
labels (exact ground truth) or, for real CT/MR pairs without labels, from HU ranges of the reference CT; a
:class:`RegionMasks` carries a sentence saying which, so that reported numbers name their mask definition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from engines.phantom.tissues import (
    CORTICAL_TISSUES,
    FAT_TISSUES,
    SOFT_TISSUES,
    TRABECULAR_TISSUES,
    Tissue,
)

#: Any real-valued voxel array in HU (int16 CT, float or int16 sCT).
HuArray = npt.NDArray[np.integer[Any] | np.floating[Any]]
BoolArray = npt.NDArray[np.bool_]

#: Body from CT: halfway between air (-1000 HU) and fat (-100 HU), so skin is in and the air around it is out.
BODY_THRESHOLD_HU = -500.0

#: HU-range classes used when no labels exist. Cortex is dense (>= 700 HU); between 150 HU (the lowest bone-Dice
#: threshold of the literature) and 700 HU lies trabecular bone; soft tissue and fat use the usual CT windows.
CORTICAL_MIN_HU = 700.0
TRABECULAR_MIN_HU = 150.0
SOFT_MIN_HU = -30.0
FAT_MIN_HU = -200.0

#: Per-tissue result keys and the :class:`RegionMasks` field each one reads.
TISSUE_REGIONS: dict[str, str] = {
    "cortical_bone": "cortical",
    "trabecular_bone": "trabecular",
    "soft_tissue": "soft",
    "fat": "fat",
}

#: Bone Dice thresholds of the literature: bone is CT > T (and sCT > T).
BONE_DICE_THRESHOLDS_HU: tuple[int, ...] = (150, 200, 250)

#: Bambach & Ho 2022 classify bone by gray level at 40 %, 45 %, ..., 70 % of a 2000 HU window. The window's
#: level is not stated in what we could verify (the paper's abstract only); we assume level 500 HU, i.e. the
#: window [-500, 1500] HU, which puts the thresholds at 300, 400, ..., 900 HU.
BAMBACH_WINDOW_LEVEL_HU = 500.0
BAMBACH_WINDOW_WIDTH_HU = 2000.0
BAMBACH_PERCENTS: tuple[int, ...] = (40, 45, 50, 55, 60, 65, 70)
BAMBACH_THRESHOLDS_HU: tuple[float, ...] = tuple(
    BAMBACH_WINDOW_LEVEL_HU - BAMBACH_WINDOW_WIDTH_HU / 2 + p * BAMBACH_WINDOW_WIDTH_HU / 100
    for p in BAMBACH_PERCENTS
)

#: PSNR uses a fixed data range, [-1024, 3000] HU as in one version of the SynthRAD2023 code, so that PSNR does
#: not depend on each case's CT extremes (the other version's ct.max - ct.min does).
PSNR_HU_MIN = -1024.0
PSNR_HU_MAX = 3000.0
PSNR_DATA_RANGE_HU = PSNR_HU_MAX - PSNR_HU_MIN

#: In-plane 4-connectivity for hole filling: filling slice by slice closes airways and bowel that leave the slab
#: through its first or last slice, which a 3D fill would leave open.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True, slots=True, eq=False)
class RegionMasks:
    """Boolean masks on the CT grid: the body and four tissue regions inside it, and how they were made."""

    body: BoolArray
    cortical: BoolArray
    trabecular: BoolArray
    soft: BoolArray
    fat: BoolArray
    definition: str

    def __post_init__(self) -> None:
        for name in ("body", "cortical", "trabecular", "soft", "fat"):
            arr = getattr(self, name)
            if arr.dtype != np.bool_:
                raise ValueError(f"{name} mask must be boolean, found {arr.dtype}")
            if arr.shape != self.body.shape:
                raise ValueError(f"{name} mask shape {arr.shape} does not match body shape {self.body.shape}")


def fill_holes_per_slice(mask: BoolArray) -> BoolArray:
    """Fill holes in each slice (axis 0) of a 3D mask; see :data:`_IN_PLANE` for why not in 3D."""
    return np.asarray(ndimage.binary_fill_holes(mask, structure=_IN_PLANE), dtype=bool)


def largest_component(mask: BoolArray) -> BoolArray:
    """Keep the largest 3D (6-connected) component: drops the table, coils and noise specks next to the body."""
    labelled, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return np.asarray(labelled == int(np.argmax(sizes)), dtype=bool)


def _isin(labels: npt.NDArray[np.integer[Any]], tissues: Iterable[Tissue]) -> BoolArray:
    return np.isin(labels, np.array(sorted(int(t) for t in tissues)))


def masks_from_labels(labels: npt.NDArray[np.integer[Any]]) -> RegionMasks:
    """Ground-truth regions of a phantom: tissue groups of :mod:`engines.phantom.tissues`, within the body."""
    body = np.asarray(labels != Tissue.AIR, dtype=bool)
    return RegionMasks(
        body=body,
        cortical=_isin(labels, CORTICAL_TISSUES) & body,
        trabecular=_isin(labels, TRABECULAR_TISSUES) & body,
        soft=_isin(labels, SOFT_TISSUES) & body,
        fat=_isin(labels, FAT_TISSUES) & body,
        definition=(
            "Phantom labels: body = label != AIR; cortical = CORTICAL_BONE; trabecular = vertebral-body and "
            "posterior-element marrow; fat = subcutaneous, intermuscular, visceral and epidural fat; soft = every "
            "other non-gas tissue."
        ),
    )


def body_mask_from_ct(ct_hu: HuArray) -> BoolArray:
    """Body of a real CT: voxels above :data:`BODY_THRESHOLD_HU`, holes filled per slice, largest component.

    Hole filling keeps gas in bowel and lungs inside the body (it is the patient's, and sCT errors there count).
    """
    body = np.asarray(ct_hu > BODY_THRESHOLD_HU, dtype=bool)
    return largest_component(fill_holes_per_slice(body))


def masks_from_ct(ct_hu: HuArray, body: BoolArray | None = None) -> RegionMasks:
    """Regions of a real CT by HU range within the body (from :func:`body_mask_from_ct` unless given).

    Without labels the reference CT's own HU is the best available tissue class; partial-volume voxels land in
    whichever range their mixture falls, and gas inside the body belongs to no tissue region.
    """
    if body is None:
        body = body_mask_from_ct(ct_hu)
    elif body.shape != ct_hu.shape:
        raise ValueError(f"body mask shape {body.shape} does not match CT shape {ct_hu.shape}")
    body = np.asarray(body, dtype=bool)
    return RegionMasks(
        body=body,
        cortical=np.asarray(ct_hu >= CORTICAL_MIN_HU, dtype=bool) & body,
        trabecular=np.asarray((ct_hu >= TRABECULAR_MIN_HU) & (ct_hu < CORTICAL_MIN_HU), dtype=bool) & body,
        soft=np.asarray((ct_hu >= SOFT_MIN_HU) & (ct_hu < TRABECULAR_MIN_HU), dtype=bool) & body,
        fat=np.asarray((ct_hu >= FAT_MIN_HU) & (ct_hu < SOFT_MIN_HU), dtype=bool) & body,
        definition=(
            f"CT HU ranges within the body (CT > {BODY_THRESHOLD_HU:g} HU, holes filled per slice, largest "
            f"component, unless a body mask was given): cortical CT >= {CORTICAL_MIN_HU:g}; trabecular "
            f"{TRABECULAR_MIN_HU:g} <= CT < {CORTICAL_MIN_HU:g}; soft {SOFT_MIN_HU:g} <= CT < "
            f"{TRABECULAR_MIN_HU:g}; fat {FAT_MIN_HU:g} <= CT < {SOFT_MIN_HU:g} HU."
        ),
    )


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class SctMetrics:
    """Metrics of one sCT against its reference CT, all within the body mask.

    ``me_hu`` is mean(CT - sCT) (the literature's convention): positive when the sCT is too low, negative when
    too high. Per-tissue values are NaN for an empty region. Dice, precision and recall score two empty masks
    as 1.0 (full agreement) and an empty against a non-empty one as 0.0. ``psnr_db`` is inf when sCT equals
    CT.
    """

    mae_hu: float
    me_hu: float
    mae_by_tissue: dict[str, float]
    me_by_tissue: dict[str, float]
    bone_dice: dict[str, float]
    bambach_precision: float
    bambach_recall: float
    bambach_dice: float
    psnr_db: float
    body_voxels: int
    #: Which mask definition produced these numbers (:attr:`RegionMasks.definition`).
    mask_definition: str = field(default="")

    def scalars(self) -> dict[str, float]:
        """Every number under a flat name (``"mae_by_tissue.fat"``, ``"bone_dice.200"``), for summaries."""
        out: dict[str, float] = {"mae_hu": self.mae_hu, "me_hu": self.me_hu}
        out.update({f"mae_by_tissue.{k}": v for k, v in self.mae_by_tissue.items()})
        out.update({f"me_by_tissue.{k}": v for k, v in self.me_by_tissue.items()})
        out.update({f"bone_dice.{k}": v for k, v in self.bone_dice.items()})
        out["bambach_precision"] = self.bambach_precision
        out["bambach_recall"] = self.bambach_recall
        out["bambach_dice"] = self.bambach_dice
        out["psnr_db"] = self.psnr_db
        out["body_voxels"] = float(self.body_voxels)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (nested like the fields). JSON has no NaN or infinity, so both become ``None``: an
        empty tissue region (NaN) and a perfect PSNR (inf) both read as null."""
        return {
            "mae_hu": _json_float(self.mae_hu),
            "me_hu": _json_float(self.me_hu),
            "mae_by_tissue": {k: _json_float(v) for k, v in self.mae_by_tissue.items()},
            "me_by_tissue": {k: _json_float(v) for k, v in self.me_by_tissue.items()},
            "bone_dice": {k: _json_float(v) for k, v in self.bone_dice.items()},
            "bambach_precision": _json_float(self.bambach_precision),
            "bambach_recall": _json_float(self.bambach_recall),
            "bambach_dice": _json_float(self.bambach_dice),
            "psnr_db": _json_float(self.psnr_db),
            "body_voxels": int(self.body_voxels),
            "mask_definition": self.mask_definition,
        }


def _overlap(reference: BoolArray, predicted: BoolArray) -> tuple[float, float, float]:
    """Precision, recall and Dice of ``predicted`` against ``reference``; empty-vs-empty counts as agreement."""
    tp = int(np.count_nonzero(reference & predicted))
    n_ref = int(np.count_nonzero(reference))
    n_pred = int(np.count_nonzero(predicted))
    if n_ref == 0 and n_pred == 0:
        return 1.0, 1.0, 1.0
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_ref if n_ref else 0.0
    dice = 2.0 * tp / (n_ref + n_pred)
    return precision, recall, dice


def compute_metrics(sct_hu: HuArray, ct_hu: HuArray, masks: RegionMasks) -> SctMetrics:
    """Compare ``sct_hu`` with ``ct_hu`` inside ``masks``.

    Only body voxels are gathered (1D), and the float64 difference is formed once from them: a full 100×338×338
    volume in float64 is ~90 MB per copy, and the metrics need only the body.
    """
    if sct_hu.shape != ct_hu.shape:
        raise ValueError(f"sCT shape {sct_hu.shape} does not match CT shape {ct_hu.shape}")
    if masks.body.shape != ct_hu.shape:
        raise ValueError(f"mask shape {masks.body.shape} does not match CT shape {ct_hu.shape}")
    body = masks.body
    n = int(np.count_nonzero(body))
    if n == 0:
        raise ValueError("body mask is empty: no voxel to evaluate")
    ct_b = ct_hu[body]
    sct_b = sct_hu[body]
    diff = np.subtract(ct_b, sct_b, dtype=np.float64)  # CT - sCT
    if not np.all(np.isfinite(diff)):
        raise ValueError("sCT or CT holds non-finite values inside the body")
    abs_diff = np.abs(diff)

    mae_by_tissue: dict[str, float] = {}
    me_by_tissue: dict[str, float] = {}
    for key, attr in TISSUE_REGIONS.items():
        region = getattr(masks, attr)[body]
        if np.any(region):
            mae_by_tissue[key] = float(abs_diff[region].mean())
            me_by_tissue[key] = float(diff[region].mean())
        else:
            mae_by_tissue[key] = math.nan
            me_by_tissue[key] = math.nan

    bone_dice = {str(t): _overlap(ct_b > t, sct_b > t)[2] for t in BONE_DICE_THRESHOLDS_HU}
    bambach = np.array([_overlap(ct_b > t, sct_b > t) for t in BAMBACH_THRESHOLDS_HU], dtype=np.float64)
    precision, recall, dice = (float(v) for v in bambach.mean(axis=0))

    rmse = math.sqrt(float(np.dot(diff, diff)) / n)
    psnr = math.inf if rmse == 0.0 else 20.0 * math.log10(PSNR_DATA_RANGE_HU / rmse)

    return SctMetrics(
        mae_hu=float(abs_diff.mean()),
        me_hu=float(diff.mean()),
        mae_by_tissue=mae_by_tissue,
        me_by_tissue=me_by_tissue,
        bone_dice=bone_dice,
        bambach_precision=precision,
        bambach_recall=recall,
        bambach_dice=dice,
        psnr_db=psnr,
        body_voxels=n,
        mask_definition=masks.definition,
    )


def summarise(metrics: Sequence[SctMetrics]) -> dict[str, dict[str, float]]:
    """Mean and population std (ddof=0) over cases of every scalar, keyed by :meth:`SctMetrics.scalars` names.

    NaN cases (an empty tissue region) are left out of that scalar only; ``n`` says how many cases counted. A
    scalar NaN in every case gets NaN mean and std. An infinite PSNR makes the mean inf and the std NaN.
    """
    if not metrics:
        raise ValueError("no cases to summarise")
    per_case = [m.scalars() for m in metrics]
    out: dict[str, dict[str, float]] = {}
    for name in per_case[0]:
        values = np.array([s[name] for s in per_case], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            out[name] = {"mean": math.nan, "std": math.nan, "n": 0.0}
            continue
        with np.errstate(invalid="ignore"):
            out[name] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=0)),
                "n": float(values.size),
            }
    return out
