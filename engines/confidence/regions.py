"""Flagged regions: connected voxels whose confidence is below the calibrated threshold.

Regions are found on the whole volume, once its last slab is in: an implant or a lesion crosses slab boundaries,
and one region must be reported once, with the slices it spans and its volume, not once per slab.

A band of :data:`FOV_MARGIN_MM` along the in-plane edges of the field of view is not searched. There the echoes'
context is cut off by the field of view, for the network and for the confidence's own statistics alike, and on
normal validation phantoms the low confidence there was the commonest flag on tissue the sCT got right; the spine
a surgeon navigates on is centred in the field of view, never within a centimetre of its edge. The published
confidence volume is not altered: a reader sees the low values, only no region is reported for them.

A cavity that a region encloses on every side belongs to the region. The void core of a metal screw has no MR
signal, so its statistics can look like those of air, a normal tissue, while its rim is flagged; a surgeon must
not read "trusted" in the middle of an untrusted shell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from engines.confidence.spec import ConfidenceSpec

U8 = npt.NDArray[np.uint8]
I32 = npt.NDArray[np.int32]

#: 26-connectivity: voxels touching by a corner belong to one region (a thin oblique screw is one object).
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
MM3_PER_ML = 1000.0
#: In-plane band along the edges of the field of view that is not searched for regions, mm (module docstring).
FOV_MARGIN_MM = 9.0
#: ... but at most this fraction (1/10) of the field of view per edge, so a small field of view keeps its centre.
FOV_MARGIN_MAX_SHARE = 10


@dataclass(frozen=True, slots=True)
class FlaggedRegion:
    """One connected region the sCT should not be trusted in. Indices are 0-based voxel indices of the volume
    (slice, row, column); ``*_stop`` are exclusive, as Python slices."""

    index: int  # 1-based label in FlaggedRegions.labels
    slice_start: int
    slice_stop: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int
    voxels: int
    volume_ml: float
    #: Lowest confidence in the region (0-255).
    min_confidence: int

    @property
    def slices(self) -> range:
        return range(self.slice_start, self.slice_stop)


@dataclass(frozen=True, slots=True, eq=False)
class FlaggedRegions:
    """All flagged regions of one volume and the label volume they were cut from (0 = trusted)."""

    regions: tuple[FlaggedRegion, ...]
    labels: I32
    threshold: int

    @property
    def mask(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.labels > 0)

    @property
    def flagged_voxels(self) -> int:
        return sum(r.voxels for r in self.regions)

    @property
    def volume_ml(self) -> float:
        return sum(r.volume_ml for r in self.regions)

    @property
    def slice_spans(self) -> tuple[tuple[int, int], ...]:
        """Merged [start, stop) slice ranges covered by any region, in order."""
        covered = np.zeros(self.labels.shape[0] + 1, dtype=bool)
        for r in self.regions:
            covered[r.slice_start : r.slice_stop] = True
        edges = np.flatnonzero(np.diff(np.concatenate(([False], covered))).astype(bool))
        return tuple((int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2], strict=True))


def find_flagged_regions(
    confidence: U8, spec: ConfidenceSpec, spacing_mm: tuple[float, float, float]
) -> FlaggedRegions:
    """Connected regions of ``confidence < spec.threshold`` of at least ``spec.min_region_mm3``.

    ``confidence`` is ``[slice, row, column]`` uint8; ``spacing_mm`` the (slice, row, column) voxel spacing.
    Regions are numbered by size, largest first, so region 1 is the one to look at first. Cavities a region
    encloses are part of it (module docstring).
    """
    if confidence.ndim != 3 or confidence.dtype != np.uint8:
        raise ValueError(
            f"confidence: found {confidence.dtype} {confidence.shape}, expected uint8 [slice, row, col]"
        )
    voxel_mm3 = float(np.prod(spacing_mm))
    low = (confidence < spec.threshold) & searched_mask(confidence.shape, spacing_mm)
    raw, count = ndimage.label(low, structure=_CONNECTIVITY)
    _fill_enclosed(raw, voxel_mm3, spec.min_region_mm3)
    labels = np.zeros(confidence.shape, dtype=np.int32)
    if count == 0:
        return FlaggedRegions((), labels, spec.threshold)
    sizes = np.bincount(raw.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = [
        int(k)
        for k in np.argsort(-sizes, kind="stable")
        if sizes[k] * voxel_mm3 >= max(spec.min_region_mm3, 1e-9)
    ]
    keep = [k for k in keep if sizes[k] > 0]
    minima = ndimage.minimum(confidence, raw, index=keep) if keep else []
    boxes = ndimage.find_objects(raw)
    regions: list[FlaggedRegion] = []
    remap = np.zeros(count + 1, dtype=np.int32)
    for new, (old, lowest) in enumerate(zip(keep, np.atleast_1d(minima), strict=True), start=1):
        remap[old] = new
        box = boxes[old - 1]
        assert box is not None
        regions.append(
            FlaggedRegion(
                index=new,
                slice_start=int(box[0].start),
                slice_stop=int(box[0].stop),
                row_start=int(box[1].start),
                row_stop=int(box[1].stop),
                col_start=int(box[2].start),
                col_stop=int(box[2].stop),
                voxels=int(sizes[old]),
                volume_ml=float(sizes[old] * voxel_mm3 / MM3_PER_ML),
                min_confidence=int(lowest),
            )
        )
    labels = remap[raw]
    return FlaggedRegions(tuple(regions), labels, spec.threshold)


def _fill_enclosed(raw: I32, voxel_mm3: float, min_region_mm3: float) -> None:
    """Give each component the empty voxels it encloses (module docstring), in place.

    Per component, inside its bounding box: filling the holes of the whole volume took about half a second on a
    lumbar volume, on the path from the last image to the published sCT; the boxes of the few components that
    could reach the size rule are small. Another component inside a cavity stays itself."""
    for k, box in enumerate(ndimage.find_objects(raw), start=1):
        if box is None or math.prod(s.stop - s.start for s in box) * voxel_mm3 < min_region_mm3:
            continue
        window = raw[box]
        window[ndimage.binary_fill_holes(window == k) & (window == 0)] = k


def searched_mask(shape: tuple[int, ...], spacing_mm: tuple[float, float, float]) -> npt.NDArray[np.bool_]:
    """Voxels searched for regions: all but the :data:`FOV_MARGIN_MM` band along the in-plane edges (at most a
    tenth of the field of view on each side)."""
    mask = np.ones(shape, dtype=bool)
    rows = min(int(np.ceil(FOV_MARGIN_MM / spacing_mm[1])), shape[1] // FOV_MARGIN_MAX_SHARE)
    cols = min(int(np.ceil(FOV_MARGIN_MM / spacing_mm[2])), shape[2] // FOV_MARGIN_MAX_SHARE)
    mask[:, :rows] = False
    mask[:, shape[1] - rows :] = False
    mask[:, :, :cols] = False
    mask[:, :, shape[2] - cols :] = False
    return mask
