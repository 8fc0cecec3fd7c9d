"""Dual-echo RF-spoiled gradient-echo signal (docs/phantom.md, Physics reference).

Per voxel and echo n: S_n = C · Σ_tissues frac_t · [W_t f(T1w) e^{-TE/T2*w} + F_t f(T1f) e^{-TE/T2*f} c(TE)]
with the Ernst steady state f, the multi-peak fat phasor c, the receive bias C, chemical-shift displacement of
fat along the readout, zero-filled partial k-space sampling and complex Gaussian noise whose magnitude is Rician.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import scipy.fft

from engines.phantom.acquisition import SEED_PROTOCOL, Acquisition

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
C64 = npt.NDArray[np.complex64]

#: Fat spectra: (ppm relative to water, relative amplitude). Hamilton 6-peak for adipose tissue, Ren 9-peak
#: for vertebral marrow (docs/phantom.md, Physics reference).
FAT_6PEAK = (
    (-3.80, 0.087),
    (-3.40, 0.693),
    (-2.60, 0.128),
    (-1.94, 0.004),
    (-0.39, 0.039),
    (0.60, 0.048),
)
FAT_MARROW_9PEAK = (
    (-3.8, 0.0899),
    (-3.4, 0.5834),
    (-3.1, 0.0599),
    (-2.68, 0.0849),
    (-2.46, 0.0599),
    (-1.95, 0.0150),
    (-0.5, 0.04),
    (0.49, 0.01),
    (0.59, 0.0569),
)
#: Main methylene peak, the one whose shift sets the readout displacement of fat.
FAT_MAIN_PPM = -3.4

#: Noise standard deviation (in units of the water proton density signal) at the seed protocol: muscle SNR on
#: echo 1 of about 25 near the spine coil.
NOISE_SIGMA_AT_SEED_PROTOCOL = 1.4e-3
#: Receiver gain mapping signal units to stored integers, fixed so intensities compare across cases; clipped to
#: 12 bits as a Siemens console stores magnitude images.
RECEIVER_GAIN = 33000.0
STORED_MAX = 4095


def fat_phasor(te_ms: float, field_t: float, peaks: tuple[tuple[float, float], ...] = FAT_6PEAK) -> complex:
    """Σ a_p exp(i 2π f_p TE): the fat signal's complex weight at one echo time, amplitudes normalised."""
    f0_hz = 42.577478e6 * field_t
    total = sum(a for _, a in peaks)
    return complex(
        sum(a * np.exp(2j * np.pi * ppm * 1e-6 * f0_hz * te_ms * 1e-3) for ppm, a in peaks) / total
    )


def spoiled_gre(t1_ms: F64 | float, tr_ms: float, flip_rad: float) -> F64:
    """Ernst/FLASH steady-state longitudinal factor sin α (1 - E1) / (1 - E1 cos α)."""
    e1 = np.exp(-tr_ms / np.asarray(t1_ms, dtype=np.float64))
    return np.asarray(math.sin(flip_rad) * (1.0 - e1) / (1.0 - e1 * math.cos(flip_rad)))


def spoiled_gre_taylor(t1_ms: F64, tr_ms: float, flip_rad: float) -> tuple[F64, F64, F64]:
    """f(α κ) ≈ f0 + f1 (κ-1) + f2 (κ-1)²: lets a smooth B1 field κ(r) enter as two extra weighted sums instead
    of a per-voxel, per-tissue evaluation. Coefficients by central differences in κ."""
    h = 0.05
    fm = spoiled_gre(t1_ms, tr_ms, flip_rad * (1 - h))
    f0 = spoiled_gre(t1_ms, tr_ms, flip_rad)
    fp = spoiled_gre(t1_ms, tr_ms, flip_rad * (1 + h))
    return f0, (fp - fm) / (2 * h), (fp - 2 * f0 + fm) / (2 * h * h)


def noise_sigma(acq: Acquisition) -> float:
    """Noise level from SNR ∝ V · sqrt(N_pe · N_3D · NEX / (BW_px · N_read)), relative to the seed protocol."""

    def figure(a: Acquisition) -> float:
        n3d, npe, nread = a.acquired_matrix
        volume = a.voxel_mm[0] * a.voxel_mm[1] * a.voxel_mm[2]
        return volume * math.sqrt(npe * n3d * a.number_of_averages / (a.pixel_bandwidth_hz * nread))

    return NOISE_SIGMA_AT_SEED_PROTOCOL * figure(SEED_PROTOCOL) / figure(acq) * acq.noise_scale


def shift_along(volume: C64, axis: int, shift_px: float) -> C64:
    """Sub-pixel shift by linear interpolation (the fat displacement is below one pixel at > 400 Hz/px).

    Edges are clamped, not wrapped: readout oversampling keeps a real scanner's chemical shift from folding
    signal across the FOV.
    """
    if abs(shift_px) < 1e-6:
        return volume
    n = volume.shape[axis]
    whole = math.floor(shift_px)
    frac = np.float32(shift_px - whole)
    source = np.arange(n) - whole
    a = np.take(volume, np.clip(source, 0, n - 1), axis=axis)
    b = np.take(volume, np.clip(source - 1, 0, n - 1), axis=axis)
    return np.asarray((1 - frac) * a + frac * b, dtype=np.complex64)


def truncate_kspace(volume: C64, fractions: tuple[float, float, float]) -> C64:
    """Zero the outer k-space the scanner did not acquire along each axis with a fraction below 1."""
    axes = [i for i, f in enumerate(fractions) if f < 0.999]
    if not axes:
        return volume
    k = scipy.fft.fftn(volume, axes=axes, workers=2)
    for axis in axes:
        n = volume.shape[axis]
        keep = max(1, round(n * fractions[axis]))
        freqs = np.abs(scipy.fft.fftfreq(n) * n)
        mask = freqs > keep / 2.0
        index: list[slice | npt.NDArray[np.bool_]] = [slice(None)] * 3
        index[axis] = mask
        k[tuple(index)] = 0
    return np.asarray(scipy.fft.ifftn(k, axes=axes, workers=2), dtype=np.complex64)
