"""Bone surface distance: how far the sCT's 200 HU bone surface lies from the CT's, in mm, below the voxel size.

A surgeon plans a screw on the bone's outer surface, so what matters is where that surface lies, not the HU
inside the bone. Counting voxels that change class quantises every error to the voxel (0.74-0.9 mm), too coarse
for a 0.3 mm target, so the surface is found and compared with sub-voxel precision:

- **Surface samples.** Wherever the HU crosses the iso-level along a grid edge (one end above, the other not),
  the crossing point is found by linear interpolation between the two voxel values: the vertices marching cubes
  would use. Each sample carries the surface normal there (the gradient of the trilinear interpolant) and the
  surface area it stands for: a plane with unit normal ``n`` is crossed by ``|n_a| / A_a`` grid edges along
  axis ``a`` per mm², ``A_a`` being the grid cell's cross-section across that axis, so each sample stands for
  ``1 / sum_a |n_a| / A_a`` mm² whatever the surface's orientation to the grid.
- **Point to surface.** From each sample of one surface, the nearest point of the other surface is found on
  the iso-surface of that volume's trilinear interpolant itself: the nearest of the other surface's samples gives
  a start on its tangent plane, and steps to the nearest point of the locally linearised iso-surface move it
  to the foot of the perpendicular. Samples with no sample of the other surface within :data:`NEAR_MM` are
  gross errors; for them the distance to the nearest sample's tangent disc (radius :func:`surfel_radius_mm`)
  is accurate enough.
- **Symmetric.** Distances go both ways (sCT samples to the CT surface and CT samples to the sCT surface). The
  mean is the area-weighted mean over both sets (the average symmetric surface distance); the 95th percentile is
  the larger of the two directed, area-weighted 95th percentiles (the HD95 of Nikolov et al. 2021's
  surface-distance library); ``within_1mm`` is the share of both surfaces' area within 1 mm of the other.

What counts as the bone surface: the outer (periosteal) part of the 200 HU iso-surface. Trabecular marrow sits
near 200 HU (below it in older subjects, and thin cortex partial-volumes below 200 HU too), so the literal
iso-surface also runs through the marrow, where its position measures marrow density, not geometry. A crossing
therefore counts only when its sub-threshold voxel is not bone interior of the *reference*: the phantom's marrow
labels, or for a real CT the inside of its own bone (:func:`bone_interior_from_ct`). The same interior is
applied to both volumes, so the sCT gains nothing by putting marrow HU on either side of 200.
Spurious bone the sCT puts in soft tissue, gas or skin is outer surface and counts. Only crossings inside the
body count (both edge ends in the body mask), and only samples at least :data:`FOV_MARGIN_MM` inside the grid's
faces are measured from, because a bone cut by the field of view has no surface there in one volume and a
partial one in the other; the surfaces measured *to* keep their full extent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import cKDTree

from engines.evaluation.metrics import BoolArray, HuArray

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: Bone is HU above this (the bone-Dice threshold of the issue's targets).
ISO_LEVEL_HU = 200.0
#: Samples closer than this to a face of the grid are not measured from (bone cut by the field of view).
FOV_MARGIN_MM = 3.0
#: How far (mm) the nearest sample of the other surface is looked for first; a query with none that near is a
#: gross error, measured to the nearest sample's tangent disc.
NEAR_MM = 3.0
#: Steps that find the foot of the perpendicular on the iso-surface (:func:`_foot_step`), and how close to the
#: iso-surface (mm) the foot must end for its distance to stand.
FOOT_STEPS = 3
FOOT_TOLERANCE_MM = 1e-3
#: The percentile reported besides the mean, and the distance whose share of the surface is reported.
PERCENTILE = 95.0
WITHIN_MM = 1.0
#: Voxels kept around the bone's bounding box, so that no bone surface touches the crop.
CROP_PAD_VOXELS = 2


@dataclass(frozen=True, slots=True, eq=False)
class SurfaceSamples:
    """Iso-surface crossing points of one volume, in mm along the grid axes (index × spacing).

    ``normals`` are unit vectors (orientation arbitrary), ``areas`` the mm² of surface each point stands for.
    """

    points: F64
    normals: F64
    areas: F64

    @property
    def area_mm2(self) -> float:
        return float(self.areas.sum())

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def where(self, keep: BoolArray) -> SurfaceSamples:
        return SurfaceSamples(self.points[keep], self.normals[keep], self.areas[keep])


def surfel_radius_mm(spacing: tuple[float, float, float]) -> float:
    """Radius of the tangent disc a sample stands for: half the largest diagonal of a cell face, about how far
    apart a surface's edge crossings lie."""
    s = sorted(float(v) for v in spacing)
    return 0.5 * math.hypot(s[1], s[2])


def _central_difference(volume: F32, index: tuple[I64, ...], axis: int, step: float) -> F64:
    """d(volume)/d(axis) in HU/mm at integer voxel ``index`` (one-sided at the grid's faces)."""
    n = volume.shape[axis]
    up = np.minimum(index[axis] + 1, n - 1)
    down = np.maximum(index[axis] - 1, 0)
    plus = list(index)
    minus = list(index)
    plus[axis] = up
    minus[axis] = down
    span = (up - down).astype(np.float64) * step
    diff = volume[tuple(plus)].astype(np.float64) - volume[tuple(minus)].astype(np.float64)
    return np.asarray(np.divide(diff, span, out=np.zeros_like(diff), where=span > 0), dtype=np.float64)


def iso_surface_samples(
    volume: HuArray,
    spacing: tuple[float, float, float],
    *,
    level: float = ISO_LEVEL_HU,
    region: BoolArray | None = None,
    interior: BoolArray | None = None,
) -> SurfaceSamples:
    """Crossings of ``level`` along every grid edge of ``volume`` [slice, row, col] (module docstring).

    ``region`` keeps only edges with both ends inside it (the body); ``interior`` drops crossings whose
    sub-threshold end lies in it (bone interior: the surface there is not the bone's outer surface).
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a volume [slice, row, col], found shape {volume.shape}")
    for name, mask in (("region", region), ("interior", interior)):
        if mask is not None and mask.shape != volume.shape:
            raise ValueError(f"{name} shape {mask.shape} does not match volume shape {volume.shape}")
    vol = np.asarray(volume, dtype=np.float32)
    above = vol > np.float32(level)
    steps = tuple(float(s) for s in spacing)
    cross_section = np.array([steps[1] * steps[2], steps[0] * steps[2], steps[0] * steps[1]])
    points: list[F64] = []
    normals: list[F64] = []
    for axis in range(3):
        lo_s = [slice(None)] * 3
        hi_s = [slice(None)] * 3
        lo_s[axis] = slice(0, -1)
        hi_s[axis] = slice(1, None)
        lo, hi = tuple(lo_s), tuple(hi_s)
        crossing = above[lo] != above[hi]
        if region is not None:
            crossing &= region[lo] & region[hi]
        if interior is not None:
            crossing &= ~np.where(above[lo], interior[hi], interior[lo])
        index = tuple(i.astype(np.int64) for i in np.nonzero(crossing))
        if index[0].size == 0:
            continue
        upper_l = list(index)
        upper_l[axis] = index[axis] + 1
        upper = tuple(upper_l)
        v0 = vol[index].astype(np.float64)
        v1 = vol[upper].astype(np.float64)
        t = (level - v0) / (v1 - v0)  # v0 != v1: exactly one end is above the level
        coords = np.stack([i.astype(np.float64) for i in index], axis=1)
        coords[:, axis] += t
        gradient = np.empty_like(coords)
        for b in range(3):
            if b == axis:
                gradient[:, b] = (v1 - v0) / steps[b]
            else:
                g0 = _central_difference(vol, index, b, steps[b])
                g1 = _central_difference(vol, upper, b, steps[b])
                gradient[:, b] = (1.0 - t) * g0 + t * g1
        points.append(coords * np.asarray(steps))
        normals.append(gradient / np.linalg.norm(gradient, axis=1, keepdims=True))
    if not points:
        return SurfaceSamples(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))
    all_normals = np.concatenate(normals)
    per_mm2 = np.abs(all_normals) @ (1.0 / cross_section)  # edge crossings per mm² of surface
    return SurfaceSamples(np.concatenate(points), all_normals, 1.0 / per_mm2)


def trilinear(volume: F32, index: F64) -> tuple[F64, F64]:
    """Value and gradient (per unit index along each axis) of the trilinear interpolant at ``index`` (n, 3).

    A point outside the grid is evaluated in the interpolant of the nearest boundary cell, extrapolated.
    """
    shape = np.asarray(volume.shape, dtype=np.int64)
    base = np.clip(np.floor(index).astype(np.int64), 0, shape - 2)
    frac = index - base
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    flat = volume.reshape(-1)
    origin = base @ strides
    c = {
        (dk, di, dj): flat[origin + dk * strides[0] + di * strides[1] + dj].astype(np.float64)
        for dk in (0, 1)
        for di in (0, 1)
        for dj in (0, 1)
    }
    fk, fi, fj = frac[:, 0], frac[:, 1], frac[:, 2]
    # Interpolate along j, then i, then k, keeping the differences each derivative needs.
    e = {(dk, di): c[dk, di, 0] + fj * (c[dk, di, 1] - c[dk, di, 0]) for dk in (0, 1) for di in (0, 1)}
    dj = {(dk, di): c[dk, di, 1] - c[dk, di, 0] for dk in (0, 1) for di in (0, 1)}
    f = {dk: e[dk, 0] + fi * (e[dk, 1] - e[dk, 0]) for dk in (0, 1)}
    value = f[0] + fk * (f[1] - f[0])
    d_k = f[1] - f[0]
    d_i_at = {dk: e[dk, 1] - e[dk, 0] for dk in (0, 1)}
    d_i = d_i_at[0] + fk * (d_i_at[1] - d_i_at[0])
    d_j_at = {dk: dj[dk, 0] + fi * (dj[dk, 1] - dj[dk, 0]) for dk in (0, 1)}
    d_j = d_j_at[0] + fk * (d_j_at[1] - d_j_at[0])
    return value, np.stack([d_k, d_i, d_j], axis=1)


@dataclass(frozen=True, slots=True, eq=False)
class TargetSurface:
    """A surface to measure distances to: its samples, and the volume whose iso-surface they sample."""

    samples: SurfaceSamples
    volume: F32
    spacing: tuple[float, float, float]
    level: float

    def __post_init__(self) -> None:
        if not self.volume.flags.c_contiguous:
            raise ValueError("volume must be C-contiguous (trilinear sampling reads it flat)")
        if min(self.volume.shape) < 2:
            raise ValueError(f"volume must span at least 2 voxels on every axis; found {self.volume.shape}")


def _foot_step(target: TargetSurface, query: F64, points: F64, steps: F64) -> tuple[F64, F64]:
    """One step towards the foot of the perpendicular from ``query`` to the iso-surface.

    At each current point the iso-surface is linearised (value + gradient · offset = level); the step goes to
    that plane's point nearest the query. On a plane this is the foot at once; on a curved surface it is Newton
    onto the surface and a slide along it together, and converges in a few steps. Returns the new points and
    how far (mm, first order) the old ones were from the surface.
    """
    value, gradient = trilinear(target.volume, points / steps)
    gradient = gradient / steps  # HU per mm
    norm_sq = np.einsum("nc,nc->n", gradient, gradient)
    ok = norm_sq > 0
    excess = value - target.level + np.einsum("nc,nc->n", gradient, query - points)
    scale = np.divide(excess, norm_sq, out=np.zeros_like(excess), where=ok)
    residual = np.divide(
        np.abs(value - target.level), np.sqrt(norm_sq), out=np.full(points.shape[0], math.inf), where=ok
    )
    return np.where(ok[:, None], query - scale[:, None] * gradient, points), residual


def distances_to_surface(query: F64, target: TargetSurface) -> F64:
    """Distance (mm) from each ``query`` point (n, 3; mm along the grid axes) to ``target``'s iso-surface."""
    samples = target.samples
    n = query.shape[0]
    if len(samples) == 0:
        return np.full(n, math.inf)
    if n == 0:
        return np.zeros(0)
    radius = surfel_radius_mm(target.spacing)
    # Sliding-midpoint splits: quicker to build than median splits, and far quicker for the far queries.
    tree = cKDTree(samples.points, balanced_tree=False, compact_nodes=False)
    nearest_d, nearest_i = tree.query(query, k=1, distance_upper_bound=NEAR_MM)
    first = np.asarray(nearest_i, dtype=np.int64).reshape(n)
    nearest_d = np.asarray(nearest_d, dtype=np.float64).reshape(n)
    # Far queries: the nearest sample, looked for without a bound, and its tangent disc.
    far = ~np.isfinite(nearest_d)
    if np.any(far):
        _, nearest_far = tree.query(query[far], k=1)
        first[far] = np.asarray(nearest_far, dtype=np.int64).reshape(-1)
    offset = query - samples.points[first]
    along = np.einsum("nc,nc->n", offset, samples.normals[first])
    tangent = offset - along[:, None] * samples.normals[first]
    across = np.linalg.norm(tangent, axis=1)
    disc = np.hypot(along, np.maximum(across - radius, 0.0))
    result: F64 = np.asarray(disc, dtype=np.float64)
    near = ~far
    if not np.any(near):
        return result
    # Near queries: start on the nearest sample's disc, then find the foot on the iso-surface itself.
    steps = np.asarray(target.spacing, dtype=np.float64)
    q = query[near]
    clip = np.minimum(1.0, radius / np.maximum(across[near], 1e-12))
    start = samples.points[first[near]] + tangent[near] * clip[:, None]
    foot = start
    for _ in range(FOOT_STEPS):
        foot, _residual = _foot_step(target, q, foot, steps)
    _, residual = _foot_step(target, q, foot, steps)
    settled = (residual <= FOOT_TOLERANCE_MM) & (np.linalg.norm(foot - start, axis=1) <= 2.0 * radius)
    result[near] = np.where(settled, np.linalg.norm(q - foot, axis=1), disc[near])
    result[nearest_d == 0.0] = 0.0  # the query is a sample of the target surface itself
    return result


def weighted_percentile(values: F64, weights: F64, percent: float) -> float:
    """The smallest value at which the cumulative weight reaches ``percent`` % of the total (inverted CDF)."""
    if values.size == 0:
        return math.nan
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    at = int(np.searchsorted(cumulative, percent / 100.0 * cumulative[-1], side="left"))
    return float(values[order][min(at, values.size - 1)])


def bone_interior_from_ct(ct_hu: HuArray, level: float = ISO_LEVEL_HU) -> BoolArray:
    """Bone interior of a real CT, where no labels say where the marrow is: its bone (above ``level``) with the
    cavities it encloses filled, less the outermost voxel layer.

    A bone cut by the field of view has its cavity opened at the grid's face; each face is therefore capped
    with the bone's own outline in that face (its 2D enclosed cavities filled) before the 3D fill. The outer
    layer is left out so that an sCT surface lying up to a voxel inside the CT's still counts. Where
    thin cortex reads below ``level`` (partial volume), the cavity behind it stays open and its surface counts
    as outer: a limit of threshold-defined bone that the phantom's labels do not have.
    """
    bone = np.asarray(ct_hu > level, dtype=bool)
    padded = np.pad(bone, 1)
    for axis in range(3):
        for face, cap in ((1, 0), (-2, -1)):
            src: list[int | slice] = [slice(None)] * 3
            dst: list[int | slice] = [slice(None)] * 3
            src[axis] = face
            dst[axis] = cap
            padded[tuple(dst)] |= np.asarray(ndimage.binary_fill_holes(padded[tuple(src)]), dtype=bool)
    filled = np.asarray(ndimage.binary_fill_holes(padded), dtype=bool)[1:-1, 1:-1, 1:-1]
    return np.asarray(ndimage.binary_erosion(filled, border_value=1), dtype=bool)


def _json_float(value: float, digits: int = 4) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class SurfaceDistance:
    """Symmetric bone surface distance of one sCT against its CT (module docstring); mm, mm², shares in [0, 1].

    ``missing`` says why no distance could be measured (a surface absent from one volume); then every distance
    is NaN, never 0.
    """

    mean_mm: float
    p95_mm: float
    within_1mm: float
    sct_to_ct_mean_mm: float
    ct_to_sct_mean_mm: float
    sct_to_ct_p95_mm: float
    ct_to_sct_p95_mm: float
    sct_area_mm2: float
    ct_area_mm2: float
    missing: str | None = None

    def scalars(self) -> dict[str, float]:
        """The figures summarised over cases, under flat names."""
        return {
            "surface_distance.mean_mm": self.mean_mm,
            "surface_distance.p95_mm": self.p95_mm,
            "surface_distance.within_1mm": self.within_1mm,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_mm": _json_float(self.mean_mm),
            "p95_mm": _json_float(self.p95_mm),
            "within_1mm": _json_float(self.within_1mm),
            "sct_to_ct_mean_mm": _json_float(self.sct_to_ct_mean_mm),
            "ct_to_sct_mean_mm": _json_float(self.ct_to_sct_mean_mm),
            "sct_to_ct_p95_mm": _json_float(self.sct_to_ct_p95_mm),
            "ct_to_sct_p95_mm": _json_float(self.ct_to_sct_p95_mm),
            "sct_area_mm2": _json_float(self.sct_area_mm2, 1),
            "ct_area_mm2": _json_float(self.ct_area_mm2, 1),
            "missing": self.missing,
        }


def _missing(reason: str, sct_area: float = 0.0, ct_area: float = 0.0) -> SurfaceDistance:
    nan = math.nan
    return SurfaceDistance(nan, nan, nan, nan, nan, nan, nan, sct_area, ct_area, missing=reason)


def _bone_box(sct_hu: HuArray, ct_hu: HuArray, body: BoolArray, level: float) -> tuple[slice, ...] | None:
    """The grid's box around every above-``level`` voxel of either volume in the body, padded."""
    bone = body & ((sct_hu > level) | (ct_hu > level))
    if not np.any(bone):
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(bone.any(axis=other))
        lo = max(int(hit[0]) - CROP_PAD_VOXELS, 0)
        hi = min(int(hit[-1]) + 1 + CROP_PAD_VOXELS, bone.shape[axis])
        if hi - lo < 2:  # the trilinear interpolant needs two voxels per axis
            lo, hi = max(hi - 2, 0), max(hi, 2)
        box.append(slice(lo, hi))
    return tuple(box)


def bone_surface_distance(
    sct_hu: HuArray,
    ct_hu: HuArray,
    spacing: tuple[float, float, float],
    body: BoolArray,
    interior: BoolArray,
    *,
    level: float = ISO_LEVEL_HU,
    margin_mm: float = FOV_MARGIN_MM,
) -> SurfaceDistance:
    """Symmetric distance between the outer ``level`` HU surfaces of ``sct_hu`` and ``ct_hu`` inside ``body``.

    ``interior`` is the reference's bone interior (module docstring). ``spacing`` is the grid's (slice, row,
    column) spacing in mm (:attr:`VolumeGeometry.spacing`); the grid's axes are orthogonal, so distances in
    index × spacing are patient-space millimetres.
    """
    if sct_hu.shape != ct_hu.shape:
        raise ValueError(f"sCT shape {sct_hu.shape} does not match CT shape {ct_hu.shape}")
    for name, mask in (("body", body), ("interior", interior)):
        if mask.shape != ct_hu.shape:
            raise ValueError(f"{name} mask shape {mask.shape} does not match CT shape {ct_hu.shape}")
    if min(ct_hu.shape) < 2:
        raise ValueError(f"volume must span at least 2 voxels on every axis; found {ct_hu.shape}")
    box = _bone_box(sct_hu, ct_hu, body, level)
    if box is None:
        return _missing(f"no voxel above {level:g} HU in the body of either volume")
    volumes = [np.ascontiguousarray(v[box], dtype=np.float32) for v in (sct_hu, ct_hu)]
    sct_surface, ct_surface = (
        iso_surface_samples(v, spacing, level=level, region=body[box], interior=interior[box])
        for v in volumes
    )
    if len(sct_surface) == 0 or len(ct_surface) == 0:
        which = "sCT" if len(sct_surface) == 0 else "CT"
        return _missing(
            f"the {which} has no outer {level:g} HU bone surface in the body",
            sct_surface.area_mm2,
            ct_surface.area_mm2,
        )
    steps = np.asarray(spacing, dtype=np.float64)
    start = np.array([s.start for s in box], dtype=np.float64) * steps
    low = margin_mm - start
    high = (np.asarray(ct_hu.shape, dtype=np.float64) - 1.0) * steps - margin_mm - start
    directed: list[tuple[F64, F64]] = []
    for query, target_samples, target_volume in (
        (sct_surface, ct_surface, volumes[1]),
        (ct_surface, sct_surface, volumes[0]),
    ):
        inner = query.where(np.all((query.points >= low) & (query.points <= high), axis=1))
        target = TargetSurface(target_samples, target_volume, spacing, level)
        directed.append((distances_to_surface(inner.points, target), inner.areas))
    (d_sc, w_sc), (d_cs, w_cs) = directed
    if d_sc.size == 0 or d_cs.size == 0:
        return _missing(
            f"no outer bone surface farther than {margin_mm:g} mm from the field of view's edge",
            sct_surface.area_mm2,
            ct_surface.area_mm2,
        )
    total = float(w_sc.sum() + w_cs.sum())
    p_sc = weighted_percentile(d_sc, w_sc, PERCENTILE)
    p_cs = weighted_percentile(d_cs, w_cs, PERCENTILE)
    return SurfaceDistance(
        mean_mm=float(np.dot(d_sc, w_sc) + np.dot(d_cs, w_cs)) / total,
        p95_mm=max(p_sc, p_cs),
        within_1mm=float(w_sc[d_sc <= WITHIN_MM].sum() + w_cs[d_cs <= WITHIN_MM].sum()) / total,
        sct_to_ct_mean_mm=float(np.dot(d_sc, w_sc) / w_sc.sum()),
        ct_to_sct_mean_mm=float(np.dot(d_cs, w_cs) / w_cs.sum()),
        sct_to_ct_p95_mm=p_sc,
        ct_to_sct_p95_mm=p_cs,
        sct_area_mm2=sct_surface.area_mm2,
        ct_area_mm2=ct_surface.area_mm2,
    )
