"""The ground truth of a pathological case: one numbered region per object (``PhantomCase.anomaly``).

A region is the object itself (voxels at least half filled by it) plus, for metal, the susceptibility
footprint (each footprint voxel goes to the nearest metal object), and for motion the voxels its ghosting
changes. CT streaks are not part of any region: they are an artefact of the CT, which the sCT does not have.
Objects entirely outside the FOV (no voxel in their region) are left out, and the rest numbered 1.. in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import scipy.ndimage

from engines.phantom.pathology.kinds import AnomalyObject, Pathology
from engines.phantom.pathology.placement import MotionPattern, PlacedObject
from sct_core.geometry import VolumeGeometry

U8 = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]


def _bounding_box(mask: Mask) -> tuple[slice, slice, slice]:
    spans = []
    for axis in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        spans.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return spans[0], spans[1], spans[2]


def _assign_to_nearest(
    raw: U8, footprint: Mask, metal_objects: U8, spacing: tuple[float, float, float]
) -> None:
    """Label the unlabelled footprint voxels with the nearest metal object (in mm), in place."""
    todo = footprint & (raw == 0)
    if not todo.any() or not metal_objects.any():
        return
    box = _bounding_box(todo | (metal_objects > 0))
    seeds = metal_objects[box]
    todo_box = todo[box]
    _, nearest = scipy.ndimage.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
    owner = seeds[tuple(nearest)]
    target = raw[box]
    target[todo_box] = owner[todo_box]


def assemble(
    objects: Sequence[PlacedObject],
    dominant: U8,
    filled: Mask,
    metal_footprint: Mask | None,
    motion_footprint: Mask | None,
    motion: MotionPattern | None,
    geometry: VolumeGeometry,
) -> tuple[U8, tuple[AnomalyObject, ...]]:
    """``anomaly`` and its ``anomaly_objects``: ``dominant`` is the object filling most of each voxel (any
    amount), ``filled`` where objects fill at least half of it."""
    raw = np.where(filled, dominant, np.uint8(0)).astype(np.uint8)
    if metal_footprint is not None:
        metal_values = np.array([o.value for o in objects if o.material.is_metal], dtype=np.uint8)
        metal_objects = np.where(np.isin(dominant, metal_values), dominant, np.uint8(0)).astype(np.uint8)
        _assign_to_nearest(raw, metal_footprint, metal_objects, geometry.spacing)
    motion_value = len(objects) + 1
    if motion_footprint is not None:
        raw[motion_footprint & (raw == 0)] = motion_value
    counts = np.bincount(raw.ravel(), minlength=motion_value + 1)
    lut = np.zeros(256, dtype=np.uint8)
    described: list[AnomalyObject] = []
    for obj in objects:
        if counts[obj.value] == 0:
            continue
        label = len(described) + 1
        lut[obj.value] = label
        described.append(
            AnomalyObject(
                label=label,
                name=obj.name,
                kind=obj.kind,
                level=obj.level,
                side=obj.side,
                centre_mm=obj.centre_mm,
                size_mm=round(obj.size_mm, 2),
                voxels=int(counts[obj.value]),
            )
        )
    if motion is not None and counts[motion_value] > 0:
        label = len(described) + 1
        lut[motion_value] = label
        centre = geometry.affine @ np.array([*((n - 1) / 2.0 for n in geometry.shape), 1.0])
        described.append(
            AnomalyObject(
                label=label,
                name="motion, whole body" if motion.whole_body else "motion, breathing",
                kind=Pathology.MOTION,
                level=None,
                side=None,
                centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                size_mm=round(motion.amplitude_mm, 2),
                voxels=int(counts[motion_value]),
            )
        )
    return lut[raw], tuple(described)
