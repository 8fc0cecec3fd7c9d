"""Pathology's effects on each echo's complex signal, in the phantom's order, and where they change it.

Metal distortion acts on water and fat before the chemical shift (both pools sit in the same perturbed field);
motion acts on the echo's whole complex image. Both come before noise and k-space truncation. Each records the
voxels whose noiseless magnitude it changes by more than FOOTPRINT_SIGNAL on any echo: the footprint that the
ground truth (``PhantomCase.anomaly``) adds to the objects themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from engines.phantom import mr_signal
from engines.phantom.acquisition import Acquisition
from engines.phantom.pathology.motion import Ghosting
from engines.phantom.pathology.susceptibility import FieldMap, MetalDistortion
from sct_core.geometry import VolumeGeometry

F32 = npt.NDArray[np.float32]
C64 = npt.NDArray[np.complex64]
Combine = Callable[[npt.NDArray[np.float32] | C64, C64], C64]

#: A change of the noiseless magnitude larger than 3 noise sigmas of the seed protocol (in signal units; about
#: 140 stored values, 10-20 % of muscle) is part of a footprint. Fixed, not the acquisition's own sigma, so that
#: footprints compare across bandwidths and noise settings.
FOOTPRINT_SIGNAL = 3.0 * mr_signal.NOISE_SIGMA_AT_SEED_PROTOCOL


class EchoEffects:
    """Callable the phantom's MR step hands each echo's water and fat to (``generate._mr_images``)."""

    def __init__(
        self,
        acq: Acquisition,
        geometry: VolumeGeometry,
        field: FieldMap | None,
        ghosting: Ghosting | None,
    ) -> None:
        self.acq = acq
        self.geometry = geometry
        self.field = field
        self.distortion = MetalDistortion(field, acq, geometry) if field is not None else None
        self.ghosting = ghosting
        self.metal_footprint = np.zeros(geometry.shape, dtype=bool) if field is not None else None
        self.motion_footprint = np.zeros(geometry.shape, dtype=bool) if ghosting is not None else None

    def __call__(self, echo: int, water: F32, fat: C64, combine: Combine) -> C64:
        signal = combine(water, fat)
        if self.field is not None and self.distortion is not None and self.metal_footprint is not None:
            plain = signal
            signal = combine(*self.distortion(water, fat, echo))
            region = self.field.region
            self.metal_footprint[region] |= _changed(plain[region], signal[region])
        if self.ghosting is not None and self.motion_footprint is not None:
            still = signal
            signal = still + self.ghosting.ghost(still)
            self.motion_footprint |= _changed(still, signal)
        return signal


def _changed(before: C64, after: C64) -> npt.NDArray[np.bool_]:
    return np.asarray(np.abs(np.abs(after) - np.abs(before)) > FOOTPRINT_SIGNAL)
