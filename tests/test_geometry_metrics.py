"""Geometry in the evaluation: bone surface distance and vertebral measures, against answers known beforehand.

Surface distance: balls whose distances are known analytically, then a real phantom CT against itself and
against itself moved by one voxel, where the expected mean distance follows from the surface's own normals.
Vertebral measures: a real phantom CT against the phantom's own anatomy, painted along the very lines the method
measured on, exactly as the renderer paints it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import numpy.typing as npt
import pytest
from scipy.special import erf

from engines.evaluation.geometry import phantom_geometry, summarise_geometry
from engines.evaluation.metrics import masks_from_labels
from engines.evaluation.surface_distance import (
    FOV_MARGIN_MM,
    bone_interior_from_ct,
    bone_surface_distance,
    iso_surface_samples,
    weighted_percentile,
)
from engines.evaluation.vertebral_geometry import (
    LUMBAR_LEVELS,
    MEASURES,
    LevelComparison,
    VertebraPlacement,
    compare_levels,
    lumbar_placements,
    measure_lumbar,
    summarise_levels,
)
from engines.phantom.anatomy import Anatomy, build_anatomy
from engines.phantom.case import PhantomCase
from engines.phantom.spine import build_spine
from engines.phantom.tissues import CORTICAL_TISSUES, TRABECULAR_TISSUES

F64 = npt.NDArray[np.float64]

#: The seed protocol's voxel: (slice, row, column) spacing, mm.
SPACING = (0.9, 0.74, 0.74)
BALL_GRID = (60, 70, 70)
BALL_CENTRE = np.array([27.1, 25.3, 26.2])  # mm, off the grid's nodes on purpose
BALL_RADIUS_MM = 10.0
#: Edge width (Gaussian σ) of the synthetic balls, about the phantom CT's point spread and voxel together.
BALL_EDGE_SIGMA_MM = 0.5
#: The sampled ball's own 200 HU surface deviates from the sphere by up to 0.04 mm (linear interpolation of a
#: 0.5 mm edge between voxels 0.74-0.9 mm apart); distances between two balls inherit twice that at worst and
#: about a quarter of it on average.
ANALYTIC_MEAN_TOL_MM = 0.012
ANALYTIC_P95_TOL_MM = 0.05


def _ball(radius: float, centre: F64, inside_hu: float = 1000.0) -> npt.NDArray[np.float32]:
    """A ball on the seed protocol's grid: 200 HU exactly on the sphere, an erf edge of σ 0.5 mm."""
    k, i, j = np.meshgrid(*[np.arange(n) * s for n, s in zip(BALL_GRID, SPACING, strict=True)], indexing="ij")
    r = np.sqrt((k - centre[0]) ** 2 + (i - centre[1]) ** 2 + (j - centre[2]) ** 2)
    half = inside_hu - 200.0
    return np.asarray(
        200.0 + half * erf((radius - r) / (math.sqrt(2.0) * BALL_EDGE_SIGMA_MM)), dtype=np.float32
    )


def _everywhere() -> npt.NDArray[np.bool_]:
    return np.ones(BALL_GRID, dtype=bool)


def _nowhere() -> npt.NDArray[np.bool_]:
    return np.zeros(BALL_GRID, dtype=bool)


# --- surface distance on analytic cases ----------------------------------------------------------------------


def test_identical_balls_are_zero_apart() -> None:
    ct = _ball(BALL_RADIUS_MM, BALL_CENTRE)
    result = bone_surface_distance(ct, ct.copy(), SPACING, _everywhere(), _nowhere())
    assert result.missing is None
    assert result.mean_mm == 0.0
    assert result.p95_mm == 0.0
    assert result.within_1mm == 1.0
    # The area-weighted samples add up to the sphere's area (4πr², within the sampling's 1 %).
    assert result.ct_area_mm2 == pytest.approx(4.0 * math.pi * BALL_RADIUS_MM**2, rel=0.01)


@pytest.mark.parametrize(
    "direction",
    [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)],
    ids=["slice", "row", "column", "diagonal"],
)
def test_ball_shifted_by_0_2_mm(direction: tuple[float, float, float]) -> None:
    """Two unit spheres δ apart: a point at angle θ from the shift is δ|cos θ| from the other sphere, and |cos θ|
    is uniform on [0, 1] over the sphere's area (Archimedes), so mean = δ/2 and p95 = 0.95 δ."""
    shift = 0.2
    unit = np.asarray(direction) / np.linalg.norm(direction)
    ct = _ball(BALL_RADIUS_MM, BALL_CENTRE)
    sct = _ball(BALL_RADIUS_MM, BALL_CENTRE + shift * unit)
    result = bone_surface_distance(sct, ct, SPACING, _everywhere(), _nowhere())
    assert result.mean_mm == pytest.approx(shift / 2.0, abs=ANALYTIC_MEAN_TOL_MM)
    assert result.p95_mm == pytest.approx(0.95 * shift, abs=ANALYTIC_P95_TOL_MM)
    assert result.sct_to_ct_mean_mm == pytest.approx(result.ct_to_sct_mean_mm, abs=0.005)


@pytest.mark.parametrize("grow", [0.1, 0.3])
def test_ball_grown_by_a_known_amount(grow: float) -> None:
    """Concentric spheres: every point of either is exactly ``grow`` from the other."""
    ct = _ball(BALL_RADIUS_MM, BALL_CENTRE)
    sct = _ball(BALL_RADIUS_MM + grow, BALL_CENTRE)
    result = bone_surface_distance(sct, ct, SPACING, _everywhere(), _nowhere())
    assert result.mean_mm == pytest.approx(grow, abs=ANALYTIC_MEAN_TOL_MM)
    assert result.p95_mm == pytest.approx(grow, abs=ANALYTIC_P95_TOL_MM)
    assert result.sct_area_mm2 / result.ct_area_mm2 == pytest.approx(
        ((BALL_RADIUS_MM + grow) / BALL_RADIUS_MM) ** 2, rel=0.01
    )


def test_spurious_bone_counts_but_not_near_the_field_of_views_edge() -> None:
    ct = _ball(BALL_RADIUS_MM, BALL_CENTRE)
    at_edge = ct.copy()
    at_edge[:2, 10:20, 10:20] = (
        1000.0  # within FOV_MARGIN_MM of the first slice: bone cut by the field of view
    )
    edge = bone_surface_distance(at_edge, ct, SPACING, _everywhere(), _nowhere())
    assert edge.mean_mm == 0.0
    inside = ct.copy()
    inside[30:34, 5:9, 5:9] = 1000.0  # a blob 20 mm from the ball, well inside the grid
    far = bone_surface_distance(inside, ct, SPACING, _everywhere(), _nowhere())
    assert far.sct_to_ct_mean_mm > 0.5
    assert far.ct_to_sct_mean_mm == 0.0
    assert far.within_1mm < 1.0
    assert 2 * SPACING[0] < FOV_MARGIN_MM  # the edge blob really lies inside the margin


def test_only_the_outer_surface_counts() -> None:
    """A shell whose core reads below 200 HU in the sCT and above in the CT: marrow HU, not geometry."""
    ct = _ball(BALL_RADIUS_MM, BALL_CENTRE)
    core = np.clip(_ball(BALL_RADIUS_MM - 3.0, BALL_CENTRE) - 200.0, 0.0, None)  # 800 HU inside r - 3 mm
    sct = np.asarray(ct - 1.05 * core, dtype=np.float32)  # the core reads 160 HU
    marrow = _ball(BALL_RADIUS_MM - 2.0, BALL_CENTRE) > 200.0
    counted = bone_surface_distance(sct, ct, SPACING, _everywhere(), _nowhere())
    outer = bone_surface_distance(sct, ct, SPACING, _everywhere(), marrow)
    assert counted.sct_to_ct_p95_mm > 2.0  # the sCT's inner surface, 3 mm inside the CT's only surface
    assert outer.mean_mm == pytest.approx(0.0, abs=1e-9)
    assert outer.sct_area_mm2 == pytest.approx(outer.ct_area_mm2)


def test_missing_surface_is_reported_not_zero() -> None:
    ct = _ball(BALL_RADIUS_MM, BALL_CENTRE)
    soft = np.full(BALL_GRID, 40.0, dtype=np.float32)
    result = bone_surface_distance(soft, ct, SPACING, _everywhere(), _nowhere())
    assert result.missing is not None and "sCT" in result.missing
    assert math.isnan(result.mean_mm) and math.isnan(result.p95_mm)
    assert result.to_dict()["mean_mm"] is None
    none = bone_surface_distance(soft, soft, SPACING, _everywhere(), _nowhere())
    assert none.missing is not None and "no voxel above" in none.missing
    summary = summarise_geometry([])
    assert summary["surface_distance.mean_mm"]["n"] == 0.0


def test_cavity_opened_by_the_field_of_view_is_still_interior() -> None:
    """A hollow ball cut in half by the grid's first slice: its cavity touches the face, and still counts as
    the bone's inside (the face is capped with the bone's own outline there)."""
    centre = np.array([0.0, BALL_CENTRE[1], BALL_CENTRE[2]])
    shell = _ball(BALL_RADIUS_MM, centre) - np.clip(_ball(BALL_RADIUS_MM - 2.0, centre) - 100.0, 0.0, None)
    cavity = _ball(BALL_RADIUS_MM - 3.0, centre) > 200.0  # well inside the shell's inner surface
    interior = bone_interior_from_ct(shell)
    assert np.all(interior[cavity])
    assert not np.any(interior[_ball(BALL_RADIUS_MM + 1.0, centre) < 200.0])  # nothing outside the ball
    samples = iso_surface_samples(shell, SPACING, interior=interior)
    # The half sphere left in the grid; the samples in the first slice stand for a band half a slice wide on
    # either side of it, so a band of that width beyond the face counts too.
    outer_area = 2.0 * math.pi * BALL_RADIUS_MM**2 + 2.0 * math.pi * BALL_RADIUS_MM * SPACING[0] / 2.0
    assert samples.area_mm2 == pytest.approx(outer_area, rel=0.01)


def test_weighted_percentile_is_the_inverted_cdf() -> None:
    values = np.array([3.0, 1.0, 2.0, 10.0])
    assert weighted_percentile(values, np.ones(4), 50.0) == 2.0
    assert weighted_percentile(values, np.array([1.0, 1.0, 1.0, 97.0]), 2.5) == 3.0
    assert weighted_percentile(values, np.array([1.0, 1.0, 1.0, 97.0]), 95.0) == 10.0
    assert math.isnan(weighted_percentile(np.zeros(0), np.zeros(0), 95.0))


# --- surface distance on a real phantom CT -------------------------------------------------------------------


def test_phantom_ct_against_itself_is_zero(held_out_case: PhantomCase) -> None:
    masks = masks_from_labels(held_out_case.labels)
    geometry = phantom_geometry(held_out_case.ct_hu, held_out_case, masks)
    assert geometry.surface.mean_mm == 0.0
    assert geometry.surface.p95_mm == 0.0
    assert geometry.surface.ct_area_mm2 > 50_000.0  # L1-S1 with posterior elements: a real bone surface
    assert [lv.level for lv in geometry.levels] == list(LUMBAR_LEVELS)
    for level in geometry.levels:
        for name in MEASURES:
            assert level.difference_mm(name) == 0.0, (level.level, name)


@pytest.mark.parametrize("axis", [0, 1, 2], ids=["slice", "row", "column"])
def test_phantom_ct_moved_by_one_voxel(held_out_case: PhantomCase, axis: int) -> None:
    """A surface moved by t is |t·n| from itself to first order: the expected mean and 95th percentile are the
    area-weighted mean and percentile of |t·n| over the CT's own outer surface."""
    ct = held_out_case.ct_hu
    marrow = masks_from_labels(held_out_case.labels).trabecular
    moved = np.roll(ct, 1, axis=axis)
    interior = marrow | np.roll(marrow, 1, axis=axis)  # both volumes' marrow is inside bone
    body = held_out_case.body_mask
    result = bone_surface_distance(moved, ct, held_out_case.geometry.spacing, body, interior)
    surface = iso_surface_samples(ct, held_out_case.geometry.spacing, region=body, interior=interior)
    step = held_out_case.geometry.spacing[axis]
    along = np.abs(surface.normals[:, axis]) * step
    expected_mean = float(np.average(along, weights=surface.areas))
    assert result.mean_mm == pytest.approx(expected_mean, abs=0.01)
    assert result.p95_mm == pytest.approx(weighted_percentile(along, surface.areas, 95.0), abs=0.02)
    assert result.p95_mm <= step + 0.02


# --- vertebral measures --------------------------------------------------------------------------------------

_BONE = np.array(sorted(int(t) for t in CORTICAL_TISSUES | TRABECULAR_TISSUES))
#: Step of the painted truth along a line, mm.
TRUTH_STEP_MM = 0.01


def _paint(anatomy: Anatomy, points: F64) -> npt.NDArray[np.uint8]:
    """Labels at patient points, painted as the renderer paints its grid: the torso, then every stroke in order,
    each only over the labels it may overwrite."""
    x, y, z = (points[:, i].astype(np.float32).reshape(-1, 1, 1) for i in range(3))
    labels = np.empty((points.shape[0], 1, 1), dtype=np.uint8)
    anatomy.torso.paint(x, y, z, labels)
    out = labels[:, 0, 0]
    for stroke in anatomy.strokes:
        prim = stroke.primitive
        local = ((points - prim.center) @ prim.frame).astype(np.float32)
        inside = np.asarray(prim.inside(local[:, 0], local[:, 1], local[:, 2]), dtype=bool)
        if stroke.only_on is not None:
            inside &= np.isin(out, [int(t) for t in stroke.only_on])
        out[inside] = prim.label
    return out


def _true_run(anatomy: Anatomy, start: F64, direction: F64, at: float, span: tuple[float, float]) -> float:
    """Length of the run of bone (or of not-bone) that contains the point ``at`` mm along the line."""
    s = np.arange(span[0], span[1], TRUTH_STEP_MM)
    bone = np.isin(_paint(anatomy, start[None, :] + s[:, None] * direction[None, :]), _BONE)
    i = int(np.argmin(np.abs(s - at)))
    inside = bone[i]
    end = i + int(np.argmax(bone[i:] != inside))
    begin = i - int(np.argmax(bone[i::-1] != inside))
    assert end > i and begin < i, "the run reaches the end of the painted span"
    return float(s[end] - s[begin]) - TRUTH_STEP_MM


def test_vertebral_measures_follow_the_phantoms_anatomy(held_out_case: PhantomCase) -> None:
    """Heights and canal depth of a phantom CT against the anatomy painted along the same lines.

    The CT's 200 HU surface lies outside the true bone surface: its point spread (0.9 mm FWHM) and 0.74-0.9 mm
    voxels spread a bone edge over about a millimetre, and 200 HU is only 7-10 % of the way from soft tissue to
    cortex, so the crossing sits some 0.4-1.2 mm out (further for the thick cortex of the arch). Each height
    therefore reads two such offsets long and the canal two short. The method tracks the anatomy when that
    offset is the same at every level: the spread across levels stays within 0.5 mm while the true values
    differ by several mm. The CT's 15 HU noise moves a crossing on a bone edge by about 0.01 mm.
    """
    case = held_out_case
    anatomy = build_anatomy(case.subject, build_spine(case.subject))
    placements = lumbar_placements(case.subject)
    measured = measure_lumbar(case.ct_hu, case.geometry, placements)
    excess: dict[str, list[float]] = {name: [] for name in MEASURES}
    truths: dict[str, list[float]] = {name: [] for name in MEASURES}
    for p, m in zip(placements, measured, strict=True):
        ey, ez = p.frame[:, 1], p.frame[:, 2]
        for name, line_y in (
            ("anterior_height", m.anterior_line_y),
            ("posterior_height", m.posterior_line_y),
        ):
            assert line_y is not None
            truth = _true_run(anatomy, p.center + line_y * ey, ez, 0.0, (-30.0, 30.0))
            excess[name].append(m.measure(name).value_mm - truth)
            truths[name].append(truth)
        truth = _true_run(anatomy, p.center, ey, p.half_depth + 5.0, (0.0, p.half_depth + 50.0))
        excess["canal_diameter"].append(truth - m.canal_diameter.value_mm)
        truths["canal_diameter"].append(truth)
    for name in MEASURES:
        offsets = np.array(excess[name])
        assert np.all((offsets >= 0.8) & (offsets <= 2.4)), (name, offsets)
        assert offsets.max() - offsets.min() <= 0.5, (name, offsets)
    assert max(truths["anterior_height"]) - min(truths["anterior_height"]) > 1.0  # levels really differ


def test_vertebral_measures_move_with_the_vertebra(held_out_case: PhantomCase) -> None:
    """The CT and the vertebra positions moved together by whole voxels: every measure is unchanged."""
    case = held_out_case
    placements = lumbar_placements(case.subject)
    shift = (2, 3, -4)
    vector = case.geometry.affine[:3, :3] @ np.asarray(shift, dtype=np.float64)
    moved_ct = np.roll(case.ct_hu, shift, axis=(0, 1, 2))
    moved = [
        dataclasses.replace(
            p,
            center=p.center + vector,
            disc_above_center=p.disc_above_center + vector,
            disc_below_center=p.disc_below_center + vector,
        )
        for p in placements
    ]
    before = measure_lumbar(case.ct_hu, case.geometry, placements)
    after = measure_lumbar(moved_ct, case.geometry, moved)
    for b, a in zip(before, after, strict=True):
        for name in MEASURES:
            assert a.measure(name).value_mm == pytest.approx(b.measure(name).value_mm, abs=1e-9)


def test_a_measurement_that_fails_is_missing_with_its_reason(held_out_case: PhantomCase) -> None:
    """Bone where the disc above L3 should be: L3's heights cannot be measured, and say so."""
    case = held_out_case
    placements = lumbar_placements(case.subject)
    l3: VertebraPlacement = placements[LUMBAR_LEVELS.index("L3")]
    bridged = case.ct_hu.copy()
    index = np.linalg.inv(case.geometry.affine) @ np.append(l3.disc_above_center, 1.0)
    k, i, j = (round(float(v)) for v in index[:3])
    bridged[k - 30 : k + 30, i - 12 : i + 12, j - 40 : j + 40] = 1000
    levels = compare_levels(bridged, case.ct_hu, case.geometry, placements)
    level = levels[LUMBAR_LEVELS.index("L3")]
    assert isinstance(level, LevelComparison)
    for name in ("anterior_height", "posterior_height"):
        sct = level.sct.measure(name)
        assert not sct.ok and math.isnan(sct.value_mm)
        assert sct.missing is not None and "superior endplate not found" in sct.missing
        assert level.difference_mm(name) is None
        assert level.to_dict()[name]["sct"] == {"mm": None, "missing": sct.missing}
    summary = summarise_levels(levels)
    assert summary["anterior_height"]["missing"] >= 1.0
    assert summary["anterior_height"]["n"] + summary["anterior_height"]["missing"] == len(LUMBAR_LEVELS)
