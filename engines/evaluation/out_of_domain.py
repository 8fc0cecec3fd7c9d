"""Out-of-domain figures of the confidence: what it flags on normal phantoms, what it finds on pathological ones.

Definitions (docs/model.md, Confidence), all from the uint8 confidence the engine publishes and the flagged regions
the agent reports (``find_flagged_regions`` with the manifest's threshold and minimum region):

- **flagged share of bone**: flagged volume (all flagged regions, anywhere) divided by the bone volume (cortical and
  trabecular labels): the issue's "flagged volume ≤ 1 % of bone voxels". **Any flag**: the series shows at least
  one flagged region (the issue's target: no flag on ≥ 95 % of normal series).
- **object detected**: a flagged region overlaps the object's footprint (the phantom's ``anomaly`` label of it);
  **region-level sensitivity** = detected objects / objects.
- **region AUROC**: each object's score (the 95th percentile of ``255 - confidence`` inside its footprint) on the
  pathological case against the same voxels' score on the normal twin (same seed, no pathology); the probability
  that an object outscores its normal counterpart, over all pairs (Mann-Whitney, ties count half).
- **flagged outside objects**: flagged volume not overlapping any object's footprint, ml.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.confidence.regions import MM3_PER_ML, find_flagged_regions
from engines.confidence.spec import CONFIDENCE_MAX, ConfidenceSpec
from engines.phantom.tissues import CORTICAL_TISSUES, TRABECULAR_TISSUES

U8 = npt.NDArray[np.uint8]
#: Percentile of ``255 - confidence`` in a footprint that scores an object: high, so a small untrusted core of a
#: large footprint counts, yet not the single lowest voxel.
OBJECT_SCORE_PERCENTILE = 95.0
_BONE_LABELS = np.array(sorted(int(t) for t in CORTICAL_TISSUES | TRABECULAR_TISSUES), dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class ObjectResult:
    """One pathological object (the phantom's anomaly label ``label``) against the flagged regions."""

    label: int
    name: str
    kind: str
    volume_ml: float
    detected: bool
    #: 95th percentile of 255 - confidence in the footprint on the pathological case and on its normal twin.
    score: float
    twin_score: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "name": self.name,
            "kind": self.kind,
            "volume_ml": round(self.volume_ml, 4),
            "detected": self.detected,
            "score": round(self.score, 2),
            "twin_score": None if self.twin_score is None else round(self.twin_score, 2),
        }


@dataclass(frozen=True, slots=True)
class OutOfDomainCase:
    """The confidence's verdict on one case."""

    flagged_regions: int
    flagged_ml: float
    bone_ml: float
    #: Lowest confidence in the volume (0..255).
    min_confidence: int
    #: Flagged slices as merged [start, stop) spans (what the status reason names).
    slice_spans: tuple[tuple[int, int], ...]
    objects: tuple[ObjectResult, ...] = field(default=())
    flagged_outside_objects_ml: float = 0.0

    @property
    def any_flagged(self) -> bool:
        return self.flagged_regions > 0

    @property
    def flagged_bone_share(self) -> float:
        """Flagged volume as a share of the bone volume (0..; may exceed 1 for a flagged region outside bone)."""
        return self.flagged_ml / self.bone_ml if self.bone_ml > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "flagged_regions": self.flagged_regions,
            "any_flagged": self.any_flagged,
            "flagged_ml": round(self.flagged_ml, 4),
            "bone_ml": round(self.bone_ml, 2),
            "flagged_bone_share": round(self.flagged_bone_share, 6),
            "min_confidence": self.min_confidence,
            "flagged_slices": [list(span) for span in self.slice_spans],
        }
        if self.objects:
            data["objects"] = [o.to_dict() for o in self.objects]
            data["flagged_outside_objects_ml"] = round(self.flagged_outside_objects_ml, 4)
        return data


def assess_case(
    confidence: U8,
    spec: ConfidenceSpec,
    spacing_mm: tuple[float, float, float],
    labels: npt.NDArray[np.uint8],
    *,
    anomaly: npt.NDArray[np.uint8] | None = None,
    object_names: Sequence[tuple[str, str]] = (),
    twin_confidence: U8 | None = None,
) -> OutOfDomainCase:
    """The figures of one case; ``anomaly`` (0 = normal, k = the k-th object, named by ``object_names[k-1]`` as
    (name, kind)) and the normal twin's confidence for a pathological case."""
    regions = find_flagged_regions(confidence, spec, spacing_mm)
    voxel_ml = float(np.prod(spacing_mm)) / MM3_PER_ML
    bone_ml = float(np.isin(labels, _BONE_LABELS).sum()) * voxel_ml
    objects: list[ObjectResult] = []
    outside_ml = regions.volume_ml
    if anomaly is not None and anomaly.any():
        flagged = regions.mask
        count = int(anomaly.max())
        untrusted = CONFIDENCE_MAX - confidence.astype(np.float32)
        twin_untrusted = (
            None if twin_confidence is None else CONFIDENCE_MAX - twin_confidence.astype(np.float32)
        )
        hit_labels = np.unique(regions.labels[anomaly > 0])
        hit_labels = hit_labels[hit_labels > 0]
        outside_ml = sum(r.volume_ml for r in regions.regions if r.index not in set(hit_labels.tolist()))
        for k in range(1, count + 1):
            footprint = anomaly == k
            if not footprint.any():
                continue
            name, kind = object_names[k - 1] if k - 1 < len(object_names) else (f"object {k}", "")
            objects.append(
                ObjectResult(
                    label=k,
                    name=name,
                    kind=kind,
                    volume_ml=float(footprint.sum()) * voxel_ml,
                    detected=bool(flagged[footprint].any()),
                    score=float(np.percentile(untrusted[footprint], OBJECT_SCORE_PERCENTILE)),
                    twin_score=(
                        None
                        if twin_untrusted is None
                        else float(np.percentile(twin_untrusted[footprint], OBJECT_SCORE_PERCENTILE))
                    ),
                )
            )
    return OutOfDomainCase(
        flagged_regions=len(regions.regions),
        flagged_ml=regions.volume_ml,
        bone_ml=bone_ml,
        min_confidence=int(confidence.min()) if confidence.size else CONFIDENCE_MAX,
        slice_spans=regions.slice_spans,
        objects=tuple(objects),
        flagged_outside_objects_ml=float(outside_ml),
    )


def region_auroc(scores: Sequence[float], twin_scores: Sequence[float]) -> float:
    """P(object score > normal twin score) over all pairs, ties half (NaN without both)."""
    if not scores or not twin_scores:
        return math.nan
    pos = np.asarray(scores, dtype=np.float64)[:, None]
    neg = np.asarray(twin_scores, dtype=np.float64)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def summarise_out_of_domain(cases: Sequence[OutOfDomainCase]) -> dict[str, Any]:
    """Per-set figures: for normal cases the flag rates; with objects, sensitivity, AUROC, flags outside."""
    if not cases:
        return {}
    shares = [c.flagged_bone_share for c in cases]
    summary: dict[str, Any] = {
        "series": len(cases),
        "series_with_flag": sum(c.any_flagged for c in cases),
        "share_of_series_without_flag": round(sum(not c.any_flagged for c in cases) / len(cases), 4),
        "flagged_bone_share": _stats(shares),
        "flagged_ml": _stats([c.flagged_ml for c in cases]),
    }
    objects = [o for c in cases for o in c.objects]
    if objects:
        twins = [o.twin_score for o in objects if o.twin_score is not None]
        summary.update(
            {
                "objects": len(objects),
                "objects_detected": sum(o.detected for o in objects),
                "region_sensitivity": round(sum(o.detected for o in objects) / len(objects), 4),
                "region_auroc": _rounded(region_auroc([o.score for o in objects], twins)),
                "flagged_outside_objects_ml": _stats([c.flagged_outside_objects_ml for c in cases]),
                "by_kind": {
                    kind: {
                        "objects": len(group),
                        "detected": sum(o.detected for o in group),
                        "region_sensitivity": round(sum(o.detected for o in group) / len(group), 4),
                        "region_auroc": _rounded(
                            region_auroc(
                                [o.score for o in group],
                                [o.twin_score for o in group if o.twin_score is not None],
                            )
                        ),
                    }
                    for kind in sorted({o.kind for o in objects})
                    for group in [[o for o in objects if o.kind == kind]]
                },
            }
        )
    return summary


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "max": None}
    return {
        "mean": _rounded(statistics.fmean(finite)),
        "std": _rounded(statistics.stdev(finite) if len(finite) > 1 else 0.0),
        "max": _rounded(max(finite)),
    }


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def format_out_of_domain(summary: dict[str, dict[str, Any]], confidence: dict[str, Any] | None) -> list[str]:
    """Markdown lines: one column per set (normal, then each pathology), the rows of the issue's targets."""
    if not summary or confidence is None:
        return []
    names = sorted(summary, key=lambda n: (n != "normal", n))
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("series", lambda s: str(s["series"])),
        ("series with a flagged region", lambda s: f"{s['series_with_flag']} of {s['series']}"),
        ("flagged volume / bone volume, mean (max)", lambda s: _share(s["flagged_bone_share"])),
        ("objects flagged (region-level sensitivity)", _objects),
        ("region AUROC vs normal twin", lambda s: _number(s.get("region_auroc"), ".3f")),
        (
            "flagged outside objects, ml (mean)",
            lambda s: _number((s.get("flagged_outside_objects_ml") or {}).get("mean"), ".2f"),
        ),
    ]
    lines = [
        "",
        f"Out of domain: confidence < {confidence['threshold']} in regions of >= {confidence['min_region_mm3']:g} mm³",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(summary[n]) for n in names) + " |")
    return lines


def _share(stats: dict[str, float | None]) -> str:
    mean, high = stats.get("mean"), stats.get("max")
    if mean is None or high is None:
        return "n/a"
    return f"{mean:.3%} ({high:.3%})"


def _objects(summary: dict[str, Any]) -> str:
    if "objects" not in summary:
        return "-"
    return f"{summary['objects_detected']} of {summary['objects']} ({summary['region_sensitivity']:.0%})"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
