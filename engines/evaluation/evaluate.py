"""Evaluation runs: the model (and the non-learned baseline) against CT on held-out phantoms or DICOM pairs.

Held-out phantoms are subjects ``EVALUATION_SEED_BASE + i`` scanned with the seed protocol exactly (the protocol
the model is validated for); a seed the manifest lists as a training subject is refused.

For a model with a confidence section every case also gets its out-of-domain figures (``out_of_domain.py``); with
``pathologies`` each seed is run once per pathology and once normal (its twin, same seed), so every object's
score can be held against the same voxels without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.evaluation.baseline import intensity_inversion
from engines.evaluation.metrics import (
    SctMetrics,
    compute_metrics,
    masks_from_ct,
    masks_from_labels,
    summarise,
)
from engines.evaluation.out_of_domain import (
    OutOfDomainCase,
    assess_case,
    format_out_of_domain,
    summarise_out_of_domain,
)
from engines.inference.engine import SctEngine
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.phantom.pathology import Pathology, parse_pathologies
from engines.scanner.readback import read_ct_series
from engines.training.recipe import EVALUATION_SEED_BASE

#: Largest difference between the sCT and CT voxel-to-patient matrices accepted for a DICOM pair, mm.
AFFINE_TOLERANCE_MM = 1e-3

BASELINE_NAME = "intensity inversion (body median -> 40 HU, body p95 -> -100 HU, last echo)"


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    model: SctMetrics
    baseline: SctMetrics | None
    inference_s: float
    #: The confidence's verdict (None: the model has no confidence, or a DICOM pair).
    out_of_domain: OutOfDomainCase | None = None
    #: Pathologies of the phantom (() for a normal one).
    pathologies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    model: str
    backend: dict[str, Any]
    source: str
    cases: tuple[CaseResult, ...]
    notes: tuple[str, ...] = field(default=())
    #: With pathologies: the normal twin of each seed (its confidence figures are the normal ones).
    twins: tuple[CaseResult, ...] = field(default=())
    #: The model's confidence threshold and minimum region, when it has a confidence.
    confidence: dict[str, Any] | None = None

    @property
    def summary(self) -> dict[str, dict[str, float]]:
        return summarise([c.model for c in self.cases])

    @property
    def out_of_domain_summary(self) -> dict[str, dict[str, Any]]:
        """Confidence figures per set: ``normal`` (normal cases, or the twins of pathological ones) and one entry
        per pathology; empty without confidence."""
        groups: dict[str, list[OutOfDomainCase]] = {}
        for case in (*self.cases, *self.twins):
            if case.out_of_domain is not None:
                groups.setdefault("+".join(case.pathologies) or "normal", []).append(case.out_of_domain)
        return {name: summarise_out_of_domain(group) for name, group in groups.items()}

    @property
    def baseline_summary(self) -> dict[str, dict[str, float]] | None:
        base = [c.baseline for c in self.cases if c.baseline is not None]
        return summarise(base) if base else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "source": self.source,
            "mask_definition": self.cases[0].model.mask_definition if self.cases else "",
            "summary": _json_summary(self.summary),
            "baseline": (
                {"method": BASELINE_NAME, "summary": _json_summary(self.baseline_summary)}
                if self.baseline_summary
                else None
            ),
            "cases": [_case_dict(c) for c in self.cases],
            "notes": list(self.notes),
            **(
                {
                    "confidence": self.confidence,
                    "out_of_domain": self.out_of_domain_summary,
                    "normal_twins": [_case_dict(c) for c in self.twins],
                }
                if self.confidence is not None
                else {}
            ),
        }


def _case_dict(case: CaseResult) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": case.name,
        "inference_s": round(case.inference_s, 3),
        "model": case.model.to_dict(),
        "baseline": case.baseline.to_dict() if case.baseline else None,
    }
    if case.pathologies:
        data["pathologies"] = list(case.pathologies)
    if case.out_of_domain is not None:
        data["out_of_domain"] = case.out_of_domain.to_dict()
    return data


def evaluation_seeds(count: int) -> list[int]:
    return [EVALUATION_SEED_BASE + i for i in range(count)]


def check_held_out(engine: SctEngine, seeds: Sequence[int]) -> None:
    """Refuse seeds the manifest records as training (or validation) subjects."""
    used: set[int] = set()
    for key in ("training_seeds", "validation_seeds"):
        span = engine.manifest.training.get(key) or engine.manifest.validation.get(key)
        if isinstance(span, list) and len(span) == 2:
            used.update(range(int(span[0]), int(span[1]) + 1))
    clash = sorted(set(seeds) & used)
    if clash:
        raise ValueError(f"phantom seeds {clash[:5]} were used to train or validate {engine.manifest.label}")


def evaluate_phantoms(
    engine: SctEngine,
    seeds: Sequence[int],
    *,
    progress: Callable[[str], None] | None = None,
    pathologies: Sequence[Pathology | str] = (),
) -> EvaluationReport:
    """Held-out phantoms ``seeds``: normal ones, or with ``pathologies`` one case per seed and pathology (HU
    metrics over those) plus each seed's normal twin (confidence figures only)."""
    check_held_out(engine, seeds)
    wanted = parse_pathologies(pathologies)
    results: list[CaseResult] = []
    twins: list[CaseResult] = []
    for seed in seeds:
        normal, confidence = _evaluate_case(engine, seed, (), None, progress)
        (twins if wanted else results).append(normal)
        for pathology in wanted:
            results.append(_evaluate_case(engine, seed, (pathology,), confidence, progress)[0])
    kinds = f" with {', '.join(p.value for p in wanted)}" if wanted else ""
    return EvaluationReport(
        model=engine.manifest.label,
        backend=_backend_dict(engine),
        source=f"{len(seeds)} held-out phantoms{kinds}, seeds {seeds[0]}..{seeds[-1]}, seed protocol",
        cases=tuple(results),
        twins=tuple(twins),
        confidence=(
            {"threshold": engine.confidence.threshold, "min_region_mm3": engine.confidence.min_region_mm3}
            if engine.confidence is not None
            else None
        ),
    )


def _evaluate_case(
    engine: SctEngine,
    seed: int,
    pathologies: tuple[Pathology, ...],
    twin_confidence: npt.NDArray[np.uint8] | None,
    progress: Callable[[str], None] | None,
) -> tuple[CaseResult, npt.NDArray[np.uint8] | None]:
    """One phantom through the engine: HU metrics, and out-of-domain figures where the model has confidence."""
    case = generate_case(seed, SEED_PROTOCOL, pathologies=pathologies)
    started = time.perf_counter()
    confidence: npt.NDArray[np.uint8] | None = None
    if engine.confidence is not None:
        sct, confidence = engine.infer_volume_with_confidence(case.echoes)
    else:
        sct = engine.infer_volume(case.echoes)
    elapsed = time.perf_counter() - started
    masks = masks_from_labels(case.labels)
    model = compute_metrics(sct, case.ct_hu, masks)
    baseline = compute_metrics(intensity_inversion(case.echoes), case.ct_hu, masks)
    verdict = None
    if confidence is not None and engine.confidence is not None:
        verdict = assess_case(
            confidence,
            engine.confidence,
            case.geometry.spacing,
            case.labels,
            anomaly=case.anomaly if pathologies else None,
            object_names=[(o.name, o.kind.value) for o in case.anomaly_objects],
            twin_confidence=twin_confidence,
        )
    kinds = ", ".join(p.value for p in pathologies)
    name = f"phantom seed {seed}" + (f" with {kinds}" if kinds else "")
    if progress:
        flags = ""
        if verdict is not None:
            found = sum(o.detected for o in verdict.objects)
            flags = f", {verdict.flagged_regions} flagged region(s) {verdict.flagged_ml:.2f} ml" + (
                f", {found}/{len(verdict.objects)} objects found" if verdict.objects else ""
            )
        progress(
            f"{name}: MAE {model.mae_hu:.1f} HU (baseline {baseline.mae_hu:.1f}), "
            f"bone Dice@200 {model.bone_dice['200']:.3f}{flags}, {elapsed:.1f} s"
        )
    result = CaseResult(name, model, baseline, elapsed, verdict, tuple(p.value for p in pathologies))
    return result, confidence


def evaluate_dicom(sct_dir: Path, ct_dir: Path, model_label: str = "(from DICOM)") -> EvaluationReport:
    """Compare an sCT series with a CT series on the same grid (masks from CT HU ranges)."""
    sct = read_ct_series(sct_dir)
    ct = read_ct_series(ct_dir)
    if sct.hu.shape != ct.hu.shape:
        raise ValueError(f"sCT grid {sct.hu.shape} differs from CT grid {ct.hu.shape}; register them first")
    delta = float(np.abs(sct.geometry.affine - ct.geometry.affine).max())
    if delta > AFFINE_TOLERANCE_MM:
        raise ValueError(
            f"sCT and CT voxel-to-patient matrices differ by {delta:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm)"
        )
    metrics = compute_metrics(sct.hu, ct.hu, masks_from_ct(ct.hu))
    return EvaluationReport(
        model=model_label,
        backend={},
        source=f"DICOM sCT {sct_dir} vs CT {ct_dir}",
        cases=(CaseResult(sct_dir.name, metrics, None, 0.0),),
        notes=("no baseline: it needs the MR echoes",),
    )


def _backend_dict(engine: SctEngine) -> dict[str, Any]:
    info = engine.info
    return {"backend": info.backend, "precision": info.precision, "device": info.device}


def _json_summary(summary: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float | None]]:
    if summary is None:
        return {}
    return {
        name: {k: (round(v, 4) if np.isfinite(v) else None) for k, v in stats.items()}
        for name, stats in summary.items()
    }


#: Rows of the human-readable table: (label, flat metric name, format).
TABLE_ROWS = (
    ("MAE body (HU)", "mae_hu", ".1f"),
    ("ME body, CT-sCT (HU)", "me_hu", "+.1f"),
    ("MAE cortical bone (HU)", "mae_by_tissue.cortical_bone", ".1f"),
    ("MAE trabecular bone (HU)", "mae_by_tissue.trabecular_bone", ".1f"),
    ("MAE soft tissue (HU)", "mae_by_tissue.soft_tissue", ".1f"),
    ("MAE fat (HU)", "mae_by_tissue.fat", ".1f"),
    ("bone Dice @150 HU", "bone_dice.150", ".3f"),
    ("bone Dice @200 HU", "bone_dice.200", ".3f"),
    ("bone Dice @250 HU", "bone_dice.250", ".3f"),
    ("Bambach precision", "bambach_precision", ".3f"),
    ("Bambach recall", "bambach_recall", ".3f"),
    ("Bambach Dice", "bambach_dice", ".3f"),
    ("PSNR (dB)", "psnr_db", ".2f"),
)


def format_table(report: EvaluationReport) -> str:
    """Markdown table: metric | model mean ± sd | baseline mean ± sd."""
    base = report.baseline_summary
    lines = [
        f"{report.model} on {report.source}",
        "",
        "| metric | model | baseline |" if base else "| metric | model |",
        "|---|---|---|" if base else "|---|---|",
    ]
    for label, key, fmt in TABLE_ROWS:
        row = f"| {label} | {_cell(report.summary, key, fmt)} |"
        if base:
            row += f" {_cell(base, key, fmt)} |"
        lines.append(row)
    if base:
        lines.append("")
        lines.append(f"baseline: {BASELINE_NAME}")
    if report.cases:
        lines.append(f"masks: {report.cases[0].model.mask_definition}")
    lines.extend(format_out_of_domain(report.out_of_domain_summary, report.confidence))
    lines.extend(report.notes)
    return "\n".join(lines)


def _cell(summary: dict[str, dict[str, float]], key: str, fmt: str) -> str:
    stats = summary.get(key)
    if not stats or not np.isfinite(stats["mean"]):
        return "n/a"
    return f"{stats['mean']:{fmt}} ± {stats['std']:{fmt.lstrip('+')}}"
