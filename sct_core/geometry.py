"""Voxel grids placed in patient space (DICOM LPS millimetres).

Every volume in the project, simulated or received, is described by one :class:`VolumeGeometry`. Arrays are
indexed ``[slice, row, column]`` exactly as a stack of DICOM images is, so the geometry maps straight onto
ImagePositionPatient / ImageOrientationPatient / PixelSpacing without any axis juggling at the boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: Direction cosines must be unit length and orthogonal to this tolerance before a geometry is accepted.
ORTHONORMAL_TOLERANCE = 1e-6


class Orientation(StrEnum):
    """Principal slice orientations a protocol may ask for."""

    SAGITTAL = "sagittal"
    CORONAL = "coronal"
    AXIAL = "axial"


#: (row direction, column direction) for each orientation, as a scanner console writes them for a supine,
#: head-first patient. DICOM's "row direction" is the direction of increasing column index.
_PRINCIPAL_DIRECTIONS: dict[Orientation, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # Sagittal: columns run anterior -> posterior, rows run superior -> inferior (Siemens/Philips default).
    Orientation.SAGITTAL: ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    Orientation.CORONAL: ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    Orientation.AXIAL: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}


def _rotation_about(axis: FloatArray, angle_rad: float) -> FloatArray:
    """Rodrigues rotation matrix about a unit axis."""
    x, y, z = axis / np.linalg.norm(axis)
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    cc = 1.0 - c
    return np.array(
        [
            [c + x * x * cc, x * y * cc - z * s, x * z * cc + y * s],
            [y * x * cc + z * s, c + y * y * cc, y * z * cc - x * s],
            [z * x * cc - y * s, z * y * cc + x * s, c + z * z * cc],
        ]
    )


@dataclass(frozen=True, slots=True)
class VolumeGeometry:
    """A regular voxel grid in patient space.

    ``origin`` is the centre of voxel ``[0, 0, 0]``; ``row_direction`` points along increasing column index,
    ``column_direction`` along increasing row index and ``slice_direction`` along increasing slice index.
    ``spacing`` is ``(slice, row, column)`` spacing in mm, i.e. ``(SpacingBetweenSlices, PixelSpacing[0],
    PixelSpacing[1])``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    slice_direction: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(n) != n or n < 1 for n in self.shape):
            raise ValueError(f"VolumeGeometry.shape must be three positive integers; found {self.shape}")
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(
                f"VolumeGeometry.spacing must be three finite positive mm values; found {self.spacing}"
            )
        basis = np.array([self.row_direction, self.column_direction, self.slice_direction], dtype=np.float64)
        if not np.all(np.isfinite(basis)):
            raise ValueError(f"VolumeGeometry direction cosines must be finite; found {basis.tolist()}")
        gram = basis @ basis.T
        if not np.allclose(gram, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
            raise ValueError(
                "VolumeGeometry direction cosines must be orthonormal (tolerance "
                f"{ORTHONORMAL_TOLERANCE}); found row={self.row_direction}, column={self.column_direction}, "
                f"slice={self.slice_direction}"
            )

    @classmethod
    def from_fov(
        cls,
        *,
        center: tuple[float, float, float],
        fov_mm: tuple[float, float, float],
        voxel_mm: tuple[float, float, float],
        orientation: Orientation | str = Orientation.SAGITTAL,
        oblique_deg: float = 0.0,
    ) -> VolumeGeometry:
        """Build the grid a console prescribes: a box of ``fov_mm`` centred on ``center``.

        ``fov_mm`` and ``voxel_mm`` are ``(extent along the rows' stacking direction, i.e. rows x row spacing;
        extent along a row; slab thickness)`` and ``(row spacing, column spacing, slice spacing)``, the same
        order as DICOM PixelSpacing followed by the slice spacing. ``oblique_deg`` tilts the slab about its
        column direction, as a technologist does to follow the spine.
        """
        orientation = Orientation(orientation)
        row_dir, col_dir = (np.array(v, dtype=np.float64) for v in _PRINCIPAL_DIRECTIONS[orientation])
        if oblique_deg:
            rot = _rotation_about(col_dir, math.radians(oblique_deg))
            row_dir = rot @ row_dir
        slice_dir = np.cross(row_dir, col_dir)
        n_rows = round(fov_mm[0] / voxel_mm[0])
        n_cols = round(fov_mm[1] / voxel_mm[1])
        n_slices = round(fov_mm[2] / voxel_mm[2])
        if min(n_rows, n_cols, n_slices) < 1:
            raise ValueError(f"FOV {fov_mm} mm is smaller than one voxel of {voxel_mm} mm")
        spacing = (float(voxel_mm[2]), float(voxel_mm[0]), float(voxel_mm[1]))
        half_extent = (
            (n_slices - 1) * spacing[0] * slice_dir
            + (n_rows - 1) * spacing[1] * col_dir
            + (n_cols - 1) * spacing[2] * row_dir
        ) / 2.0
        origin = np.asarray(center, dtype=np.float64) - half_extent
        return cls(
            shape=(n_slices, n_rows, n_cols),
            spacing=spacing,
            origin=_tuple3(origin),
            row_direction=_tuple3(row_dir),
            column_direction=_tuple3(col_dir),
            slice_direction=_tuple3(slice_dir),
        )

    @property
    def affine(self) -> FloatArray:
        """4x4 matrix mapping ``(slice, row, column, 1)`` indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, 0] = np.asarray(self.slice_direction) * self.spacing[0]
        m[:3, 1] = np.asarray(self.column_direction) * self.spacing[1]
        m[:3, 2] = np.asarray(self.row_direction) * self.spacing[2]
        m[:3, 3] = self.origin
        return m

    @property
    def image_orientation_patient(self) -> tuple[float, ...]:
        """DICOM ImageOrientationPatient: row direction cosines, then column direction cosines."""
        return (*self.row_direction, *self.column_direction)

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """DICOM PixelSpacing: (row spacing, column spacing)."""
        return (self.spacing[1], self.spacing[2])

    def image_position_patient(self, slice_index: int) -> tuple[float, float, float]:
        """DICOM ImagePositionPatient of one slice: the centre of its first transmitted pixel."""
        return _tuple3(
            np.asarray(self.origin) + slice_index * self.spacing[0] * np.asarray(self.slice_direction)
        )

    @property
    def center(self) -> tuple[float, float, float]:
        """Patient-space centre of the grid."""
        idx = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return _tuple3((self.affine @ np.append(idx, 1.0))[:3])

    def supersampled(self, factor: int) -> VolumeGeometry:
        """The grid with ``factor`` sub-voxels per voxel along each axis, covering exactly the same box.

        The phantom renders anatomy on this grid and averages back, which is how partial volume arises.
        """
        if factor < 1:
            raise ValueError(f"supersampling factor must be >= 1; found {factor}")
        fine_spacing = tuple(s / factor for s in self.spacing)
        shift = -0.5 * (1.0 - 1.0 / factor)
        dirs = (self.slice_direction, self.column_direction, self.row_direction)
        origin = np.asarray(self.origin, dtype=np.float64)
        for axis in range(3):
            origin = origin + shift * self.spacing[axis] * np.asarray(dirs[axis])
        return VolumeGeometry(
            shape=(self.shape[0] * factor, self.shape[1] * factor, self.shape[2] * factor),
            spacing=(fine_spacing[0], fine_spacing[1], fine_spacing[2]),
            origin=_tuple3(origin),
            row_direction=self.row_direction,
            column_direction=self.column_direction,
            slice_direction=self.slice_direction,
        )


def _tuple3(v: FloatArray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))
