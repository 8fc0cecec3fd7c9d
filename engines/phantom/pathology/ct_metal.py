"""CT metal artefacts: beam hardening and photon starvation along rays through metal, reconstructed as streaks.

A simplified model in each axial plane (the scanner's gantry plane). Along every ray of a parallel-beam sinogram
the metal's line integral is p_m = μ_Ti·L and the body's p_b (the torso outline at that height as a water
ellipse: rays also cross the body outside the MR FOV). What the detector reports falls short of p_b + p_m in two
ways: few photons get through, and a detector floor (electronic noise) caps the measured attenuation, so
-ln(e^-p + floor) saturates near p_max = -ln(floor); and the polychromatic beam hardens in metal (a c·p_m²
deficit). Photon starvation also adds noise of variance (e^(p_b+p_m) - e^(p_b)) / N0. The difference from the
same ray without metal, filtered back-projected (Ram-Lak), is the streak image added to the CT before its
point-spread and noise: dark streaks along the rays of longest metal path (off the ends of each screw, between
the screws where lateral rays cross both and most of the body), bright streaks beside them, radial noise
streaks. Planes are processed at half the grid's in-plane resolution and only where there is metal; the
projector is one sparse matrix shared by all planes.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt
import scipy.fft
import scipy.ndimage
import scipy.sparse

from engines.phantom.anatomy import Torso
from engines.phantom.pathology.materials import HU_TITANIUM
from sct_core.geometry import VolumeGeometry

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Linear attenuation of water at the effective energy of a 120 kVp beam (1/mm); HU = 1000 (μ/μ_w − 1).
MU_WATER_PER_MM = 0.019
MU_TITANIUM_PER_MM = MU_WATER_PER_MM * (1.0 + HU_TITANIUM / 1000.0)
#: Beam-hardening deficit of the metal line integral, c·p_m² (*assumed*).
BEAM_HARDENING_C = 0.01
#: Highest attenuation the detector can report, -ln(floor), and unattenuated photons per ray (*assumed*; with
#: these, titanium fixation streaks read a few hundred HU within a few cm of the screws, as on clinical CT).
DETECTOR_MAX_ATTENUATION = 10.0
PHOTONS_PER_RAY = 1e6
#: Views over 180 degrees and the in-plane binning of the streak grid.
VIEWS = 180
PLANE_BINNING = 2


def axial_axis(geometry: VolumeGeometry) -> int:
    """The array axis closest to the patient's superior-inferior axis: planes across it are the gantry planes."""
    dirs = np.array([geometry.slice_direction, geometry.column_direction, geometry.row_direction])
    return int(np.argmax(np.abs(dirs[:, 2])))


@functools.lru_cache(maxsize=4)
def _projector(
    shape: tuple[int, int], spacing: tuple[float, float]
) -> tuple[scipy.sparse.csr_matrix, int, float]:
    """Sparse (views x bins, pixels) matrix of linear-interpolation weights of a parallel-beam projector, the
    number of detector bins and the bin width (mm)."""
    du, dv = spacing
    ds = max(du, dv)  # no bin between two pixels' splats stays empty
    u = (np.arange(shape[0]) - (shape[0] - 1) / 2.0) * du
    v = (np.arange(shape[1]) - (shape[1] - 1) / 2.0) * dv
    uu, vv = (a.ravel() for a in np.meshgrid(u, v, indexing="ij"))
    bins = 2 * math.ceil(math.hypot(u[-1], v[-1]) / ds) + 3
    theta = np.arange(VIEWS) * math.pi / VIEWS
    position = (np.outer(np.cos(theta), uu) + np.outer(np.sin(theta), vv)) / ds + (bins - 1) / 2.0
    first = np.floor(position).astype(np.int64)
    upper = position - first
    view_offset = (np.arange(VIEWS, dtype=np.int64) * bins)[:, None]
    pixel = np.broadcast_to(np.arange(uu.size, dtype=np.int64)[None, :], first.shape)
    rows = np.concatenate([(view_offset + first).ravel(), (view_offset + first + 1).ravel()])
    cols = np.concatenate([pixel.ravel(), pixel.ravel()])
    data = np.concatenate([(1.0 - upper).ravel(), upper.ravel()]).astype(np.float32)
    matrix = scipy.sparse.csr_matrix((data, (rows, cols)), shape=(VIEWS * bins, uu.size))
    return matrix, bins, ds


def _ramp_filter(sinogram: F64, ds: float) -> F64:
    """Ram-Lak filtering along the detector axis (axis 1) from the band-limited spatial kernel (Kak & Slaney),
    zero-padded against wrap-around."""
    bins = sinogram.shape[1]
    size = scipy.fft.next_fast_len(2 * bins)
    n = np.concatenate([np.arange(0, size // 2 + 1), np.arange(-(size // 2) + (1 - size % 2), 0)])
    kernel = np.zeros(size)
    kernel[0] = 1.0 / (4.0 * ds * ds)
    odd = n % 2 == 1
    kernel[odd] = -1.0 / (math.pi * n[odd] * ds) ** 2
    response = np.real(scipy.fft.fft(kernel)) * ds
    spectrum = scipy.fft.fft(sinogram, n=size, axis=1, workers=2) * response[None, :, None]
    return np.asarray(np.real(scipy.fft.ifft(spectrum, axis=1, workers=2))[:, :bins])


def filtered_back_projection(planes: F64, spacing: tuple[float, float], sinogram: F64) -> F64:
    """Reconstruct (planes, u, v) images from sinograms (views, bins, planes) on the grid of ``planes``."""
    matrix, bins, ds = _projector(planes.shape[1:], spacing)
    filtered = _ramp_filter(sinogram, ds).reshape(VIEWS * bins, -1)
    image = (matrix.T @ filtered) * (math.pi / VIEWS)
    return np.asarray(image.T.reshape(planes.shape))


def project(planes: F64, spacing: tuple[float, float]) -> F64:
    """Line integrals (mm x value) of (planes, u, v) images: sinograms (views, bins, planes)."""
    matrix, bins, ds = _projector(planes.shape[1:], spacing)
    flat = planes.reshape(planes.shape[0], -1).T
    return np.asarray((matrix @ flat) * (spacing[0] * spacing[1] / ds)).reshape(VIEWS, bins, -1)


def _binned(stack: F32, factor: int) -> F64:
    """Mean over factor x factor blocks of the last two axes (edges padded with zeros)."""
    p, a, b = stack.shape
    pa, pb = -a % factor, -b % factor
    padded = np.pad(stack, ((0, 0), (0, pa), (0, pb))).astype(np.float64)
    return np.asarray(
        padded.reshape(p, (a + pa) // factor, factor, (b + pb) // factor, factor).mean(axis=(2, 4))
    )


def _body_attenuation(
    torso: Torso, geometry: VolumeGeometry, axis: int, planes: npt.NDArray[np.intp], binned: tuple[int, int]
) -> F64:
    """Water-equivalent line integral of the body along every ray of every plane: (views, bins, planes).

    The torso at each plane's height is an ellipse (half width, half depth, centred in front of the back); a
    ray at offset s with normal n crosses it over 2ab·sqrt(h² - (s - s_c)²)/h², h the ellipse's support along n.
    """
    in_plane = [a for a in range(3) if a != axis]
    dirs = np.array([geometry.slice_direction, geometry.column_direction, geometry.row_direction])
    _, bins, ds = _projector(binned, (geometry.spacing[in_plane[0]] * PLANE_BINNING,
                                      geometry.spacing[in_plane[1]] * PLANE_BINNING))  # fmt: skip
    theta = np.arange(VIEWS) * math.pi / VIEWS
    normal = np.outer(np.cos(theta), dirs[in_plane[0]]) + np.outer(np.sin(theta), dirs[in_plane[1]])
    s = (np.arange(bins) - (bins - 1) / 2.0) * ds
    out = np.zeros((VIEWS, bins, planes.size))
    for j, plane in enumerate(planes):
        index = np.zeros(4)
        index[3] = 1.0
        index[axis] = plane
        for a, n in zip(in_plane, binned, strict=True):
            index[a] = PLANE_BINNING * n / 2.0 - 0.5  # centre of the binned grid, in original indices
        centre_of_grid = (geometry.affine @ index)[:3]
        z = centre_of_grid[2]
        half_width = float(np.interp(z, torso.z, torso.half_width))
        half_depth = float(np.interp(z, torso.z, torso.half_depth))
        body_centre = np.array(
            [
                float(np.interp(z, torso.z, torso.center_x)),
                float(np.interp(z, torso.z, torso.back_y)) - half_depth,
            ]
        )
        offset = body_centre - centre_of_grid[:2]
        h = np.sqrt((half_width * normal[:, 0]) ** 2 + (half_depth * normal[:, 1]) ** 2)[:, None]
        s_centre = (normal[:, :2] @ offset)[:, None]
        chord = (
            2.0
            * half_width
            * half_depth
            * np.sqrt(np.maximum(h * h - (s[None, :] - s_centre) ** 2, 0.0))
            / (h * h)
        )
        out[:, :, j] = MU_WATER_PER_MM * chord
    return out


def _measured(p: F64) -> F64:
    """Attenuation the detector reports for a true line integral p: capped by the detector floor."""
    return np.asarray(-np.log(np.exp(-p) + math.exp(-DETECTOR_MAX_ATTENUATION)))


def streaks_hu(metal_fraction: F32, geometry: VolumeGeometry, torso: Torso, seed: int) -> F32:
    """The metal-artefact HU to add to the CT (zero in planes without metal)."""
    out = np.zeros(geometry.shape, dtype=np.float32)
    axis = axial_axis(geometry)
    in_plane = [a for a in range(3) if a != axis]
    stack_all = np.moveaxis(metal_fraction, axis, 0)
    planes = np.flatnonzero(stack_all.any(axis=(1, 2)))
    if planes.size == 0:
        return out
    spacing = (geometry.spacing[in_plane[0]] * PLANE_BINNING, geometry.spacing[in_plane[1]] * PLANE_BINNING)
    metal = _binned(stack_all[planes], PLANE_BINNING)
    p_metal = project(metal, spacing) * MU_TITANIUM_PER_MM
    p_body = _body_attenuation(torso, geometry, axis, planes, (metal.shape[1], metal.shape[2]))
    rng = np.random.default_rng([seed, 0xC7, 0x5E7A])
    starved = np.maximum(np.exp(p_body + p_metal) - np.exp(p_body), 0.0) / PHOTONS_PER_RAY
    error = (
        _measured(p_body + p_metal)
        - _measured(p_body)
        - p_metal
        - BEAM_HARDENING_C * p_metal * p_metal
        + np.sqrt(starved) * rng.standard_normal(p_metal.shape)
    )
    hu = 1000.0 / MU_WATER_PER_MM * filtered_back_projection(metal, spacing, error)
    a, b = stack_all.shape[1:]
    zoom = (1.0, float(PLANE_BINNING), float(PLANE_BINNING))
    full = scipy.ndimage.zoom(hu.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")[:, :a, :b]
    np.moveaxis(out, axis, 0)[planes] = full
    return out
