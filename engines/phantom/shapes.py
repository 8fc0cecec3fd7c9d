"""Solid primitives the anatomy is built from, each able to say which points of a grid block lie inside it.

Every primitive lives in its own local frame (``center`` plus a rotation whose columns are the local x, y, z
axes in patient space) and has a local bounding box, so the renderer evaluates it only on the few grid points
near it. Inside-tests take local coordinates as float32 arrays; that is where nearly all phantom time goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engines.phantom.tissues import Tissue

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


def frame_from_axes(axis: F64, up_hint: F64) -> F64:
    """Right-handed frame whose local x is ``axis`` and whose local z is as close to ``up_hint`` as possible."""
    x = axis / np.linalg.norm(axis)
    z = up_hint - np.dot(up_hint, x) * x
    norm = np.linalg.norm(z)
    if norm < 1e-9:  # up_hint parallel to axis: pick any perpendicular
        z = np.cross(x, np.array([1.0, 0.0, 0.0]) if abs(x[0]) < 0.9 else np.array([0.0, 1.0, 0.0]))
        norm = np.linalg.norm(z)
    z = z / norm
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


@dataclass(frozen=True, slots=True, eq=False)
class Primitive:
    """Base: a solid painted with ``label``. Subclasses implement :meth:`inside` and :meth:`local_half_extent`."""

    label: Tissue
    center: F64
    frame: F64  # 3x3, columns = local axes in patient space

    def local_half_extent(self) -> F64:
        raise NotImplementedError

    def inside(self, x: F32, y: F32, z: F32) -> Mask:
        raise NotImplementedError

    def world_bounds(self) -> tuple[F64, F64]:
        """Axis-aligned patient-space box containing the primitive."""
        half = np.abs(self.frame) @ self.local_half_extent()
        return self.center - half, self.center + half


@dataclass(frozen=True, slots=True, eq=False)
class Ellipsoid(Primitive):
    radii: F64

    def local_half_extent(self) -> F64:
        return self.radii

    def inside(self, x: F32, y: F32, z: F32) -> Mask:
        rx, ry, rz = (float(r) for r in self.radii)
        return np.asarray((x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2 <= 1.0)


@dataclass(frozen=True, slots=True, eq=False)
class Capsule(Primitive):
    """A segment of length ``length`` along local x with an elliptical cross-section (radii along local y, z)
    and ellipsoidal end caps. Rods, plates and tubes of the anatomy are all capsules."""

    length: float
    radius_y: float
    radius_z: float

    @classmethod
    def between(
        cls,
        label: Tissue,
        start: F64,
        end: F64,
        radius_y: float,
        radius_z: float,
        up_hint: F64,
    ) -> Capsule:
        """A capsule from ``start`` to ``end`` whose ``radius_z`` lies along ``up_hint`` (projected)."""
        axis = np.asarray(end, dtype=np.float64) - np.asarray(start, dtype=np.float64)
        length = float(np.linalg.norm(axis))
        if length < 1e-6:
            axis = np.asarray(up_hint, dtype=np.float64)[[1, 2, 0]] + np.array([1.0, 0.0, 0.0])
        frame = frame_from_axes(axis, np.asarray(up_hint, dtype=np.float64))
        center = (np.asarray(start, dtype=np.float64) + np.asarray(end, dtype=np.float64)) / 2.0
        return cls(
            label=label, center=center, frame=frame, length=length, radius_y=radius_y, radius_z=radius_z
        )

    def local_half_extent(self) -> F64:
        cap = min(self.radius_y, self.radius_z)
        return np.array([self.length / 2.0 + cap, self.radius_y, self.radius_z])

    def inside(self, x: F32, y: F32, z: F32) -> Mask:
        half = np.float32(self.length / 2.0)
        cap = np.float32(min(self.radius_y, self.radius_z))
        beyond = np.maximum(np.abs(x) - half, np.float32(0.0)) / cap
        return np.asarray(
            beyond * beyond + (y / np.float32(self.radius_y)) ** 2 + (z / np.float32(self.radius_z)) ** 2
            <= 1.0
        )

    def shrunk(self, by: float, label: Tissue) -> Capsule:
        """The same capsule with every radius reduced by ``by`` mm (the marrow inside a cortical shell)."""
        return Capsule(
            label=label,
            center=self.center,
            frame=self.frame,
            length=self.length,
            radius_y=max(self.radius_y - by, 0.3),
            radius_z=max(self.radius_z - by, 0.3),
        )


@dataclass(frozen=True, slots=True, eq=False)
class VertebralBody(Primitive):
    """A vertebral body (or a disc, which shares its footprint) in its own frame: x left, y posterior, z along
    the spine's axis.

    The footprint is an ellipse with a posterior concavity (the anterior wall of the spinal canal); the sides
    narrow at mid-height (``waist``); the height varies linearly from front to back (``wedge``, lordosis); the
    endplates are concave by ``endplate_concavity`` mm at the centre. Shrinking by a shell thickness gives the
    trabecular interior.
    """

    half_width: float
    half_depth: float
    height: float
    wedge_rad: float
    waist: float
    endplate_concavity: float
    canal_radius: float
    canal_depth: float
    convex_endplates: bool = False

    def local_half_extent(self) -> F64:
        h = self.height / 2.0 + abs(np.tan(self.wedge_rad)) * self.half_depth / 2.0 + self.endplate_concavity
        return np.array([self.half_width, self.half_depth, h])

    def inside(self, x: F32, y: F32, z: F32) -> Mask:
        half_h = np.float32(self.height / 2.0) - np.float32(np.tan(self.wedge_rad) / 2.0) * y
        zeta = z / half_h
        shrink = np.float32(1.0) - np.float32(self.waist) * (np.float32(1.0) - np.minimum(zeta * zeta, 1.0))
        q = (x / (np.float32(self.half_width) * shrink)) ** 2 + (
            y / (np.float32(self.half_depth) * shrink)
        ) ** 2
        inside = q <= 1.0
        # Posterior concavity: a circle centred behind the posterior wall.
        yc = np.float32(self.half_depth + self.canal_radius - self.canal_depth)
        inside &= x * x + (y - yc) ** 2 >= np.float32(self.canal_radius**2)
        dip = np.float32(self.endplate_concavity) * (np.float32(1.0) - np.minimum(q, np.float32(1.0)))
        if self.convex_endplates:  # a disc: it fills the endplate concavities of its neighbours
            inside &= np.abs(z) <= half_h + dip
        else:
            inside &= np.abs(z) <= half_h - dip
        return np.asarray(inside)

    def shrunk(self, side: float, endplate: float, label: Tissue) -> VertebralBody:
        return VertebralBody(
            label=label,
            center=self.center,
            frame=self.frame,
            half_width=self.half_width - side,
            half_depth=self.half_depth - side,
            height=self.height - 2.0 * endplate,
            wedge_rad=self.wedge_rad,
            waist=self.waist,
            endplate_concavity=self.endplate_concavity,
            canal_radius=self.canal_radius + side,
            canal_depth=self.canal_depth,
            convex_endplates=self.convex_endplates,
        )
