"""The normalised description of one acquisition, decided once from its first object's header.

Everything here is the same for every image of an acquisition and is what a verdict turns on: the vendor,
the sequence family after vendor conventions, the announced echo and slice counts, the bandwidth. Numbers are
rounded to the precision consoles state them with, so that the classic and the Enhanced export of one scan
(DS strings in one, FD floats in the other: 1008 against 1008.0645 Hz/px) give the same view.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.ingest.header_reader import ObjectHeader
from agent.ingest.siemens_protocol import SiemensProtocol
from agent.ingest.vendor_conventions import (
    CountInputs,
    announced_echoes,
    announced_slices,
    decide_sequence,
    image_flags,
    sequence_family,
    water_fat_shift_px,
)
from agent.vocabulary import Vendor

#: Decimals kept per quantity. Times: consoles state 0.001 ms at best. Bandwidth: Philips classic writes whole
#: Hz/px where its Enhanced export writes the float, so whole Hz/px is the common precision. Lengths: 0.1 µm,
#: far below any voxel. Direction cosines: 6 decimals (0.00006° of tilt).
TIME_DECIMALS = 3
ANGLE_DECIMALS = 2
BANDWIDTH_DECIMALS = 0
FIELD_DECIMALS = 3
LENGTH_DECIMALS = 4
COSINE_DECIMALS = 6
SHIFT_DECIMALS = 2
#: A slice spacing below this (mm) states nothing: no scanner resolves 10 µm slices.
MIN_SLICE_SPACING_MM = 0.01


@dataclass(frozen=True, slots=True)
class AcquisitionFacts:
    vendor: Vendor
    manufacturer: str
    model_name: str
    software_versions: str
    magnetic_field_strength_t: float | None
    mr_acquisition_type: str | None
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    sequence_name: str
    sequence_family: str
    sequence_evidence: tuple[str, ...]
    inversion_time_ms: float | None
    scan_option_flags: tuple[str, ...]
    repetition_time_ms: float | None
    flip_angle_deg: float | None
    pixel_bandwidth_hz: float | None
    water_fat_shift_px: float | None
    expected_echoes: int | None
    expected_slices: int | None
    counts_source: tuple[str, str]
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float | None
    slice_thickness_mm: float | None
    rows: int
    columns: int
    image_orientation: tuple[float, float, float, float, float, float]


def facts_for(header: ObjectHeader, siemens: SiemensProtocol | None = None) -> AcquisitionFacts:
    sequence = decide_sequence(header.sequence)
    counts = CountInputs(
        vendor=header.vendor,
        enhanced=header.sequence.enhanced,
        scanning_sequence=sequence.scanning_sequence,
        sequence_name=header.sequence.sequence_name,
        echo_train_length=header.echo_train_length,
        images_in_acquisition=header.images_in_acquisition,
        stack_positions=header.stack_positions,
        philips_echo_count=header.philips_echo_count,
        philips_slice_count=header.philips_slice_count,
        ge_echo_count=header.ge_echo_count,
        siemens_contrasts=siemens.contrasts if siemens else None,
        siemens_slices=siemens.slices if siemens else None,
    )
    echoes = announced_echoes(counts)
    slices = announced_slices(counts, echoes.value)
    spacing = header.spacing_between_slices_mm
    if spacing is not None:
        # Some consoles write a signed SpacingBetweenSlices (the direction is in the positions).
        spacing = abs(spacing)
    if spacing is None or spacing < MIN_SLICE_SPACING_MM:
        spacing = header.slice_thickness_mm
    if spacing is not None and spacing < MIN_SLICE_SPACING_MM:
        # 0 (written by some consoles for "not applicable") or a corrupt denormal: no spacing is stated.
        spacing = None
    shift = water_fat_shift_px(
        header.pixel_bandwidth_hz,
        header.imaging_frequency_mhz,
        header.magnetic_field_strength_t,
        philips_wfs_px=header.philips_water_fat_shift_px if header.vendor is Vendor.PHILIPS else None,
    )
    return AcquisitionFacts(
        vendor=header.vendor,
        manufacturer=header.manufacturer,
        model_name=header.model_name,
        software_versions=header.software_versions,
        magnetic_field_strength_t=_round(header.magnetic_field_strength_t, FIELD_DECIMALS),
        mr_acquisition_type=header.mr_acquisition_type,
        scanning_sequence=sequence.scanning_sequence,
        sequence_variant=sequence.sequence_variant,
        sequence_name=sequence.name,
        sequence_family=sequence_family(sequence.scanning_sequence),
        sequence_evidence=sequence.evidence,
        inversion_time_ms=_round(sequence.inversion_time_ms, TIME_DECIMALS),
        scan_option_flags=image_flags((), header.scan_options),
        repetition_time_ms=_round(header.repetition_time_ms, TIME_DECIMALS),
        flip_angle_deg=_round(header.flip_angle_deg, ANGLE_DECIMALS),
        pixel_bandwidth_hz=_round(header.pixel_bandwidth_hz, BANDWIDTH_DECIMALS),
        water_fat_shift_px=_round(shift, SHIFT_DECIMALS),
        expected_echoes=echoes.value,
        expected_slices=slices.value,
        counts_source=(echoes.source, slices.source),
        pixel_spacing_mm=(
            round(header.pixel_spacing_mm[0], LENGTH_DECIMALS),
            round(header.pixel_spacing_mm[1], LENGTH_DECIMALS),
        ),
        slice_spacing_mm=_round(spacing, LENGTH_DECIMALS),
        slice_thickness_mm=_round(header.slice_thickness_mm, LENGTH_DECIMALS),
        rows=header.rows,
        columns=header.columns,
        image_orientation=_cosines(header.image_orientation),
    )


def _round(value: float | None, decimals: int) -> float | None:
    return None if value is None else float(round(value, decimals))


def _cosines(
    values: tuple[float, float, float, float, float, float],
) -> tuple[float, float, float, float, float, float]:
    a, b, c, d, e, f = (round(v, COSINE_DECIMALS) + 0.0 for v in values)
    return (a, b, c, d, e, f)
