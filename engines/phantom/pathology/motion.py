"""Patient motion during the scan: ghosts along the phase-encoding axis.

k-space is filled one phase-encoding line at a time (the 3D partitions of a line inside it), so a periodic
displacement during the scan makes each line see the moving tissue at another position. A displacement d of
an object multiplies its k-space by exp(-i2π k·d); applied line by line with the d of the line's acquisition
time, the modulation along the phase-encoding axis replicates the moving tissue as ghosts spaced
FOV_pe · T_line / T_period apart along that axis, never along the readout (within one line d is constant, which
only shifts the line's data). Breathing moves the anterior body: the moving share of each voxel's signal rises
from 0 behind the front 55 % of the body's depth to 1 at the anterior skin; a restless patient moves as a whole.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import scipy.fft

from engines.phantom.acquisition import Acquisition
from engines.phantom.anatomy import Torso
from engines.phantom.pathology.placement import MotionPattern
from engines.phantom.pathology.susceptibility import readout_axis_index
from sct_core.geometry import VolumeGeometry

F32 = npt.NDArray[np.float32]
C64 = npt.NDArray[np.complex64]

#: Breathing moves only the front of the abdomen: share of the body depth (from the back) that stays still.
STILL_DEPTH_FRACTION = 0.45


def phase_encoding_axis(acq: Acquisition) -> int:
    """The in-plane array axis that is not the readout (axis 0, the slab, is the 3D partition axis)."""
    return 1 if readout_axis_index(acq) == 2 else 2


def _patient_coordinate(geometry: VolumeGeometry, lps_axis: int) -> F32:
    """One patient coordinate (mm) of every voxel centre, as a sum of three broadcast 1-D terms."""
    affine = geometry.affine
    n0, n1, n2 = geometry.shape
    value = (
        np.float32(affine[lps_axis, 3])
        + (np.arange(n0, dtype=np.float32) * np.float32(affine[lps_axis, 0]))[:, None, None]
        + (np.arange(n1, dtype=np.float32) * np.float32(affine[lps_axis, 1]))[None, :, None]
        + (np.arange(n2, dtype=np.float32) * np.float32(affine[lps_axis, 2]))[None, None, :]
    )
    return np.asarray(value, dtype=np.float32)


def moving_weight(geometry: VolumeGeometry, torso: Torso, pattern: MotionPattern) -> F32:
    """Share of each voxel's signal that moves with the pattern (1 everywhere for whole-body motion)."""
    if pattern.whole_body:
        return np.ones(geometry.shape, dtype=np.float32)
    y = _patient_coordinate(geometry, 1)
    z = _patient_coordinate(geometry, 2)
    back = np.interp(z, torso.z, torso.back_y).astype(np.float32)
    depth = 2.0 * np.interp(z, torso.z, torso.half_depth).astype(np.float32)
    from_back = (back - y) / depth  # 0 at the back skin, 1 at the anterior skin
    ramp = np.clip((from_back - STILL_DEPTH_FRACTION) / (1.0 - STILL_DEPTH_FRACTION), 0.0, 1.0)
    return np.asarray(ramp * ramp * (3.0 - 2.0 * ramp), dtype=np.float32)  # smoothstep


def line_displacements_mm(acq: Acquisition, geometry: VolumeGeometry, pattern: MotionPattern) -> npt.NDArray[np.float64]:  # fmt: skip
    """Displacement along each array axis (mm) at the acquisition time of every phase-encoding line, in FFT
    order: shape (lines, 3). Lines are acquired from the most negative to the most positive k; each takes the
    partitions x TR x averages."""
    pe = phase_encoding_axis(acq)
    n = geometry.shape[pe]
    acquired = acq.acquired_matrix
    line_s = acquired[0] * acq.repetition_time_ms * 1e-3 * acq.number_of_averages
    k_index = scipy.fft.fftfreq(n) * n
    t = (k_index + acquired[pe] / 2.0) * line_s
    amplitude = pattern.amplitude_mm * np.sin(2.0 * np.pi * t / pattern.period_s + pattern.phase_rad)
    dirs = np.array([geometry.slice_direction, geometry.column_direction, geometry.row_direction])
    along_axes = dirs @ np.asarray(pattern.direction)
    return np.asarray(amplitude[:, None] * along_axes[None, :])


class Ghosting:
    """The ghost image of one case's motion: ``ghost(signal)`` is what motion adds to a complex echo image.

    The readout axis is zero-padded by the largest displacement before the FFT: a scanner oversamples the
    readout, so tissue moving past the FOV's edge along it does not wrap round to the other side (along the
    phase-encoding and partition axes ghosts do wrap, as on a scanner).
    """

    def __init__(
        self, acq: Acquisition, geometry: VolumeGeometry, weight: F32, pattern: MotionPattern
    ) -> None:
        self.weight = weight
        shape = geometry.shape
        pe = phase_encoding_axis(acq)
        self.readout = readout_axis_index(acq)
        self.readout_length = shape[self.readout]
        padded = list(shape)
        margin = math.ceil((pattern.amplitude_mm + 2.0) / geometry.spacing[self.readout])
        padded[self.readout] = scipy.fft.next_fast_len(shape[self.readout] + margin)
        self.padded = tuple(padded)
        disp = line_displacements_mm(acq, geometry, pattern)
        k = [scipy.fft.fftfreq(n, d=s) for n, s in zip(padded, geometry.spacing, strict=True)]
        # exp(-i2π Σ_a k_a d_a(line)) - 1, broadcast over the other axes: the change in k-space per unit moving signal.
        phase = np.zeros(padded, dtype=np.float32)
        for axis in range(3):
            term_shape = [1, 1, 1]
            term_shape[pe] = padded[pe]
            if axis == pe:
                term = k[axis] * disp[:, axis]
            else:
                term_shape[axis] = padded[axis]
                first, second = (disp[:, axis], k[axis]) if pe < axis else (k[axis], disp[:, axis])
                term = np.multiply.outer(first, second)
            phase += (-2.0 * np.pi * term).astype(np.float32).reshape(term_shape)
        self.change = (np.exp(1j * phase) - 1.0).astype(np.complex64)

    def ghost(self, signal: C64) -> C64:
        spectrum = scipy.fft.fftn(signal * self.weight, s=self.padded, workers=2)
        spectrum *= self.change
        ghost = scipy.fft.ifftn(spectrum, workers=2)
        return np.asarray(
            np.take(ghost, np.arange(self.readout_length), axis=self.readout), dtype=np.complex64
        )
