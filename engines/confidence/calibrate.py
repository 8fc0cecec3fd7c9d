"""Calibration of the confidence on normal *validation* phantoms: fit the feature statistics, choose the threshold.

Two passes over disjoint normal validation subjects (seeds 800000 and up; never the evaluation seeds 900000 and
up, on which ``sct-agent evaluate`` measures the result):

1. **Fit** (``fit_seeds``): the features of each tapped level over whole volumes, slab by slab as the engine
   computes them; a random sample of voxels per subject, from blocks where the sCT of the same pass is right
   (at most :data:`FIT_WRONG_SHARE` of their voxels off the phantom's CT by more than :data:`WRONG_HU`); per level a tied-covariance Gaussian mixture
   (``density.fit_tap``). The median raw score of the samples is the level's "typical" (confidence 255), and its
   :data:`SPAN_QUANTILE` quantile sets the level's scale, so that the levels' scores are comparable.
2. **Threshold** (``check_seeds``): the combined score ``b = max over levels of ln(score / median) / ln(q / median)``
   on every voxel of other normal subjects, exactly as the network's head computes it (same windows, same
   upsampling), outside the field-of-view margin the region search skips (``regions.searched_mask``). For each
   subject the *series score* is the largest ``b`` at which it would still show a *false* flag: a region of
   ``min_region_mm3`` in which the sCT is in fact right (fewer than half its voxels off the phantom's CT by more
   than :data:`WRONG_HU`). A region where the sCT is wrong is a flag the confidence should raise, even on a
   normal subject (the shipped model maps bowel gas to bone in places), so it does not push the threshold up. The operating point ``beta`` is the larger of the highest series score seen and a
   normal tail fitted to the series scores at :data:`SERIES_FALSE_FLAG_RATE` (so calibration subjects are never
   flagged and a held-out normal subject is flagged at that stated rate), times :data:`BETA_MARGIN`.

The uint8 mapping is then ``confidence = 255 - (255 - threshold) * b / beta``, clipped: 255 at or below the median,
exactly ``threshold`` at the operating point, 0 at about twice its distance. Each level's ``slope`` buffer holds
``(255 - threshold) / (beta * ln(q / median))``. The statistics file and the manifest's ``confidence`` section are
written into the model folder; the weights are not touched.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from scipy import ndimage

from engines.confidence.density import METHOD, FeatureDensity, TapDensity, fit_tap, set_mapping, tap_levels
from engines.confidence.features import block_fraction, volume_levels
from engines.confidence.input_features import CONTEXTS, INPUT_TAP, Context, slice_reach
from engines.confidence.regions import FOV_MARGIN_MM, searched_mask
from engines.confidence.spec import CONFIDENCE_MAX, ConfidenceSpec
from engines.inference.engine import network_input, to_hu
from engines.inference.slabs import SlabPlan
from engines.model.manifest import MANIFEST_NAME, ModelManifest, sha256_of
from engines.model.unet import LightUNet3d
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.training.recipe import VALIDATION_SEED_BASE

F32 = npt.NDArray[np.float32]

#: File of the fitted statistics in the model folder (a torch state dict of tensors, loaded weights-only).
STATISTICS_FILE = "confidence.pt"
#: Levels whose features are modelled (docs/model.md, Confidence: chosen by measurement).
DEFAULT_TAPS = (INPUT_TAP,)
#: Gaussian components per level.
DEFAULT_COMPONENTS = 64
#: Voxels sampled per fit subject and level (all of them where the level has fewer).
SAMPLES_PER_SUBJECT = 40_000
#: Quantile of the fit samples' scores that scales each level (comparable levels).
SPAN_QUANTILE = 0.999
#: The threshold in confidence units: voxels below it are not trusted. 128 puts the operating point mid-range.
DEFAULT_THRESHOLD = 128
#: Connected untrusted regions smaller than this are not flagged, mm³ (0.05 ml, a sphere of 4.6 mm: the smallest
#: calcified lesion the pathology phantom makes is 5 mm across).
DEFAULT_MIN_REGION_MM3 = 50.0
#: Stated share of normal series flagged at the operating point (one-sided normal tail of the series scores).
SERIES_FALSE_FLAG_RATE = 0.01
#: Multiplies the operating point: a margin against subjects unlike the few calibration ones. 1: the normal tail
#: fitted at SERIES_FALSE_FLAG_RATE is the margin (measured: with 1.1 on top, pedicle screws went unflagged).
BETA_MARGIN = 1.0
#: Validation subjects fitted on and checked on by default (disjoint; evaluation seeds are never used).
DEFAULT_FIT_SEEDS = tuple(VALIDATION_SEED_BASE + i for i in range(8))
DEFAULT_CHECK_SEEDS = tuple(VALIDATION_SEED_BASE + 8 + i for i in range(8))
#: A voxel whose sCT is off the phantom's CT by more than this is wrong (HU): a region mostly of such voxels is a
#: right flag, not a false one (module docstring).
WRONG_HU = 300.0
#: Fit samples come from blocks with at most this share of wrong voxels: the density describes where the model is
#: right, so that its failures on normal anatomy (bowel gas) stay unusual rather than being learnt as typical.
FIT_WRONG_SHARE = 0.05
#: Resolution of the series-score search (combined-score units; the operating point is ~1-3).
_SCORE_RESOLUTION = 0.005
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True, slots=True)
class CalibrationSettings:
    taps: tuple[str, ...] = DEFAULT_TAPS
    components: int = DEFAULT_COMPONENTS
    fit_seeds: tuple[int, ...] = DEFAULT_FIT_SEEDS
    check_seeds: tuple[int, ...] = DEFAULT_CHECK_SEEDS
    threshold: int = DEFAULT_THRESHOLD
    min_region_mm3: float = DEFAULT_MIN_REGION_MM3
    samples_per_subject: int = SAMPLES_PER_SUBJECT
    seed: int = 2027
    #: Neighbourhoods of the input statistics, (slices, rows, columns) in blocks; saved with the statistics.
    contexts: tuple[Context, ...] = CONTEXTS

    def __post_init__(self) -> None:
        clash = sorted(set(self.fit_seeds) & set(self.check_seeds))
        if clash:
            raise ValueError(
                f"calibration: seeds {clash} are both fitted on and checked on; expected disjoint sets"
            )
        if not self.fit_seeds or not self.check_seeds:
            raise ValueError("calibration: needs at least one fit and one check subject")
        if (
            min(*self.fit_seeds, *self.check_seeds) < VALIDATION_SEED_BASE
            or max(*self.fit_seeds, *self.check_seeds) >= VALIDATION_SEED_BASE + 100_000
        ):
            raise ValueError(
                f"calibration: seeds must be validation subjects {VALIDATION_SEED_BASE}..{VALIDATION_SEED_BASE + 99_999}"
            )


@dataclass(frozen=True, slots=True)
class SeriesCheck:
    """One normal check subject at the chosen operating point."""

    seed: int
    #: Largest combined score at which the subject would show a false flag (its series score).
    series_score: float
    flagged_ml: float
    bone_ml: float
    #: Of the flagged volume, the regions where the sCT is in fact wrong (right flags), ml.
    right_flag_ml: float = 0.0


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    spec: ConfidenceSpec
    head: FeatureDensity
    checks: tuple[SeriesCheck, ...] = field(default=())


def calibrate_model(
    folder: Path,
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    threads: int | None = None,
    report: Callable[[str], None] = print,
) -> ModelManifest:
    """Calibrate the model in ``folder`` and write its statistics file and manifest ``confidence`` section."""
    manifest = ModelManifest.load(folder)
    if threads:
        torch.set_num_threads(threads)
    result = calibrate(manifest, settings, report=report)
    path = folder / (result.spec.statistics_file or STATISTICS_FILE)
    partial = path.with_suffix(".partial")
    torch.save(result.head.state_dict(), partial)
    partial.replace(path)
    spec = ConfidenceSpec(
        method=result.spec.method,
        threshold=result.spec.threshold,
        min_region_mm3=result.spec.min_region_mm3,
        calibration=result.spec.calibration,
        statistics_file=path.name,
        statistics_sha256=sha256_of(path),
    )
    data = {**manifest.to_dict(), "confidence": spec.to_dict()}
    ModelManifest.from_dict(folder, data).write()
    report(
        f"confidence calibrated: {path.name} sha256 {spec.statistics_sha256[:16]}..., written to {MANIFEST_NAME}"
    )
    return ModelManifest.load(folder)


def calibrate(
    manifest: ModelManifest,
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    report: Callable[[str], None] = print,
) -> CalibrationResult:
    """Fit and threshold (module docstring); nothing is written."""
    started = time.perf_counter()
    levels = tap_levels(manifest.architecture)
    unknown = [t for t in settings.taps if t not in levels]
    if unknown:
        raise ValueError(f"calibration: levels {unknown} do not exist; this network has {sorted(levels)}")
    if INPUT_TAP in settings.taps and slice_reach(settings.contexts) > manifest.slab.halo:
        raise ValueError(
            f"calibration: contexts {settings.contexts} read {slice_reach(settings.contexts)} slices on each side; "
            f"expected at most the slab halo, {manifest.slab.halo} (a shallower neighbourhood across slices)"
        )
    unet = manifest.build_unet()
    rng = np.random.default_rng(settings.seed)
    samples: dict[str, list[F32]] = {t: [] for t in settings.taps}
    for seed in settings.fit_seeds:
        t0 = time.perf_counter()
        case = generate_case(seed, SEED_PROTOCOL)
        hu = np.empty(case.ct_hu.shape, dtype=np.float32)
        wrong = None
        stitched = volume_levels(
            manifest, unet, case.echoes, settings.taps, hu_out=hu, contexts=settings.contexts
        )
        for name, features in stitched.items():
            if wrong is None:
                wrong = np.abs(hu - case.ct_hu) > WRONG_HU
            right = block_fraction(wrong, levels[name][1], features.shape[1:]).ravel() <= FIT_WRONG_SHARE
            flat = features.reshape(features.shape[0], -1).T
            usable = np.flatnonzero(right)
            take = min(settings.samples_per_subject, usable.size)
            samples[name].append(np.ascontiguousarray(flat[rng.choice(usable, take, replace=False)]))
        report(
            f"confidence fit: subject {seed} sampled, {100 * float(np.mean(wrong)) if wrong is not None else 0:.2f} % "
            f"of voxels off by > {WRONG_HU:g} HU left out ({time.perf_counter() - t0:.0f} s)"
        )
    taps: dict[str, TapDensity] = {}
    spans: dict[str, tuple[float, float]] = {}
    for name in settings.taps:
        tap, fitted = fit_tap(
            np.concatenate(samples[name]),
            settings.components,
            levels[name][1],
            settings.seed,
            name=name,
            contexts=settings.contexts,
        )
        median = float(np.median(fitted))
        quantile = float(np.quantile(fitted, SPAN_QUANTILE))
        spans[name] = (median, quantile)
        # Provisional mapping: b = ln(score / median) / ln(q / median), read back by _combined_score.
        set_mapping(tap, median, 1.0 / math.log(quantile / median))
        taps[name] = tap
        report(f"confidence fit: level {name}: median score {median:.3f}, q{SPAN_QUANTILE:g} {quantile:.3f}")
    head = FeatureDensity(taps).eval()

    maps: list[tuple[int, F32, float, npt.NDArray[np.bool_]]] = []
    voxel_mm3 = float(np.prod(manifest.spacing_mm))
    scores: list[float] = []
    for seed in settings.check_seeds:
        t0 = time.perf_counter()
        case = generate_case(seed, SEED_PROTOCOL)
        score, hu = combined_score(manifest, unet, head, case.echoes)
        score[~searched_mask(score.shape, manifest.spacing_mm)] = -np.inf
        wrong = np.abs(hu - case.ct_hu) > WRONG_HU
        bone_ml = float(np.isin(case.labels, _bone_labels()).sum()) * voxel_mm3 / 1000
        maps.append((seed, score, bone_ml, wrong))
        scores.append(series_score(score, settings.min_region_mm3, voxel_mm3, wrong))
        report(
            f"confidence check: subject {seed} series score {scores[-1]:.3f} ({time.perf_counter() - t0:.0f} s)"
        )
    beta = operating_point(scores)
    for name, tap in taps.items():
        median, quantile = spans[name]
        set_mapping(tap, median, (CONFIDENCE_MAX - settings.threshold) / (beta * math.log(quantile / median)))
    checks = tuple(
        SeriesCheck(
            seed,
            round(value, 4),
            round(flagged_volume_ml(score, beta, settings.min_region_mm3, voxel_mm3), 3),
            round(bone_ml, 2),
            round(flagged_volume_ml(score, beta, settings.min_region_mm3, voxel_mm3, wrong, right=True), 3),
        )
        for (seed, score, bone_ml, wrong), value in zip(maps, scores, strict=True)
    )
    report(
        f"confidence threshold: operating point {beta:.3f} (series scores {', '.join(f'{s:.2f}' for s in scores)}); "
        f"{time.perf_counter() - started:.0f} s"
    )
    calibration: dict[str, Any] = {
        "data": "normal validation phantoms at the seed protocol",
        "fit_seeds": list(settings.fit_seeds),
        "check_seeds": list(settings.check_seeds),
        "levels": {
            name: {
                "channels": taps[name].channels,
                "stride": levels[name][1],
                "components": settings.components,
                **({"contexts": [list(c) for c in settings.contexts]} if name == INPUT_TAP else {}),
                "median_score": round(spans[name][0], 5),
                f"q{SPAN_QUANTILE:g}_score": round(spans[name][1], 5),
            }
            for name in settings.taps
        },
        "samples_per_subject": settings.samples_per_subject,
        "mapping": "confidence = 255 - (255 - threshold) * b / operating_point, clipped to 0..255; "
        "b = max over levels of ln(score / median) / ln(q / median)",
        "operating_point": round(beta, 4),
        "series_false_flag_rate": SERIES_FALSE_FLAG_RATE,
        "wrong_hu": WRONG_HU,
        "fit_wrong_share": FIT_WRONG_SHARE,
        "fov_margin_mm": FOV_MARGIN_MM,
        "margin": BETA_MARGIN,
        "check_series": [
            {
                "seed": c.seed,
                "series_score": c.series_score,
                "flagged_ml": c.flagged_ml,
                "right_flag_ml": c.right_flag_ml,
                "bone_ml": c.bone_ml,
            }
            for c in checks
        ],
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    spec = ConfidenceSpec(
        method=METHOD,
        threshold=settings.threshold,
        min_region_mm3=settings.min_region_mm3,
        calibration=calibration,
        statistics_file=STATISTICS_FILE,
        statistics_sha256="0" * 64,  # replaced by the file's hash when written
    )
    return CalibrationResult(spec=spec, head=head, checks=checks)


def operating_point(series_scores: Sequence[float]) -> float:
    """The combined score at which normal series are flagged at :data:`SERIES_FALSE_FLAG_RATE` (module docs)."""
    highest = max(series_scores)
    if len(series_scores) > 1:
        z = statistics.NormalDist().inv_cdf(1.0 - SERIES_FALSE_FLAG_RATE)
        tail = statistics.fmean(series_scores) + z * statistics.stdev(series_scores)
        highest = max(highest, tail)
    return float(highest * BETA_MARGIN)


def combined_score(
    manifest: ModelManifest, unet: LightUNet3d, head: FeatureDensity, echoes: npt.NDArray[Any]
) -> tuple[F32, F32]:
    """``b`` per voxel ``[S, rows, cols]``: the head's combined score before the uint8 mapping, slab by slab as the
    engine computes it, and the sCT in HU of the same pass. Reads the provisional mapping (each level's slope =
    1 / ln(q / median))."""
    plan = SlabPlan.for_volume(echoes.shape[1], manifest.slab.depth, manifest.slab.halo)
    scale = manifest.normalisation.scale(echoes)
    rows, cols = echoes.shape[-2:]
    out = np.empty(echoes.shape[1:], dtype=np.float32)
    hu = np.empty(echoes.shape[1:], dtype=np.float32)
    for window in plan.windows:
        x = torch.from_numpy(network_input(manifest, echoes, plan.slice_indices(window), scale))[None]
        with torch.inference_mode():
            raw, features = unet.forward_levels(x)
            features[INPUT_TAP] = x
            combined: torch.Tensor | None = None
            for name, tap in head.taps.items():
                assert isinstance(tap, TapDensity)
                b = CONFIDENCE_MAX - tap.confidence(features[name])
                if tap.stride_value > 1:
                    b = F.interpolate(b, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
                combined = b if combined is None else torch.maximum(combined, b)
        assert combined is not None
        core = window.core_stop - window.core_start
        out[window.core_start : window.core_stop] = combined[0, 0, plan.halo : plan.halo + core, :rows, :cols]
        hu[window.core_start : window.core_stop] = to_hu(
            manifest, raw[0, 0, plan.halo : plan.halo + core, :rows, :cols].float().numpy()
        )
    return out, hu


def series_score(
    score: F32, min_region_mm3: float, voxel_mm3: float, wrong: npt.NDArray[np.bool_] | None = None
) -> float:
    """The highest operating point at which ``score`` still has a false flag: connected voxels above it of at
    least ``min_region_mm3`` where the sCT is right (``wrong``: voxels where it is not; None: all right). Regions
    only shrink as the point rises, so it is found by bisection."""
    finite = score[np.isfinite(score)]
    if finite.size == 0:
        return 0.0
    low, high = float(np.min(finite)), float(np.max(finite))
    if _largest_false_region_mm3(score, low, voxel_mm3, wrong) < min_region_mm3:
        return low
    while high - low > _SCORE_RESOLUTION:
        middle = (low + high) / 2
        if _largest_false_region_mm3(score, middle, voxel_mm3, wrong) >= min_region_mm3:
            low = middle
        else:
            high = middle
    return low


def flagged_volume_ml(
    score: F32,
    beta: float,
    min_region_mm3: float,
    voxel_mm3: float,
    wrong: npt.NDArray[np.bool_] | None = None,
    *,
    right: bool = False,
) -> float:
    """Volume of the regions flagged at operating point ``beta``, ml; with ``right``, only those where the sCT is
    wrong (right flags)."""
    sizes, wrong_share = _regions(score, beta, voxel_mm3, wrong)
    keep = sizes >= min_region_mm3
    if right:
        keep &= wrong_share >= 0.5
    return float(sizes[keep].sum()) / 1000


def _largest_false_region_mm3(
    score: F32, beta: float, voxel_mm3: float, wrong: npt.NDArray[np.bool_] | None
) -> float:
    sizes, wrong_share = _regions(score, beta, voxel_mm3, wrong)
    false = sizes[wrong_share < 0.5]
    return float(false.max()) if false.size else 0.0


def _regions(
    score: F32, beta: float, voxel_mm3: float, wrong: npt.NDArray[np.bool_] | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per region above ``beta``: its volume (mm³) and the share of its voxels where the sCT is wrong."""
    labels, count = ndimage.label(score > beta, structure=_CONNECTIVITY)
    counts = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    if wrong is None:
        share = np.zeros(count)
    else:
        share = np.bincount(labels.ravel(), weights=wrong.ravel(), minlength=count + 1)[1:] / np.maximum(
            counts, 1
        )
    return np.asarray(counts * voxel_mm3, dtype=np.float64), np.asarray(share, dtype=np.float64)


def _bone_labels() -> list[int]:
    from engines.phantom.tissues import CORTICAL_TISSUES, TRABECULAR_TISSUES  # noqa: PLC0415

    return sorted(int(t) for t in CORTICAL_TISSUES | TRABECULAR_TISSUES)
