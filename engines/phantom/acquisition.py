"""Acquisition parameters of a simulated dual-echo 3D RF-spoiled gradient-echo scan.

They are inputs of the phantom, not constants, so that every deviation a protocol check must catch (wrong echo
time, 2D, low bandwidth, other field strength or orientation) can be simulated with physics that agree with the
headers the scanner simulator writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from sct_core.geometry import Orientation

#: Gyromagnetic ratio of 1H over 2π, in MHz per tesla.
GYROMAGNETIC_MHZ_PER_T = 42.577478

#: Field strengths at which the tissue table has relaxation values; other fields are refused, not extrapolated.
SUPPORTED_FIELD_STRENGTHS_T = (1.5, 3.0)
#: How far a requested field may sit from a supported one and still use its table (scanners report 1.494 T etc.).
FIELD_STRENGTH_TOLERANCE_T = 0.1


@dataclass(frozen=True, slots=True)
class Acquisition:
    """One 3D dual-echo spoiled-GRE acquisition as the console prescribes it.

    Defaults are the seed protocol (BoneMRI-style lumbar spine at 1.5 T, sequence_protocols/README.md). The
    flip angle, bandwidth value and sampling fractions are not published; they are plausible choices,
    documented in `docs/phantom.md`.
    """

    field_strength_t: float = 1.5
    repetition_time_ms: float = 7.0
    echo_times_ms: tuple[float, ...] = (2.1, 4.2)
    flip_angle_deg: float = 10.0
    #: Hz per pixel along the readout (DICOM PixelBandwidth). The protocol asks for > 500 Hz/px.
    pixel_bandwidth_hz: float = 540.0
    #: (row spacing, column spacing, slice spacing) of the reconstructed grid, mm.
    voxel_mm: tuple[float, float, float] = (0.74, 0.74, 0.9)
    #: (extent along the column direction, along the row direction, slab thickness), mm.
    fov_mm: tuple[float, float, float] = (250.0, 250.0, 90.0)
    orientation: Orientation = Orientation.SAGITTAL
    #: Tilt of the slab about its column direction, degrees (technologists follow the spine's axis).
    oblique_deg: float = 0.0
    #: Fraction of the reconstructed k-space extent actually acquired along the array axes (slice, row index,
    #: column index); the rest is zero-filled, as consoles interpolate 3D GRE. Reproduces the scanner's
    #: point-spread function and Gibbs ringing. The readout axis is fully sampled.
    sampling_fraction: tuple[float, float, float] = (0.85, 0.85, 1.0)
    #: Readout (frequency-encoding) axis of the image: "row" means along a row (increasing column index).
    readout_axis: str = "row"
    #: Bipolar readouts flip the fat chemical-shift displacement between echoes; monopolar keep it.
    bipolar_readout: bool = False
    number_of_averages: float = 1.0
    #: Multiplies the physical noise level; 1.0 gives muscle SNR of about 25 on echo 1 at the seed protocol,
    #: 0 gives noiseless images (physics tests).
    noise_scale: float = 1.0
    #: Extra attributes the scanner simulator writes verbatim (protocol deviations that have no physics here).
    header_overrides: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        _check_positive("RepetitionTime", self.repetition_time_ms, "ms")
        _check_positive("FlipAngle", self.flip_angle_deg, "deg")
        _check_positive("PixelBandwidth", self.pixel_bandwidth_hz, "Hz/px")
        _check_positive("NumberOfAverages", self.number_of_averages, "")
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0):
            raise ValueError(
                f"noise_scale must be finite and >= 0 (0 = noiseless); found {self.noise_scale!r}"
            )
        if not self.echo_times_ms:
            raise ValueError("EchoTime: at least one echo time is required; found none")
        for i, te in enumerate(self.echo_times_ms, start=1):
            _check_positive(f"EchoTime{i}", te, "ms")
            if te >= self.repetition_time_ms:
                raise ValueError(
                    f"EchoTime{i} {te} ms must be shorter than RepetitionTime {self.repetition_time_ms} ms"
                )
        if list(self.echo_times_ms) != sorted(self.echo_times_ms):
            raise ValueError(f"EchoTime values must increase with echo number; found {self.echo_times_ms}")
        self.table_field_strength()  # raises on an unsupported field
        for name, triple in (("voxel_mm", self.voxel_mm), ("fov_mm", self.fov_mm)):
            if len(triple) != 3 or not all(math.isfinite(v) and v > 0 for v in triple):
                raise ValueError(f"{name} must be three positive mm values; found {triple}")
        if not all(0.25 <= f <= 1.0 for f in self.sampling_fraction):
            raise ValueError(f"sampling_fraction must lie in [0.25, 1]; found {self.sampling_fraction}")
        if self.readout_axis not in ("row", "column"):
            raise ValueError(f"readout_axis must be 'row' or 'column'; found {self.readout_axis!r}")
        object.__setattr__(self, "orientation", Orientation(self.orientation))

    @property
    def imaging_frequency_mhz(self) -> float:
        """Proton Larmor frequency, DICOM ImagingFrequency."""
        return GYROMAGNETIC_MHZ_PER_T * self.field_strength_t

    @property
    def matrix(self) -> tuple[int, int, int]:
        """Reconstructed (slices, rows, columns)."""
        return (
            round(self.fov_mm[2] / self.voxel_mm[2]),
            round(self.fov_mm[0] / self.voxel_mm[0]),
            round(self.fov_mm[1] / self.voxel_mm[1]),
        )

    @property
    def acquired_matrix(self) -> tuple[int, int, int]:
        """Acquired k-space samples along the array axes (slice, row index, column index)."""
        return tuple(  # type: ignore[return-value]
            max(1, round(n * f)) for n, f in zip(self.matrix, self.sampling_fraction, strict=True)
        )

    def table_field_strength(self) -> float:
        """The supported field strength whose tissue table this acquisition uses."""
        for b0 in SUPPORTED_FIELD_STRENGTHS_T:
            if abs(self.field_strength_t - b0) <= FIELD_STRENGTH_TOLERANCE_T:
                return b0
        raise ValueError(
            f"MagneticFieldStrength {self.field_strength_t} T is not simulated; supported: "
            f"{', '.join(f'{b:g}' for b in SUPPORTED_FIELD_STRENGTHS_T)} T (±{FIELD_STRENGTH_TOLERANCE_T} T)"
        )

    def with_changes(self, **changes: Any) -> Acquisition:
        """A copy with some parameters changed (validated again)."""
        return replace(self, **changes)


def _check_positive(attribute: str, value: float, unit: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(
            f"{attribute} must be a finite positive value{f' in {unit}' if unit else ''}; found {value!r}"
        )


#: The seed protocol: sagittal 3D RF-spoiled GRE, TR 7 ms, TE 2.1 / 4.2 ms, > 500 Hz/px, 0.74x0.74x0.9 mm, 1.5 T.
SEED_PROTOCOL = Acquisition()
