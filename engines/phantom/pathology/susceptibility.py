"""B0 perturbation by metal and what it does to the MR signal: readout displacement and intravoxel dephasing.

The field offset is the dipole-kernel convolution of the susceptibility map, computed in k-space:
ΔB/B0 = F⁻¹[(1/3 − (k·b)²/|k|²) F[Δχ]], b the unit vector of B0 (the bore axis, the patient's
superior-inferior axis) expressed in the grid's array axes, so any slice orientation and oblique is handled.
A 3D gradient echo only mis-maps along the frequency-encoding (readout) axis: each voxel's signal lands Δf/BW
pixels away (forward mapping by linear splatting, which conserves signal, so voids and pile-ups appear as on a
scanner). Within a voxel, the field gradient spreads the phase at echo time TE; for a linear field across a box
voxel the signal is multiplied by Π_axes sinc(G·Δ·TE), which is why the longer echo loses more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.fft

from engines.phantom.acquisition import Acquisition
from engines.phantom.pathology.materials import CHI_TISSUE_PPM, CHI_TITANIUM_PPM
from sct_core.geometry import VolumeGeometry

F32 = npt.NDArray[np.float32]
C64 = npt.NDArray[np.complex64]
Box = tuple[slice, slice, slice]

#: The field is computed within this distance of the metal; further out it is below 1 ppm for a 6.5 mm screw
#: (a 0.1-0.2 px shift at 540 Hz/px), and the signal change below the footprint threshold.
FIELD_MARGIN_MM = 40.0
#: Zero padding beyond the margin before the FFT, so that the periodic convolution does not wrap the field of
#: one side of the box onto the other.
FIELD_PADDING_MM = 40.0
#: Lines whose largest displacement is below this (pixels) are left as they are.
MIN_SHIFT_PX = 1e-3
#: B0 along the bore: the patient's superior-inferior axis (LPS z) for a supine patient in a cylindrical magnet.
B0_DIRECTION_LPS = (0.0, 0.0, 1.0)


@dataclass(frozen=True, slots=True, eq=False)
class FieldMap:
    """The off-resonance (Hz) caused by metal over ``region``: the metal's box plus margin, extended to the
    whole readout so that displaced signal never leaves it."""

    region: Box
    offset_hz: F32


def readout_axis_index(acq: Acquisition) -> int:
    """Array axis of the frequency-encoding direction ("row": along a row, i.e. the column index)."""
    return 2 if acq.readout_axis == "row" else 1


def b0_in_array_axes(geometry: VolumeGeometry) -> npt.NDArray[np.float64]:
    """Components of the B0 unit vector along the (slice, row index, column index) axes."""
    dirs = np.array([geometry.slice_direction, geometry.column_direction, geometry.row_direction])
    return np.asarray(dirs @ np.asarray(B0_DIRECTION_LPS))


def dipole_field_ppm(delta_chi_ppm: F32, spacing: tuple[float, float, float], b0_axes: npt.NDArray[np.float64],
                     padded_shape: tuple[int, int, int]) -> F32:  # fmt: skip
    """ΔB/B0 (ppm) of a susceptibility map by the k-space dipole kernel, zero-padded to ``padded_shape``.

    The kernel's k = 0 term is set to 0: a uniform offset is removed by the scanner's frequency adjustment.
    """
    k = [
        scipy.fft.fftfreq(n, d=s).astype(np.float32)
        for n, s in zip(padded_shape[:2], spacing[:2], strict=True)
    ]
    k.append(scipy.fft.rfftfreq(padded_shape[2], d=spacing[2]).astype(np.float32))
    k0, k1, k2 = k[0][:, None, None], k[1][None, :, None], k[2][None, None, :]
    kb = k0 * np.float32(b0_axes[0]) + k1 * np.float32(b0_axes[1]) + k2 * np.float32(b0_axes[2])
    k2sum = k0 * k0 + k1 * k1 + k2 * k2
    k2sum[0, 0, 0] = 1.0
    kernel = np.float32(1.0 / 3.0) - kb * kb / k2sum
    kernel[0, 0, 0] = 0.0
    spectrum = scipy.fft.rfftn(delta_chi_ppm, s=padded_shape, workers=2)
    spectrum *= kernel
    field = scipy.fft.irfftn(spectrum, s=padded_shape, workers=2)
    n0, n1, n2 = delta_chi_ppm.shape
    return np.asarray(field[:n0, :n1, :n2], dtype=np.float32)


def metal_field(metal_fraction: F32, geometry: VolumeGeometry, acq: Acquisition) -> FieldMap | None:
    """The off-resonance map of the metal in the FOV (None if there is none). Metal outside the FOV adds no
    field (docs/phantom.md, Pathology, simplifications)."""
    occupied = [
        np.flatnonzero(metal_fraction.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)
    ]
    if occupied[0].size == 0:
        return None
    readout = readout_axis_index(acq)
    box: list[slice] = []
    region: list[slice] = []
    padded: list[int] = []
    for axis, idx in enumerate(occupied):
        margin = math.ceil(FIELD_MARGIN_MM / geometry.spacing[axis])
        lo, hi = max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, geometry.shape[axis])
        box.append(slice(lo, hi))
        region.append(slice(0, geometry.shape[axis]) if axis == readout else slice(lo, hi))
        pad = math.ceil(FIELD_PADDING_MM / geometry.spacing[axis])
        padded.append(scipy.fft.next_fast_len(hi - lo + pad, real=True))
    chi = metal_fraction[box[0], box[1], box[2]] * np.float32(CHI_TITANIUM_PPM - CHI_TISSUE_PPM)
    field = dipole_field_ppm(
        chi, geometry.spacing, b0_in_array_axes(geometry), (padded[0], padded[1], padded[2])
    )
    offset = np.zeros(tuple(s.stop - s.start for s in region), dtype=np.float32)
    inner = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region, strict=True))
    offset[inner] = field * np.float32(acq.imaging_frequency_mhz)  # ppm x MHz = Hz
    return FieldMap(region=(region[0], region[1], region[2]), offset_hz=offset)


class _SplatPlan:
    """Where each voxel of the lines of a region goes when displaced along one axis: target indices and
    linear-splat weights of its two neighbours, computed once and applied to every echo's water and fat."""

    def __init__(self, shift_px: F32, axis: int) -> None:
        self.axis = axis
        moved_shape = np.moveaxis(shift_px, axis, -1).shape
        self.moved_shape = moved_shape
        n = moved_shape[-1]
        shifts = np.ascontiguousarray(np.moveaxis(shift_px, axis, -1)).reshape(-1, n)
        self.active = np.flatnonzero(np.abs(shifts).max(axis=1) > MIN_SHIFT_PX)
        d = shifts[self.active]
        target = np.arange(n, dtype=np.float32)[None, :] + d
        first = np.floor(target).astype(np.int64)
        upper = (target - first).astype(np.float32)
        base = np.arange(self.active.size, dtype=np.int64)[:, None] * n
        indices, weights, sources = [], [], []
        source = np.arange(self.active.size * n, dtype=np.int64).reshape(-1, n)
        for index, weight in ((first, 1.0 - upper), (first + 1, upper)):
            indices.append((base + np.clip(index, 0, n - 1)).ravel())
            weights.append(weight.ravel())
            sources.append(source.ravel())
        self.target = np.concatenate(indices)
        self.weight = np.concatenate(weights).astype(np.float64)
        self.source = np.concatenate(sources)
        self.size = self.active.size * n

    def apply(self, values: C64) -> C64:
        """``values`` (the region) with the displacement applied. Signal pushed past a line's end stays in its
        last pixel: the scanner oversamples the readout, and the phantom has no tissue beyond the FOV whose
        signal would move in instead."""
        n = self.moved_shape[-1]
        lines = np.ascontiguousarray(np.moveaxis(values, self.axis, -1)).reshape(-1, n)
        if self.active.size:
            src = lines[self.active].reshape(-1)[self.source]
            real = np.bincount(self.target, weights=self.weight * src.real, minlength=self.size)
            imag = np.bincount(self.target, weights=self.weight * src.imag, minlength=self.size)
            lines[self.active] = (real + 1j * imag).reshape(self.active.size, n).astype(np.complex64)
        return np.moveaxis(lines.reshape(self.moved_shape), -1, self.axis)


class MetalDistortion:
    """What one case's metal field does to each echo's water and fat, before chemical shift, noise and k-space
    sampling: dephasing (sinc of the through-voxel field change x TE), phase winding Δf·TE and displacement of
    Δf/BW pixels along the readout (the sign alternates between echoes of a bipolar readout, as the fat shift
    does). Field gradients and splat plans are computed once and shared by the echoes."""

    def __init__(self, field: FieldMap, acq: Acquisition, geometry: VolumeGeometry) -> None:
        self.field = field
        self.acq = acq
        offset = field.offset_hz
        #: Field change across one voxel along each axis (Hz).
        self.across_voxel = [
            (np.gradient(offset, geometry.spacing[a], axis=a) * np.float32(geometry.spacing[a])).astype(
                np.float32
            )
            for a in range(3)
            if offset.shape[a] > 1
        ]
        self._plans: dict[float, _SplatPlan] = {}

    def _plan(self, sign: float) -> _SplatPlan:
        if sign not in self._plans:
            shift = (self.field.offset_hz * np.float32(sign / self.acq.pixel_bandwidth_hz)).astype(np.float32)
            self._plans[sign] = _SplatPlan(shift, readout_axis_index(self.acq))
        return self._plans[sign]

    def dephasing(self, te_ms: float) -> F32:
        """Π_axes sinc(ΔΔf_a · TE) for a field varying linearly across a box voxel."""
        te_s = np.float32(te_ms * 1e-3)
        factor = np.ones(self.field.offset_hz.shape, dtype=np.float32)
        for change in self.across_voxel:
            factor *= np.sinc(change * te_s).astype(np.float32)
        return factor

    def __call__(self, water: npt.NDArray[np.float32] | C64, fat: C64, echo: int) -> tuple[C64, C64]:
        te_ms = self.acq.echo_times_ms[echo]
        sign = -1.0 if (self.acq.bipolar_readout and echo % 2 == 1) else 1.0
        winding = np.exp((2j * np.pi * te_ms * 1e-3) * self.field.offset_hz).astype(np.complex64)
        factor = self.dephasing(te_ms) * winding
        plan = self._plan(sign)
        region = self.field.region
        out_water = np.asarray(water, dtype=np.complex64).copy()
        out_fat = np.asarray(fat, dtype=np.complex64).copy()
        for out in (out_water, out_fat):
            out[region] = plan.apply(out[region] * factor)
        return out_water, out_fat
