"""A non-learned sCT baseline, so that the model's gain over simple intensity mapping is visible in every report.

Bulk assignment by intensity: inside the body the in-phase MR magnitude is mapped linearly to HU through two
anchors taken from the body's own intensity distribution (median → soft tissue, 95th percentile → fat), so no
scanner-specific calibration is needed. It is weak by construction: cortical bone and air are both dark on MR, so
bone gets only moderately raised HU and gas inside the body is assigned bone-like HU too; trabecular marrow's HU
follows its fat signal, not its mineral.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from engines.evaluation.metrics import BoolArray, fill_holes_per_slice, largest_component

#: Body from MR: voxels brighter than this fraction of the 99th percentile (noise in air is a few percent of it).
MR_BODY_FRACTION = 0.08
MR_BODY_PERCENTILE = 99.0

#: Anchors of the linear intensity-to-HU map: the body median is mostly muscle and viscera (soft tissue), the
#: body's 95th percentile is fat (brightest on an in-phase spoiled-GRE image).
SOFT_ANCHOR_PERCENTILE = 50.0
SOFT_ANCHOR_HU = 40.0
FAT_ANCHOR_PERCENTILE = 95.0
FAT_ANCHOR_HU = -100.0

#: HU outside the body, and the range the output is clipped to (what a 12-bit CT stores).
OUTSIDE_HU = -1000
HU_MIN = -1024
HU_MAX = 3071


def body_mask_from_mr(echo: npt.NDArray[np.integer[Any] | np.floating[Any]]) -> BoolArray:
    """Body from one MR magnitude volume [slice, row, col].

    Threshold at :data:`MR_BODY_FRACTION` of the 99th percentile, close small gaps (skin and dark fascia can break
    the outline), fill holes per slice (cortical bone and gas are dark but inside), keep the largest component.
    """
    if echo.ndim != 3:
        raise ValueError(f"expected one echo [slice, row, col], found shape {echo.shape}")
    level = MR_BODY_FRACTION * float(np.percentile(echo, MR_BODY_PERCENTILE))
    mask = np.asarray(echo > level, dtype=bool)
    # Pad by edge replication so the closing does not erode the body where it leaves the field of view.
    padded = np.pad(mask, 1, mode="edge")
    closed = ndimage.binary_closing(padded, structure=ndimage.generate_binary_structure(3, 1))
    mask = np.asarray(closed[1:-1, 1:-1, 1:-1], dtype=bool)
    return largest_component(fill_holes_per_slice(mask))


def intensity_inversion(
    echoes: npt.NDArray[np.uint16], *, body: BoolArray | None = None
) -> npt.NDArray[np.int16]:
    """Baseline sCT in HU (int16, [slice, row, col]) from ``echoes`` [echo, slice, row, col] in echo-time order.

    Uses the last echo (in-phase at 1.5 T, so fat is bright rather than cancelled at water-fat boundaries). Inside
    ``body`` (from :func:`body_mask_from_mr` unless given) the body median maps to :data:`SOFT_ANCHOR_HU` and the
    95th percentile to :data:`FAT_ANCHOR_HU`, linear and extrapolated, so darker voxels get higher HU; clipped to
    [:data:`HU_MIN`, :data:`HU_MAX`]. Outside the body: :data:`OUTSIDE_HU`. A body without contrast (95th
    percentile equal to the median) is assigned soft tissue throughout.
    """
    if echoes.ndim != 4:
        raise ValueError(f"expected echoes [echo, slice, row, col], found shape {echoes.shape}")
    echo = echoes[-1]
    if body is None:
        body = body_mask_from_mr(echo)
    elif body.shape != echo.shape:
        raise ValueError(f"body mask shape {body.shape} does not match echo shape {echo.shape}")
    if not np.any(body):
        raise ValueError("body mask is empty")

    values = echo[body].astype(np.float64)
    soft, fat = np.percentile(values, [SOFT_ANCHOR_PERCENTILE, FAT_ANCHOR_PERCENTILE])
    if fat > soft:
        slope = (FAT_ANCHOR_HU - SOFT_ANCHOR_HU) / float(fat - soft)
        hu = SOFT_ANCHOR_HU + (values - float(soft)) * slope
    else:
        hu = np.full(values.shape, SOFT_ANCHOR_HU)

    out = np.full(echo.shape, OUTSIDE_HU, dtype=np.int16)
    out[body] = np.rint(np.clip(hu, HU_MIN, HU_MAX)).astype(np.int16)
    return out
