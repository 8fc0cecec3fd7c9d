"""Paints the anatomy on a finer grid and counts, per acquisition voxel, how much of each tissue it holds.

Partial volume is what makes thin cortex read 300-1000 HU and blurs fat-water edges in MR; computing it from a
finer grid (``supersample`` sub-voxels per axis) instead of from analytic formulas keeps it right for every
shape, including the joints where shapes overlap. Work is done in slabs of acquisition slices so memory stays
bounded by the slab, and slabs run on a thread pool (NumPy releases the GIL in the heavy loops).

Pathological objects (implants, lesions) are an *overlay*: numbered solids painted on the same fine grid after
the anatomy, which take the place of the tissues under them without changing the anatomy's labels, so a case
with pathology keeps the labels (and, where no object is, the counts) of the same subject without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engines.phantom.anatomy import Anatomy
from engines.phantom.shapes import F32, Mask, Primitive
from engines.phantom.tissues import N_TISSUES, Tissue
from sct_core.geometry import VolumeGeometry

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]

#: Acquisition slices per rendering slab: small enough that a slab's fine grid stays in cache-friendly sizes.
SLAB_SLICES = 2
#: Overlay objects are numbered 1..MAX_OVERLAY_OBJECTS (their number shares a fine-grid byte with the tissues).
MAX_OVERLAY_OBJECTS = 255 - N_TISSUES


@dataclass(frozen=True, slots=True)
class SlabCounts:
    """Tissue counts of the acquisition voxels of slices ``[start, stop)``: shape (slices, rows, cols, tissues).

    ``counts`` are always those of the anatomy alone. Where an overlay object touches the slab, ``remaining``
    holds the tissue counts left once the objects took their sub-voxels and ``objects`` the sub-voxels of each
    object (channel ``value - 1``); both are None elsewhere.
    """

    start: int
    stop: int
    counts: U8
    remaining: U8 | None = None
    objects: U8 | None = None


@dataclass(frozen=True, slots=True, eq=False)
class OverlayStroke:
    """One solid of a numbered overlay object (``value`` 1..MAX_OVERLAY_OBJECTS), replacing the tissues in
    ``only_on`` (None = any). The primitive's own label is not painted; ``value`` is."""

    primitive: Primitive
    value: int
    only_on: frozenset[Tissue] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.value <= MAX_OVERLAY_OBJECTS:
            raise ValueError(f"overlay value must be in 1..{MAX_OVERLAY_OBJECTS}; found {self.value}")


def _axis_terms(
    geometry: VolumeGeometry,
    origin_offset: F64,
    basis: F64,
    k: npt.NDArray[np.intp],
    r: npt.NDArray[np.intp],
    c: npt.NDArray[np.intp],
) -> tuple[F32, F32, F32]:
    """Coordinates ``basis.T @ (p - center)`` of the grid block k x r x c, as three broadcastable float32 arrays.

    Each returned coordinate is a sum of three 1-D terms (one per index), so only genuinely 3-D orientations
    produce full 3-D arrays.
    """
    dirs = (
        np.asarray(geometry.slice_direction) * geometry.spacing[0],
        np.asarray(geometry.column_direction) * geometry.spacing[1],
        np.asarray(geometry.row_direction) * geometry.spacing[2],
    )
    out: list[F32] = []
    for j in range(3):
        axis = basis[:, j]
        base = float(origin_offset @ axis)
        terms = []
        for idx, d, shape in ((k, dirs[0], (-1, 1, 1)), (r, dirs[1], (1, -1, 1)), (c, dirs[2], (1, 1, -1))):
            coeff = float(d @ axis)
            if abs(coeff) > 1e-9:
                terms.append((idx.astype(np.float32) * np.float32(coeff)).reshape(shape))
        value: F32 = np.full((1, 1, 1), base, dtype=np.float32)
        for t in terms:
            value = value + t
        out.append(value)
    return out[0], out[1], out[2]


def _index_box(fine: VolumeGeometry, inv: F64, lo: F64, hi: F64) -> tuple[slice, slice, slice] | None:
    """Index ranges of ``fine`` covering the patient-space box [lo, hi]; None if it misses the grid."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    idx = (inv[:3, :3] @ corners.T).T + inv[:3, 3]
    first = np.floor(idx.min(axis=0)).astype(int)
    last = np.ceil(idx.max(axis=0)).astype(int) + 1
    first = np.maximum(first, 0)
    last = np.minimum(last, np.asarray(fine.shape))
    if np.any(last <= first):
        return None
    return slice(first[0], last[0]), slice(first[1], last[1]), slice(first[2], last[2])


StrokeBoxes = list[tuple[slice, slice, slice] | None]


def stroke_boxes(anatomy: Anatomy, fine: VolumeGeometry) -> StrokeBoxes:
    """Fine-grid index box of every stroke, computed once per case rather than once per slab."""
    return primitive_boxes([stroke.primitive for stroke in anatomy.strokes], fine)


def primitive_boxes(primitives: Sequence[Primitive], fine: VolumeGeometry) -> StrokeBoxes:
    """Fine-grid index box of each primitive (None where it misses the grid)."""
    inv = np.asarray(np.linalg.inv(fine.affine), dtype=np.float64)
    return [_index_box(fine, inv, *primitive.world_bounds()) for primitive in primitives]


def _primitive_mask(
    fine: VolumeGeometry, prim: Primitive, box: tuple[slice, slice, slice], k0: int, k1: int
) -> tuple[slice, Mask] | None:
    """Which fine-grid points of ``box`` within slices [k0, k1) lie inside ``prim`` (None if no slice overlaps)."""
    ks = slice(max(box[0].start, k0), min(box[0].stop, k1))
    if ks.stop <= ks.start:
        return None
    kk = np.arange(ks.start, ks.stop)
    rr = np.arange(box[1].start, box[1].stop)
    cc = np.arange(box[2].start, box[2].stop)
    lx, ly, lz = _axis_terms(fine, np.asarray(fine.origin) - prim.center, prim.frame, kk, rr, cc)
    return ks, prim.inside(lx, ly, lz)


def render_slab(
    anatomy: Anatomy,
    geometry: VolumeGeometry,
    start: int,
    stop: int,
    supersample: int,
    boxes: StrokeBoxes | None = None,
) -> U8:
    """Fine-grid labels of acquisition slices [start, stop): shape (n*s, rows*s, cols*s)."""
    s = supersample
    fine = geometry.supersampled(s)
    if boxes is None:
        boxes = stroke_boxes(anatomy, fine)
    k0, k1 = start * s, stop * s
    shape = (k1 - k0, fine.shape[1], fine.shape[2])
    labels = np.empty(shape, dtype=np.uint8)
    k = np.arange(k0, k1)
    r = np.arange(fine.shape[1])
    c = np.arange(fine.shape[2])
    origin = np.asarray(fine.origin)
    x, y, z = _axis_terms(fine, origin, np.eye(3), k, r, c)
    anatomy.torso.paint(x, y, z, labels)
    allowed_lut: dict[int, npt.NDArray[np.bool_]] = {}
    for stroke, box in zip(anatomy.strokes, boxes, strict=True):
        if box is None:
            continue
        hit = _primitive_mask(fine, stroke.primitive, box, k0, k1)
        if hit is None:
            continue
        ks, mask = hit
        view = labels[ks.start - k0 : ks.stop - k0, box[1], box[2]]
        mask = np.broadcast_to(mask, view.shape)
        if stroke.only_on is not None:
            mask = mask & _allowed(allowed_lut, stroke.only_on)[view]
        view[mask] = stroke.primitive.label
    return labels


def _allowed(cache: dict[int, npt.NDArray[np.bool_]], only_on: frozenset[Tissue]) -> npt.NDArray[np.bool_]:
    """Look-up table label -> may be overwritten, cached per ``only_on`` set."""
    lut = cache.get(id(only_on))
    if lut is None:
        lut = np.zeros(256, dtype=bool)
        lut[[int(t) for t in only_on]] = True
        cache[id(only_on)] = lut
    return lut


def paint_overlay(
    fine_labels: U8,
    geometry: VolumeGeometry,
    start: int,
    supersample: int,
    overlay: Sequence[OverlayStroke],
    boxes: StrokeBoxes,
) -> U8 | None:
    """Object numbers on the fine grid of a slab starting at acquisition slice ``start`` (0 = no object), in
    overlay order (later strokes win); ``only_on`` is tested against the anatomy's labels. None if no object
    touches the slab."""
    fine = geometry.supersampled(supersample)
    k0 = start * supersample
    k1 = k0 + fine_labels.shape[0]
    objects: U8 | None = None
    allowed_lut: dict[int, npt.NDArray[np.bool_]] = {}
    for stroke, box in zip(overlay, boxes, strict=True):
        if box is None:
            continue
        hit = _primitive_mask(fine, stroke.primitive, box, k0, k1)
        if hit is None:
            continue
        ks, mask = hit
        region = (slice(ks.start - k0, ks.stop - k0), box[1], box[2])
        mask = np.broadcast_to(mask, fine_labels[region].shape)
        if stroke.only_on is not None:
            mask = mask & _allowed(allowed_lut, stroke.only_on)[fine_labels[region]]
        if not mask.any():
            continue
        if objects is None:
            objects = np.zeros(fine_labels.shape, dtype=np.uint8)
        objects[region][mask] = stroke.value
    return objects


def count_tissues(fine_labels: U8, supersample: int, n_labels: int = N_TISSUES) -> U8:
    """Per acquisition voxel, how many of its sub-voxels hold each label 0..n_labels-1:
    (slices, rows, cols, n_labels)."""
    s = supersample
    n, rows, cols = (d // s for d in fine_labels.shape)
    blocks = fine_labels.reshape(n, s, rows, s, cols, s).transpose(0, 2, 4, 1, 3, 5).reshape(-1, s**3)
    voxel = np.arange(blocks.shape[0], dtype=np.int64)[:, None] * n_labels
    flat = np.bincount((voxel + blocks).ravel(), minlength=blocks.shape[0] * n_labels)
    return flat.reshape(n, rows, cols, n_labels).astype(np.uint8)


def _with_overlay(
    fine_labels: U8, counts: U8, objects: U8, start: int, stop: int, supersample: int, n_objects: int
) -> SlabCounts:
    """Counts of a slab some objects touch: objects' sub-voxels counted as label N_TISSUES + value - 1."""
    mixed = np.where(objects > 0, objects + np.uint8(N_TISSUES - 1), fine_labels)
    both = count_tissues(mixed, supersample, N_TISSUES + n_objects)
    return SlabCounts(start, stop, counts, remaining=both[..., :N_TISSUES], objects=both[..., N_TISSUES:])


def render_counts(
    anatomy: Anatomy,
    geometry: VolumeGeometry,
    supersample: int,
    consume: Callable[[SlabCounts], None],
    *,
    workers: int = 2,
    overlay: Sequence[OverlayStroke] = (),
) -> None:
    """Render the whole grid slab by slab, handing each slab's tissue counts to ``consume`` (in any order).

    ``consume`` runs on the calling thread, so it needs no locking. ``overlay`` adds numbered objects
    (:class:`SlabCounts` ``remaining`` and ``objects``); without one, nothing else is computed.
    """
    if supersample < 1 or supersample**3 > 255:
        raise ValueError(f"supersample must be in 1..6; found {supersample}")
    n = geometry.shape[0]
    bounds = [(a, min(a + SLAB_SLICES, n)) for a in range(0, n, SLAB_SLICES)]

    boxes = stroke_boxes(anatomy, geometry.supersampled(supersample))
    overlay_boxes = primitive_boxes([s.primitive for s in overlay], geometry.supersampled(supersample))
    n_objects = max((s.value for s in overlay), default=0)

    def job(bound: tuple[int, int]) -> SlabCounts:
        fine = render_slab(anatomy, geometry, bound[0], bound[1], supersample, boxes)
        counts = count_tissues(fine, supersample)
        if overlay:
            objects = paint_overlay(fine, geometry, bound[0], supersample, overlay, overlay_boxes)
            if objects is not None:
                return _with_overlay(fine, counts, objects, bound[0], bound[1], supersample, n_objects)
        return SlabCounts(bound[0], bound[1], counts)

    if workers <= 1:
        for bound in bounds:
            consume(job(bound))
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phantom-render") as pool:
        for result in pool.map(job, bounds):
            consume(result)
