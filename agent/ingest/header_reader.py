"""Header-only reading of MR image files into the few attributes the agent groups, judges and places by.

The assembler must keep up with a scanner (target: ingest at least 0.9x bare ``pydicom.dcmread``), so a
file is read once with ``stop_before_pixels`` and reduced to two frozen records: :class:`ObjectHeader` (what is
the same for the whole object: the acquisition's parameters) and one :class:`FrameHeader` per image (echo time
and position). Classic single-frame and Enhanced multi-frame objects give the same records; for Enhanced objects
each attribute is looked up in the frame's functional groups first, then in the shared groups, then at the top
level, which is where PS3.3 allows it to be.

Pixels are read later and only for the slices a slab needs (:func:`agent.ingest.pixel_reader.read_pixels`).
Which attributes are read, and how fast, is :mod:`agent.ingest.raw_header`; how each value is checked (and a
corrupt one refused) is :mod:`agent.ingest.header_values`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, EnhancedMRImageStorage, MRImageStorage

from agent.file_labels import error_text
from agent.ingest.header_values import (
    HeaderError,
    first_item,
    float_values,
    int_value,
    joined,
    optional_float,
    optional_int,
    plausible,
    text_value,
    tokens,
    uid_value,
)
from agent.ingest.raw_header import HEADER_TAGS, FastHeader
from agent.ingest.transfer_syntax import PixelEncoding, pixel_encoding
from agent.ingest.vendor_conventions import SequenceInputs, image_kind, vendor_of
from agent.vocabulary import ImageKind, Vendor

#: SOP classes whose pixels the model can take (magnitude MR images). Anything else (CT, raw data, spectroscopy,
#: presentation states) is skipped with its SOP class named.
IMAGE_SOP_CLASSES: dict[str, str] = {
    MRImageStorage: "MR Image Storage",
    EnhancedMRImageStorage: "Enhanced MR Image Storage",
}

#: Size of the PixelData element header: explicit VR (tag, VR, reserved, 32-bit length), implicit VR (tag, length).
_PIXEL_ELEMENT_HEADER_BYTES = 12
_IMPLICIT_PIXEL_ELEMENT_HEADER_BYTES = 8
#: Upper bound on rows, columns and frames: larger values are corrupt headers, not images (a 10^9-row header
#: must not make the streamer allocate terabytes).
MAX_MATRIX = 4096
MAX_FRAMES = 20000


class NotAnImageError(HeaderError):
    """A readable DICOM object that is not an MR image (skipped, not bad)."""


class NotDicomError(NotAnImageError):
    """A file that is not DICOM at all (a console's protocol printout, a note): skipped, not bad. A DICOM file
    cut short in transfer still starts with its preamble and is caught as bad instead."""


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    """Attributes that are the same for every image of one object (and normally of one acquisition)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    frame_of_reference_uid: str
    manufacturer: str
    model_name: str
    software_versions: str
    series_number: int | None
    #: SeriesDescription: the console's label for the series (a protocol name, not patient data), shown to the
    #: technologist beside the verdict so that they know which console series it is about.
    series_description: str
    #: SeriesTime and ProtocolName: what ties together the series a Siemens XA interoperability export splits
    #: one acquisition into (see assembler).
    series_time: str
    protocol_name: str
    magnetic_field_strength_t: float | None
    imaging_frequency_mhz: float | None
    mr_acquisition_type: str | None
    #: The vendor and the sequence as the headers state them; vendor_conventions decides what they mean.
    vendor: Vendor
    sequence: SequenceInputs
    scan_options: tuple[str, ...]
    #: Object-level ImageType (classic: the image's; Enhanced: the summary, e.g. ORIGINAL\PRIMARY\T1\MIXED).
    image_type: tuple[str, ...]
    repetition_time_ms: float | None
    flip_angle_deg: float | None
    pixel_bandwidth_hz: float | None
    echo_train_length: int | None
    images_in_acquisition: int | None
    number_of_frames: int | None
    #: Highest InStackPositionNumber of an Enhanced object: the slices per echo of its stack.
    stack_positions: int | None
    #: Vendor private counts and settings, read only under their own private creator.
    philips_echo_count: int | None
    philips_slice_count: int | None
    philips_water_fat_shift_px: float | None
    ge_echo_count: int | None
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float | None
    spacing_between_slices_mm: float | None
    image_orientation: tuple[float, float, float, float, float, float]
    bits_allocated: int
    pixel_representation: int

    @property
    def sop_class(self) -> str:
        return str(IMAGE_SOP_CLASSES.get(self.sop_class_uid, self.sop_class_uid))


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """One image: a classic file, or one frame of an Enhanced object."""

    frame: int | None
    instance_key: str
    echo_time_ms: float
    position: tuple[float, float, float]
    kind: ImageKind
    #: ImageType of a classic image, FrameType of an Enhanced frame.
    image_type: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ParsedFile:
    path: Path
    header: ObjectHeader
    frames: tuple[FrameHeader, ...]


def read_header(path: Path) -> ParsedFile:
    """Parse one file's header; raise :class:`HeaderError` (or :class:`NotAnImageError`) with the reason.

    Nothing else escapes: pydicom converts values lazily, so a corrupt element can fail anywhere in the parse
    (an unknown VR, a sequence cut short, a bad deflate stream), and a file the agent cannot read is a bad file,
    never a stopped stage (found by bench/fuzz_headers.py).
    """
    try:
        with path.open("rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            pixel_offset = handle.tell()
        size = path.stat().st_size
    except InvalidDicomError as error:
        raise NotDicomError(
            path, "file", "no DICOM preamble (DICM at byte 128)", "a DICOM Part 10 file"
        ) from error
    except (Exception, Warning) as error:
        # Warning: pydicom warns about a structure it cannot finish (a delimiter past the end of the file);
        # where warnings are errors that arrives as an exception, and it means the same as EOFError.
        raise HeaderError(
            path, "file", f"unreadable header ({error_text(error, path)})", "a complete DICOM file"
        ) from error
    try:
        return _parse(path, ds, pixel_offset, size)
    except HeaderError:
        raise
    except (Exception, Warning) as error:
        raise HeaderError(
            path, "file", f"a corrupt element ({error_text(error, path)})", "a well-formed DICOM header"
        ) from error


def _parse(path: Path, ds: Dataset, pixel_offset: int, size: int) -> ParsedFile:
    if "DirectoryRecordSequence" in ds:
        raise NotAnImageError(path, "MediaStorageSOPClassUID", "a DICOMDIR", "an MR image")
    top = FastHeader(ds)
    sop_class_uid = str(top.get("SOPClassUID", "") or "").strip()
    # With stop_before_pixels the reader halts at the pixel data; having read to the end means there is none.
    ended_early = pixel_offset >= size
    if not sop_class_uid:
        # Every DICOM object states its SOP class: without it this is a damaged file, not some other object.
        if ended_early:
            raise HeaderError(
                path, "file", f"{size} bytes that end inside the header", "a complete DICOM file (truncated?)"
            )
        raise HeaderError(path, "SOPClassUID", "(absent)", "the SOP class of an MR image")
    if sop_class_uid not in IMAGE_SOP_CLASSES:
        name = UID(sop_class_uid).name
        found = sop_class_uid if name == sop_class_uid else f"{sop_class_uid} ({name})"
        raise NotAnImageError(path, "SOPClassUID", found, "MR Image or Enhanced MR Image")
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    encoding = pixel_encoding(path, transfer_syntax)
    # A deflated file is read whole and inflated in memory: where the reader stopped says nothing about it.
    if ended_early and encoding is not PixelEncoding.DEFLATED:
        raise HeaderError(
            path,
            "PixelData",
            f"(absent): the file ends at byte {size}",
            "the image's pixel data (file truncated?)",
        )
    enhanced = sop_class_uid == EnhancedMRImageStorage
    header = _object_header(path, ds, top, enhanced)
    frames = _enhanced_frames(path, ds, header) if enhanced else (_classic_frame(path, top, header),)
    if encoding in (PixelEncoding.LITTLE_ENDIAN, PixelEncoding.BIG_ENDIAN):
        # Raw values end the file, so a file cut short shows here; compressed and deflated data are checked
        # by their decoders when the slab needs them.
        implicit = not transfer_syntax or UID(transfer_syntax).is_implicit_VR
        element_header = _IMPLICIT_PIXEL_ELEMENT_HEADER_BYTES if implicit else _PIXEL_ELEMENT_HEADER_BYTES
        _check_pixel_bytes(path, header, len(frames), size - pixel_offset - element_header)
    return ParsedFile(path=path, header=header, frames=frames)


# ------------------------------------------------------------------------------------------------ internals


def _object_header(path: Path, ds: Dataset, top: FastHeader, enhanced: bool) -> ObjectHeader:
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    first_frame = first_item(ds, "PerFrameFunctionalGroupsSequence")

    def group(keyword: str) -> Dataset | None:
        for holder in (first_frame, shared):
            if holder is not None and keyword in holder:
                items = holder[keyword].value
                if items:
                    item: Dataset = items[0]
                    return item
        return None

    def attr(keyword: str, *groups: str) -> Any:
        for name in groups:
            item = group(name)
            if item is not None and item.get(keyword) not in (None, ""):
                return item.get(keyword)
        value = top.get(keyword)
        return None if value in (None, "") else value

    measures = "PixelMeasuresSequence"
    orientation_value = attr("ImageOrientationPatient", "PlaneOrientationSequence")
    spacing_value = attr("PixelSpacing", measures)
    rows = int_value(path, "Rows", top.get("Rows"), required=True)
    columns = int_value(path, "Columns", top.get("Columns"), required=True)
    assert rows is not None and columns is not None
    for keyword, count in (("Rows", rows), ("Columns", columns)):
        if not 1 <= count <= MAX_MATRIX:
            raise HeaderError(path, keyword, str(count), f"1 to {MAX_MATRIX}")
    orientation = float_values(path, "ImageOrientationPatient", orientation_value, 6)
    row_cos, col_cos = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if not (
        abs(np.linalg.norm(row_cos) - 1) < 1e-3
        and abs(np.linalg.norm(col_cos) - 1) < 1e-3
        and abs(float(row_cos @ col_cos)) < 1e-3
    ):
        raise HeaderError(
            path, "ImageOrientationPatient", str(orientation), "two orthogonal unit direction cosines"
        )
    spacing = float_values(path, "PixelSpacing", spacing_value, 2)
    if not all(0 < s < 100 for s in spacing):
        raise HeaderError(path, "PixelSpacing", str(spacing), "two positive spacings below 100 mm")

    vendor = vendor_of(str(top.get("Manufacturer", "") or ""))
    modifier = group("MRModifierSequence")
    if enhanced:
        inversion_value = (modifier or Dataset()).get("InversionTimes")
        if isinstance(inversion_value, (list, tuple, MultiValue)):
            inversion_value = inversion_value[0] if len(inversion_value) else None
        sequence = SequenceInputs(
            vendor=vendor,
            enhanced=True,
            sequence_name=str(top.get("PulseSequenceName", "") or ""),
            inversion_time_ms=plausible(path, "InversionTime", inversion_value),
            echo_pulse_sequence=text_value(top.get("EchoPulseSequence")) or "",
            echo_planar=text_value(top.get("EchoPlanarPulseSequence")) or "",
            steady_state=text_value(top.get("SteadyStatePulseSequence")) or "",
            spoiling=text_value((modifier or Dataset()).get("Spoiling")) or "",
            inversion_recovery=text_value((modifier or Dataset()).get("InversionRecovery")) or "",
            philips_technique=str(top.private("philips_technique") or ""),
            ge_psd_name=str(top.private("ge_psd_name") or ""),
            ge_internal_psd=str(top.private("ge_internal_psd") or ""),
        )
    else:
        sequence = SequenceInputs(
            vendor=vendor,
            enhanced=False,
            scanning_sequence=tokens(top.get("ScanningSequence")),
            sequence_variant=tokens(top.get("SequenceVariant")),
            sequence_name=str(top.get("SequenceName", "") or ""),
            scan_options=tokens(top.get("ScanOptions")),
            inversion_time_ms=plausible(path, "InversionTime", top.get("InversionTime")),
            philips_technique=str(top.private("philips_technique") or ""),
            ge_psd_name=str(top.private("ge_psd_name") or ""),
            ge_internal_psd=str(top.private("ge_internal_psd") or ""),
        )

    n_frames = int_value(path, "NumberOfFrames", top.get("NumberOfFrames")) if enhanced else None
    if n_frames is not None and not 1 <= n_frames <= MAX_FRAMES:
        raise HeaderError(path, "NumberOfFrames", str(n_frames), f"1 to {MAX_FRAMES}")
    timing = "MRTimingAndRelatedParametersSequence"
    imaging = "MRImagingModifierSequence"
    return ObjectHeader(
        study_instance_uid=uid_value(path, top, "StudyInstanceUID"),
        series_instance_uid=uid_value(path, top, "SeriesInstanceUID"),
        sop_class_uid=str(top.get("SOPClassUID")),
        frame_of_reference_uid=str(top.get("FrameOfReferenceUID", "") or ""),
        manufacturer=str(top.get("Manufacturer", "") or ""),
        model_name=str(top.get("ManufacturerModelName", "") or ""),
        software_versions=joined(top.get("SoftwareVersions")),
        series_number=optional_int(top.get("SeriesNumber")),
        series_description=joined(top.get("SeriesDescription")),
        series_time=str(top.get("SeriesTime", "") or ""),
        protocol_name=str(top.get("ProtocolName", "") or ""),
        magnetic_field_strength_t=plausible(path, "MagneticFieldStrength", top.get("MagneticFieldStrength")),
        imaging_frequency_mhz=plausible(
            path,
            "ImagingFrequency",
            attr("ImagingFrequency", imaging) or attr("TransmitterFrequency", imaging),
        ),
        mr_acquisition_type=text_value(attr("MRAcquisitionType", "MRFOVGeometrySequence")),
        vendor=vendor,
        sequence=sequence,
        scan_options=tokens(top.get("ScanOptions")),
        image_type=tokens(top.get("ImageType")),
        repetition_time_ms=plausible(path, "RepetitionTime", attr("RepetitionTime", timing)),
        flip_angle_deg=plausible(path, "FlipAngle", attr("FlipAngle", timing)),
        pixel_bandwidth_hz=plausible(path, "PixelBandwidth", attr("PixelBandwidth", imaging)),
        echo_train_length=int_value(path, "EchoTrainLength", attr("EchoTrainLength", timing)),
        images_in_acquisition=int_value(path, "ImagesInAcquisition", top.get("ImagesInAcquisition")),
        number_of_frames=n_frames,
        stack_positions=_stack_positions(ds) if enhanced else None,
        philips_echo_count=optional_int(top.private("philips_echo_count")),
        philips_slice_count=optional_int(top.private("philips_slice_count")),
        philips_water_fat_shift_px=optional_float(top.private("philips_water_fat_shift")),
        ge_echo_count=optional_int(top.private("ge_echo_count")),
        rows=rows,
        columns=columns,
        pixel_spacing_mm=(spacing[0], spacing[1]),
        slice_thickness_mm=plausible(path, "SliceThickness", attr("SliceThickness", measures)),
        spacing_between_slices_mm=plausible(
            path, "SpacingBetweenSlices", attr("SpacingBetweenSlices", measures)
        ),
        image_orientation=(
            orientation[0],
            orientation[1],
            orientation[2],
            orientation[3],
            orientation[4],
            orientation[5],
        ),
        bits_allocated=int_value(path, "BitsAllocated", top.get("BitsAllocated"), required=True) or 0,
        pixel_representation=int_value(path, "PixelRepresentation", top.get("PixelRepresentation")) or 0,
    )


def _classic_frame(path: Path, ds: FastHeader, header: ObjectHeader) -> FrameHeader:
    echo_time = plausible(path, "EchoTime", ds.get("EchoTime"))
    if echo_time is None:
        raise HeaderError(path, "EchoTime", "(absent)", "the echo time in ms")
    position = float_values(path, "ImagePositionPatient", ds.get("ImagePositionPatient"), 3)
    kind = image_kind(
        header.image_type,
        str(ds.get("ComplexImageComponent", "") or ""),
        philips_image_type=str(ds.private("philips_image_type") or ""),
        ge_component=optional_int(ds.private("ge_component")),
    )
    return FrameHeader(
        frame=None,
        instance_key=uid_value(path, ds, "SOPInstanceUID"),
        echo_time_ms=echo_time,
        position=(position[0], position[1], position[2]),
        kind=kind,
        image_type=header.image_type,
    )


def _enhanced_frames(path: Path, ds: Dataset, header: ObjectHeader) -> tuple[FrameHeader, ...]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n_frames = header.number_of_frames or 0
    if per_frame is None or len(per_frame) != n_frames:
        found = "(absent)" if per_frame is None else f"{len(per_frame)} items"
        raise HeaderError(
            path, "PerFrameFunctionalGroupsSequence", found, f"{n_frames} items (NumberOfFrames)"
        )
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    sop = uid_value(path, ds, "SOPInstanceUID")
    top_component = str(ds.get("ComplexImageComponent", "") or "")
    frames = []
    # Frames share their FrameType and component values; classify each distinct pair once.
    kinds: dict[tuple[tuple[str, ...], str], ImageKind] = {}
    for index, item in enumerate(per_frame):
        label = f"frame {index + 1} "
        echo = _macro_value(item, shared, "MREchoSequence", "EffectiveEchoTime")
        echo_time = plausible(path, label + "EffectiveEchoTime", echo, limits="EchoTime")
        if echo_time is None:
            raise HeaderError(path, label + "EffectiveEchoTime", "(absent)", "the echo time in ms")
        position = float_values(
            path,
            label + "ImagePositionPatient",
            _macro_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"),
            3,
        )
        frame_type = tokens(_macro_value(item, shared, "MRImageFrameTypeSequence", "FrameType")) or (
            header.image_type
        )
        component = str(
            _macro_value(item, shared, "MRImageFrameTypeSequence", "ComplexImageComponent") or top_component
        )
        key = (frame_type, component)
        kind = kinds.get(key)
        if kind is None:
            kind = kinds[key] = image_kind(frame_type, component)
        frames.append(
            FrameHeader(
                frame=index,
                instance_key=f"{sop}#{index + 1}",
                echo_time_ms=echo_time,
                position=(position[0], position[1], position[2]),
                kind=kind,
                image_type=frame_type,
            )
        )
    return tuple(frames)


def _macro_value(item: Dataset, shared: Dataset | None, macro: str, keyword: str) -> Any:
    for holder in (item, shared):
        if holder is not None and macro in holder and holder[macro].value:
            value = holder[macro].value[0].get(keyword)
            if value not in (None, ""):
                return value
    return None


def _stack_positions(ds: Dataset) -> int | None:
    highest = 0
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        content = item.get("FrameContentSequence")
        if content:
            number = optional_int(content[0].get("InStackPositionNumber"))
            if number is not None and 0 < number <= MAX_FRAMES:
                highest = max(highest, number)
    return highest or None


def _check_pixel_bytes(path: Path, header: ObjectHeader, n_frames: int, available: int) -> None:
    """A file cut short in transfer still has a complete header; its pixel data is shorter than the header
    says. Catching it here keeps a broken file out of the acquisition before any pixel is read."""
    dtype = pixel_dtype(path, header.bits_allocated, header.pixel_representation)
    expected = n_frames * header.rows * header.columns * dtype.itemsize
    if available < expected:
        raise HeaderError(
            path, "PixelData", f"{max(available, 0)} bytes", f"{expected} bytes (file truncated?)"
        )


def pixel_dtype(path: Path, bits_allocated: int, pixel_representation: int) -> np.dtype[Any]:
    if bits_allocated not in (8, 16):
        raise HeaderError(path, "BitsAllocated", str(bits_allocated), "8 or 16")
    kind = "i" if pixel_representation == 1 else "u"
    return np.dtype(f"<{kind}{bits_allocated // 8}")
