"""Header-only reading of MR image files into the few attributes the agent groups, judges and places by.

The assembler must keep up with a scanner (DESIGN.md §7: ingest at least 0.9x bare ``pydicom.dcmread``), so a
file is read once with ``stop_before_pixels`` and reduced to two frozen records: :class:`ObjectHeader` (what is
the same for the whole object: the acquisition's parameters) and one :class:`FrameHeader` per image (echo time
and position). Classic single-frame and Enhanced multi-frame objects give the same records; for Enhanced objects
each attribute is looked up in the frame's functional groups first, then in the shared groups, then at the top
level, which is where PS3.3 allows it to be.

Pixels are read later and only for the slices a slab needs (:func:`agent.ingest.pixel_reader.read_pixels`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, EnhancedMRImageStorage, MRImageStorage

from agent.ingest.vendor_conventions import SequenceInputs, image_kind, vendor_of
from agent.vocabulary import ImageKind, Vendor
from sct_core.errors import SctError

#: SOP classes whose pixels the model can take (magnitude MR images). Anything else (CT, raw data, spectroscopy,
#: presentation states) is skipped with its SOP class named.
IMAGE_SOP_CLASSES: dict[str, str] = {
    MRImageStorage: "MR Image Storage",
    EnhancedMRImageStorage: "Enhanced MR Image Storage",
}

#: Size of the PixelData element header in explicit VR little endian (tag, VR, reserved, 32-bit length).
_PIXEL_ELEMENT_HEADER_BYTES = 12
#: Upper bound on rows, columns and frames: larger values are corrupt headers, not images (a 10^9-row header
#: must not make the streamer allocate terabytes).
MAX_MATRIX = 4096
MAX_FRAMES = 20000


class HeaderError(SctError, ValueError):
    """A file the agent cannot use, with the attribute, the value found and what was expected."""

    found: str

    def __init__(self, path: Path, attribute: str, found: str, expected: str) -> None:
        self.path = path
        super().__init__(
            f"{path.name}: {attribute}: found {found}; expected {expected}",
            attribute=attribute,
            found=found,
            expected=expected,
        )


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
            ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
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
            path, "file", f"unreadable header ({_describe(error)})", "a complete DICOM file"
        ) from error
    try:
        return _parse(path, ds, pixel_offset, size)
    except HeaderError:
        raise
    except (Exception, Warning) as error:
        raise HeaderError(
            path, "file", f"a corrupt element ({_describe(error)})", "a well-formed DICOM header"
        ) from error


def _describe(error: BaseException) -> str:
    text = str(error).strip() or "no detail"
    return f"{type(error).__name__}: {text[:200]}"


def _parse(path: Path, ds: Dataset, pixel_offset: int, size: int) -> ParsedFile:
    if "DirectoryRecordSequence" in ds:
        raise NotAnImageError(path, "MediaStorageSOPClassUID", "a DICOMDIR", "an MR image")
    top = _FastHeader(ds)
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
    if ended_early:
        raise HeaderError(
            path,
            "PixelData",
            f"(absent): the file ends at byte {size}",
            "the image's pixel data (file truncated?)",
        )
    enhanced = sop_class_uid == EnhancedMRImageStorage
    header = _object_header(path, ds, top, enhanced)
    frames = _enhanced_frames(path, ds, header) if enhanced else (_classic_frame(path, top, header),)
    _check_pixel_bytes(path, header, len(frames), size - pixel_offset)
    return ParsedFile(path=path, header=header, frames=frames)


# ------------------------------------------------------------------------------------------------ internals

#: The attributes read from a header; pydicom skips the rest of the file's elements (faster than a full
#: header parse, which matters for DESIGN.md's ingest target).
_HEADER_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "SeriesNumber", "SeriesTime", "ProtocolName",
    "MagneticFieldStrength", "ImagingFrequency", "MRAcquisitionType", "ScanningSequence", "SequenceVariant",
    "SequenceName", "PulseSequenceName", "ScanOptions", "InversionTime", "ImageType", "ComplexImageComponent",
    "RepetitionTime", "FlipAngle", "PixelBandwidth", "EchoTrainLength", "ImagesInAcquisition", "NumberOfFrames",
    "Rows", "Columns", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient",
    "ImagePositionPatient", "EchoTime", "BitsAllocated", "PixelRepresentation", "DirectoryRecordSequence",
    "EchoPulseSequence", "EchoPlanarPulseSequence", "SteadyStatePulseSequence", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
)  # fmt: skip
_TAGS: dict[str, BaseTag] = {k: Tag(k) for k in _HEADER_KEYWORDS}


@dataclass(frozen=True, slots=True)
class _Private:
    """A vendor private attribute: its tag, the creator that must own its block, and its VR (needed when the
    file is implicit VR, where a private value arrives as raw bytes)."""

    tag: BaseTag
    creator: str
    vr: str


_PHILIPS_IMAGING = "Philips Imaging DD 001"
_PHILIPS_MR_IMAGING = "Philips MR Imaging DD 001"
_GE_ACQUISITION = "GEMS_ACQU_01"
_GE_PARAMETERS = "GEMS_PARM_01"
_PRIVATE: dict[str, _Private] = {
    "philips_echo_count": _Private(Tag(0x2001, 0x1014), _PHILIPS_IMAGING, "SL"),
    "philips_slice_count": _Private(Tag(0x2001, 0x1018), _PHILIPS_IMAGING, "SL"),
    "philips_technique": _Private(Tag(0x2001, 0x1020), _PHILIPS_IMAGING, "LO"),
    "philips_water_fat_shift": _Private(Tag(0x2001, 0x1022), _PHILIPS_IMAGING, "FL"),
    "philips_image_type": _Private(Tag(0x2005, 0x1011), _PHILIPS_MR_IMAGING, "CS"),
    "ge_echo_count": _Private(Tag(0x0019, 0x107E), _GE_ACQUISITION, "SS"),
    "ge_psd_name": _Private(Tag(0x0019, 0x109C), _GE_ACQUISITION, "LO"),
    "ge_internal_psd": _Private(Tag(0x0019, 0x109E), _GE_ACQUISITION, "LO"),
    "ge_component": _Private(Tag(0x0043, 0x102F), _GE_PARAMETERS, "SS"),
}
#: Each private block's creator element: (gggg,0010) owns (gggg,10xx).
_CREATOR_TAGS = sorted({Tag(p.tag.group, p.tag.element >> 8) for p in _PRIVATE.values()})
_HEADER_TAGS = sorted({*_TAGS.values(), *(p.tag for p in _PRIVATE.values()), *_CREATOR_TAGS})

#: Value representations decoded here straight from the raw bytes (explicit VR): text, and little-endian
#: binary numbers. Anything else (sequences, implicit VR, big endian) goes through pydicom's conversion.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})
_BINARY_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}

#: ImagePositionPatient coordinates beyond this (mm: 100 m) are corrupt, and would overflow the grid arithmetic.
MAX_POSITION_MM = 100_000.0
#: Plausible ranges of the acquisition parameters (inclusive bounds, in the units the view uses). A value
#: outside is a corrupt header, not an unusual protocol, and the file is refused with the range named (a
#: negative TR or a 10^9 ms echo time must not reach a verdict as if it were a setting).
PLAUSIBLE_RANGES: dict[str, tuple[float, float, str]] = {
    "RepetitionTime": (0.1, 100_000.0, "ms"),
    "EchoTime": (0.0, 10_000.0, "ms"),
    "InversionTime": (0.0, 100_000.0, "ms"),
    "FlipAngle": (0.0, 360.0, "deg"),
    "PixelBandwidth": (1.0, 1_000_000.0, "Hz/px"),
    "MagneticFieldStrength": (0.01, 20.0, "T"),
    "ImagingFrequency": (0.1, 1_000.0, "MHz"),
    "SliceThickness": (0.0, 1_000.0, "mm"),
    "SpacingBetweenSlices": (-1_000.0, 1_000.0, "mm"),
}


class _FastHeader:
    """``Dataset.get`` for the top level of a header, decoding raw text and binary values directly.

    pydicom's element conversion costs more than parsing the file (it builds a typed value per access); the
    assembler needs only strings and numbers, so it reads them from the raw element and leaves everything else
    to pydicom. Values have the shapes pydicom gives: a string for one value, a list of strings for several.
    """

    __slots__ = ("_ds",)

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._ds

    def get(self, keyword: str, default: Any = None) -> Any:
        tag = _TAGS.get(keyword)
        # get_item returns the raw element while pydicom has not converted it (its stubs say DataElement).
        element: Any = self._ds.get_item(tag) if tag is not None else None
        if not isinstance(element, RawDataElement):
            return self._ds.get(keyword, default)
        value = _raw_value(element, str(element.VR))
        return self._ds.get(keyword, default) if value is _UNDECODED else value

    def private(self, name: str) -> Any:
        """A vendor private value, or None when absent or when its block belongs to another creator (GE and
        Siemens both use group 0019 for different things)."""
        spec = _PRIVATE[name]
        creator_tag = Tag(spec.tag.group, spec.tag.element >> 8)
        creator_element: Any = self._ds.get_item(creator_tag)
        if creator_element is None:
            return None
        creator = _raw_value(creator_element, "LO") if isinstance(creator_element, RawDataElement) else None
        if creator is _UNDECODED or creator is None:
            creator = creator_element.value
        if str(creator).strip() != spec.creator:
            return None
        element: Any = self._ds.get_item(spec.tag)
        if element is None:
            return None
        if isinstance(element, RawDataElement):
            vr = str(element.VR) if element.VR not in (None, "UN") else spec.vr
            value = _raw_value(element, vr, little_endian=bool(element.is_little_endian))
            return None if value is _UNDECODED else value
        return element.value


_UNDECODED = object()


def _raw_value(element: RawDataElement, vr: str, *, little_endian: bool | None = None) -> Any:
    raw: Any = element.value
    if raw is None:
        return _UNDECODED
    if isinstance(raw, str):
        raw = raw.encode("latin-1", "replace")
    if vr in _TEXT_VRS:
        text = raw.decode("latin-1").strip("\x00 ")
        parts = [part.strip() for part in text.split("\\")]
        return parts[0] if len(parts) == 1 else parts
    code = _BINARY_VRS.get(vr)
    endian = element.is_little_endian if little_endian is None else little_endian
    if code is not None and endian:
        size = struct.calcsize(code)
        if len(raw) % size:
            return _UNDECODED
        values = struct.unpack(f"<{len(raw) // size}{code}", raw)
        if not values:
            return None
        return values[0] if len(values) == 1 else list(values)
    return _UNDECODED


def _object_header(path: Path, ds: Dataset, top: _FastHeader, enhanced: bool) -> ObjectHeader:
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    first_frame = _first_item(ds, "PerFrameFunctionalGroupsSequence")

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
    rows = _int(path, "Rows", top.get("Rows"), required=True)
    columns = _int(path, "Columns", top.get("Columns"), required=True)
    assert rows is not None and columns is not None
    for keyword, count in (("Rows", rows), ("Columns", columns)):
        if not 1 <= count <= MAX_MATRIX:
            raise HeaderError(path, keyword, str(count), f"1 to {MAX_MATRIX}")
    orientation = _floats(path, "ImageOrientationPatient", orientation_value, 6)
    row_cos, col_cos = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if not (
        abs(np.linalg.norm(row_cos) - 1) < 1e-3
        and abs(np.linalg.norm(col_cos) - 1) < 1e-3
        and abs(float(row_cos @ col_cos)) < 1e-3
    ):
        raise HeaderError(
            path, "ImageOrientationPatient", str(orientation), "two orthogonal unit direction cosines"
        )
    spacing = _floats(path, "PixelSpacing", spacing_value, 2)
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
            inversion_time_ms=_plausible(path, "InversionTime", inversion_value),
            echo_pulse_sequence=_text(top.get("EchoPulseSequence")) or "",
            echo_planar=_text(top.get("EchoPlanarPulseSequence")) or "",
            steady_state=_text(top.get("SteadyStatePulseSequence")) or "",
            spoiling=_text((modifier or Dataset()).get("Spoiling")) or "",
            inversion_recovery=_text((modifier or Dataset()).get("InversionRecovery")) or "",
            philips_technique=str(top.private("philips_technique") or ""),
            ge_psd_name=str(top.private("ge_psd_name") or ""),
            ge_internal_psd=str(top.private("ge_internal_psd") or ""),
        )
    else:
        sequence = SequenceInputs(
            vendor=vendor,
            enhanced=False,
            scanning_sequence=_tokens(top.get("ScanningSequence")),
            sequence_variant=_tokens(top.get("SequenceVariant")),
            sequence_name=str(top.get("SequenceName", "") or ""),
            scan_options=_tokens(top.get("ScanOptions")),
            inversion_time_ms=_plausible(path, "InversionTime", top.get("InversionTime")),
            philips_technique=str(top.private("philips_technique") or ""),
            ge_psd_name=str(top.private("ge_psd_name") or ""),
            ge_internal_psd=str(top.private("ge_internal_psd") or ""),
        )

    n_frames = _int(path, "NumberOfFrames", top.get("NumberOfFrames")) if enhanced else None
    if n_frames is not None and not 1 <= n_frames <= MAX_FRAMES:
        raise HeaderError(path, "NumberOfFrames", str(n_frames), f"1 to {MAX_FRAMES}")
    timing = "MRTimingAndRelatedParametersSequence"
    imaging = "MRImagingModifierSequence"
    return ObjectHeader(
        study_instance_uid=_uid(path, top, "StudyInstanceUID"),
        series_instance_uid=_uid(path, top, "SeriesInstanceUID"),
        sop_class_uid=str(top.get("SOPClassUID")),
        frame_of_reference_uid=str(top.get("FrameOfReferenceUID", "") or ""),
        manufacturer=str(top.get("Manufacturer", "") or ""),
        model_name=str(top.get("ManufacturerModelName", "") or ""),
        software_versions=_joined(top.get("SoftwareVersions")),
        series_number=_optional_int(top.get("SeriesNumber")),
        series_time=str(top.get("SeriesTime", "") or ""),
        protocol_name=str(top.get("ProtocolName", "") or ""),
        magnetic_field_strength_t=_plausible(path, "MagneticFieldStrength", top.get("MagneticFieldStrength")),
        imaging_frequency_mhz=_plausible(
            path,
            "ImagingFrequency",
            attr("ImagingFrequency", imaging) or attr("TransmitterFrequency", imaging),
        ),
        mr_acquisition_type=_text(attr("MRAcquisitionType", "MRFOVGeometrySequence")),
        vendor=vendor,
        sequence=sequence,
        scan_options=_tokens(top.get("ScanOptions")),
        image_type=_tokens(top.get("ImageType")),
        repetition_time_ms=_plausible(path, "RepetitionTime", attr("RepetitionTime", timing)),
        flip_angle_deg=_plausible(path, "FlipAngle", attr("FlipAngle", timing)),
        pixel_bandwidth_hz=_plausible(path, "PixelBandwidth", attr("PixelBandwidth", imaging)),
        echo_train_length=_int(path, "EchoTrainLength", attr("EchoTrainLength", timing)),
        images_in_acquisition=_int(path, "ImagesInAcquisition", top.get("ImagesInAcquisition")),
        number_of_frames=n_frames,
        stack_positions=_stack_positions(ds) if enhanced else None,
        philips_echo_count=_optional_int(top.private("philips_echo_count")),
        philips_slice_count=_optional_int(top.private("philips_slice_count")),
        philips_water_fat_shift_px=_optional_float(top.private("philips_water_fat_shift")),
        ge_echo_count=_optional_int(top.private("ge_echo_count")),
        rows=rows,
        columns=columns,
        pixel_spacing_mm=(spacing[0], spacing[1]),
        slice_thickness_mm=_plausible(path, "SliceThickness", attr("SliceThickness", measures)),
        spacing_between_slices_mm=_plausible(
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
        bits_allocated=_int(path, "BitsAllocated", top.get("BitsAllocated"), required=True) or 0,
        pixel_representation=_int(path, "PixelRepresentation", top.get("PixelRepresentation")) or 0,
    )


def _classic_frame(path: Path, ds: _FastHeader, header: ObjectHeader) -> FrameHeader:
    echo_time = _plausible(path, "EchoTime", ds.get("EchoTime"))
    if echo_time is None:
        raise HeaderError(path, "EchoTime", "(absent)", "the echo time in ms")
    position = _floats(path, "ImagePositionPatient", ds.get("ImagePositionPatient"), 3)
    kind = image_kind(
        header.image_type,
        str(ds.get("ComplexImageComponent", "") or ""),
        philips_image_type=str(ds.private("philips_image_type") or ""),
        ge_component=_optional_int(ds.private("ge_component")),
    )
    return FrameHeader(
        frame=None,
        instance_key=_uid(path, ds, "SOPInstanceUID"),
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
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    sop = _uid(path, ds, "SOPInstanceUID")
    top_component = str(ds.get("ComplexImageComponent", "") or "")
    frames = []
    # Frames share their FrameType and component values; classify each distinct pair once.
    kinds: dict[tuple[tuple[str, ...], str], ImageKind] = {}
    for index, item in enumerate(per_frame):
        label = f"frame {index + 1} "
        echo = _macro_value(item, shared, "MREchoSequence", "EffectiveEchoTime")
        echo_time = _plausible(path, label + "EffectiveEchoTime", echo, limits="EchoTime")
        if echo_time is None:
            raise HeaderError(path, label + "EffectiveEchoTime", "(absent)", "the echo time in ms")
        position = _floats(
            path,
            label + "ImagePositionPatient",
            _macro_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"),
            3,
        )
        frame_type = _tokens(_macro_value(item, shared, "MRImageFrameTypeSequence", "FrameType")) or (
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
            number = _optional_int(content[0].get("InStackPositionNumber"))
            if number is not None and 0 < number <= MAX_FRAMES:
                highest = max(highest, number)
    return highest or None


def _check_pixel_bytes(path: Path, header: ObjectHeader, n_frames: int, remaining: int) -> None:
    """A file cut short in transfer still has a complete header; its pixel data is shorter than the header
    says. Catching it here keeps a broken file out of the acquisition before any pixel is read."""
    dtype = pixel_dtype(path, header.bits_allocated, header.pixel_representation)
    expected = n_frames * header.rows * header.columns * dtype.itemsize
    available = remaining - _PIXEL_ELEMENT_HEADER_BYTES
    if available < expected:
        raise HeaderError(
            path, "PixelData", f"{max(available, 0)} bytes", f"{expected} bytes (file truncated?)"
        )


def pixel_dtype(path: Path, bits_allocated: int, pixel_representation: int) -> np.dtype[Any]:
    if bits_allocated not in (8, 16):
        raise HeaderError(path, "BitsAllocated", str(bits_allocated), "8 or 16")
    kind = "i" if pixel_representation == 1 else "u"
    return np.dtype(f"<{kind}{bits_allocated // 8}")


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    value = ds.get(keyword)
    if value:
        item: Dataset = value[0]
        return item
    return None


def _tokens(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items: Iterable[Any] = value.split("\\") if isinstance(value, str) else value
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def _joined(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value.strip()
    return "\\".join(str(v).strip() for v in value)


def _optional_int(value: Any) -> int | None:
    """A count from a header whose absence or corruption only loses information (never fails the file)."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return number


def _optional_float(value: Any) -> float | None:
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _plausible(path: Path, keyword: str, value: Any, *, limits: str | None = None) -> float | None:
    """A number within :data:`PLAUSIBLE_RANGES` (by ``limits``, else ``keyword``), or None when absent."""
    number = _float(path, keyword, value)
    if number is None:
        return None
    low, high, unit = PLAUSIBLE_RANGES[limits or keyword]
    if not low <= number <= high:
        raise HeaderError(path, keyword, f"{number:g} {unit}", f"a value from {low:g} to {high:g} {unit}")
    return number


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value).strip().upper()


def _uid(path: Path, ds: Dataset | _FastHeader, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        raise HeaderError(path, keyword, "(absent)", "a UID")
    return value


def _float(path: Path, keyword: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise HeaderError(path, keyword, repr(value), "a number") from None
    if not math.isfinite(number):
        raise HeaderError(path, keyword, repr(value), "a finite number")
    return number


def _int(path: Path, keyword: str, value: Any, *, required: bool = False) -> int | None:
    if value is None or value == "":
        if required:
            raise HeaderError(path, keyword, "(absent)", "an integer")
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HeaderError(path, keyword, repr(value), "an integer") from None


def _floats(path: Path, keyword: str, value: Any, count: int) -> tuple[float, ...]:
    if value is None or value == "":
        raise HeaderError(path, keyword, "(absent)", f"{count} numbers")
    if isinstance(value, str):
        value = value.split("\\")
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise HeaderError(path, keyword, repr(value), f"{count} numbers") from None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise HeaderError(path, keyword, str(list(numbers)), f"{count} finite numbers")
    if keyword.endswith("ImagePositionPatient") and any(abs(n) > MAX_POSITION_MM for n in numbers):
        raise HeaderError(
            path, keyword, str(list(numbers)), f"{count} coordinates within ±{MAX_POSITION_MM:g} mm"
        )
    return numbers
