"""Header-only reading of MR image files into the few attributes the agent groups, judges and places by.

The assembler must keep up with a scanner (DESIGN.md §7: ingest at least 0.9x bare ``pydicom.dcmread``), so a
file is read once with ``stop_before_pixels`` and reduced to two frozen records: :class:`ObjectHeader` (what is
the same for the whole object: the acquisition's parameters) and one :class:`FrameHeader` per image (echo time
and position). Classic single-frame and Enhanced multi-frame objects give the same records; for Enhanced objects
each attribute is looked up in the frame's functional groups first, then in the shared groups, then at the top
level, which is where PS3.3 allows it to be.

Pixels are read later and only for the slices a slab needs (:func:`read_pixels`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

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


class HeaderError(ValueError):
    """A file the agent cannot use, with the attribute, the value found and what was expected."""

    def __init__(self, path: Path, attribute: str, found: str, expected: str) -> None:
        self.path = path
        self.attribute = attribute
        self.found = found
        self.expected = expected
        super().__init__(f"{path.name}: {attribute}: found {found}; expected {expected}")


class NotAnImageError(HeaderError):
    """A readable DICOM object that is not an MR image (skipped, not bad)."""


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    """Attributes that are the same for every image of one object (and normally of one acquisition)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    frame_of_reference_uid: str
    manufacturer: str
    model_name: str
    magnetic_field_strength_t: float | None
    mr_acquisition_type: str | None
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    sequence_name: str
    inversion_time_ms: float | None
    image_type: tuple[str, ...]
    magnitude: bool | None
    repetition_time_ms: float | None
    flip_angle_deg: float | None
    pixel_bandwidth_hz: float | None
    echo_train_length: int | None
    images_in_acquisition: int | None
    number_of_frames: int | None
    #: Highest InStackPositionNumber of an Enhanced object: the slices per echo of its stack.
    stack_positions: int | None
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


@dataclass(frozen=True, slots=True)
class ParsedFile:
    path: Path
    header: ObjectHeader
    frames: tuple[FrameHeader, ...]


def read_header(path: Path) -> ParsedFile:
    """Parse one file's header; raise :class:`HeaderError` (or :class:`NotAnImageError`) with the reason."""
    try:
        with path.open("rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            pixel_offset = handle.tell()
        size = path.stat().st_size
    except InvalidDicomError as error:
        raise HeaderError(path, "file", "no DICOM preamble or meta header", "a DICOM Part 10 file") from error
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        raise HeaderError(path, "file", f"unreadable header ({error})", "a complete DICOM file") from error

    if "DirectoryRecordSequence" in ds:
        raise NotAnImageError(path, "MediaStorageSOPClassUID", "a DICOMDIR", "an MR image")
    top = _FastHeader(ds)
    sop_class_uid = str(top.get("SOPClassUID", "") or "")
    if sop_class_uid not in IMAGE_SOP_CLASSES:
        raise NotAnImageError(
            path, "SOPClassUID", sop_class_uid or "(absent)", "MR Image or Enhanced MR Image"
        )
    enhanced = sop_class_uid == EnhancedMRImageStorage
    header = _object_header(path, ds, top, enhanced)
    frames = _enhanced_frames(path, ds, header) if enhanced else (_classic_frame(path, top),)
    _check_pixel_bytes(path, header, len(frames), size - pixel_offset)
    return ParsedFile(path=path, header=header, frames=frames)


def read_pixels(path: Path, frames: Sequence[int | None]) -> npt.NDArray[Any]:
    """The pixel arrays ``[len(frames), rows, columns]`` of the given frames of one file (``None``: a classic
    file's only image), as stored (no rescale: MR magnitude images are stored values)."""
    ds = pydicom.dcmread(path)
    data = ds.get("PixelData")
    rows, columns = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    dtype = _pixel_dtype(path, int(ds.BitsAllocated), int(ds.PixelRepresentation))
    per_frame = rows * columns
    expected = n_frames * per_frame * dtype.itemsize
    if data is None or len(data) < expected:
        found = 0 if data is None else len(data)
        raise HeaderError(path, "PixelData", f"{found} bytes", f"{expected} bytes (file truncated?)")
    array = np.frombuffer(data, dtype=dtype, count=n_frames * per_frame).reshape(n_frames, rows, columns)
    indices = [0 if f is None else f for f in frames]
    return array[indices]


def slice_normal(orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    """Row x column direction cosines: the direction of increasing slice index in every geometry we build."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    column = np.asarray(orientation[3:6], dtype=np.float64)
    return np.cross(row, column)


# ------------------------------------------------------------------------------------------------ internals

#: The attributes read from a header; pydicom skips the rest of the file's elements (faster than a full
#: header parse, which matters for DESIGN.md's ingest target).
_HEADER_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "MRAcquisitionType", "ScanningSequence",
    "SequenceVariant", "SequenceName", "PulseSequenceName", "InversionTime", "ImageType", "ComplexImageComponent",
    "RepetitionTime", "FlipAngle", "PixelBandwidth", "EchoTrainLength", "ImagesInAcquisition", "NumberOfFrames",
    "Rows", "Columns", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient",
    "ImagePositionPatient", "EchoTime", "BitsAllocated", "PixelRepresentation", "DirectoryRecordSequence",
    "EchoPulseSequence", "EchoPlanarPulseSequence", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
)  # fmt: skip
_TAGS: dict[str, BaseTag] = {k: Tag(k) for k in _HEADER_KEYWORDS}
_HEADER_TAGS = list(_TAGS.values())
#: Value representations decoded here straight from the raw bytes (explicit VR): text, and little-endian
#: binary numbers. Anything else (sequences, implicit VR, big endian) goes through pydicom's conversion.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})
_BINARY_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


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
        raw: bytes | None = element.value
        if raw is None:
            return self._ds.get(keyword, default)
        if element.VR in _TEXT_VRS:
            text = raw.decode("latin-1").strip("\x00 ")
            parts = [part.strip() for part in text.split("\\")]
            return parts[0] if len(parts) == 1 else parts
        code = _BINARY_VRS.get(str(element.VR))
        if code is not None and element.is_little_endian:
            values = struct.unpack(f"<{len(raw) // struct.calcsize(code)}{code}", raw)
            return values[0] if len(values) == 1 else list(values)
        return self._ds.get(keyword, default)


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

    if enhanced:
        scanning, variant = _enhanced_sequence_tokens(top, group)
        image_type = _tokens(top.get("ImageType"))
        frame_type = group("MRImageFrameTypeSequence")
        component = str(
            (frame_type or top).get("ComplexImageComponent", top.get("ComplexImageComponent", "")) or ""
        )
        magnitude: bool | None = component == "MAGNITUDE" if component else None
        sequence_name = str(top.get("PulseSequenceName", "") or "")
    else:
        scanning = _tokens(top.get("ScanningSequence"))
        variant = _tokens(top.get("SequenceVariant"))
        image_type = _tokens(top.get("ImageType"))
        magnitude = _classic_magnitude(top, image_type)
        sequence_name = str(top.get("SequenceName", "") or "")

    n_frames = _int(path, "NumberOfFrames", top.get("NumberOfFrames")) if enhanced else None
    if n_frames is not None and not 1 <= n_frames <= MAX_FRAMES:
        raise HeaderError(path, "NumberOfFrames", str(n_frames), f"1 to {MAX_FRAMES}")
    return ObjectHeader(
        study_instance_uid=_uid(path, top, "StudyInstanceUID"),
        series_instance_uid=_uid(path, top, "SeriesInstanceUID"),
        sop_class_uid=str(top.get("SOPClassUID")),
        frame_of_reference_uid=str(top.get("FrameOfReferenceUID", "") or ""),
        manufacturer=str(top.get("Manufacturer", "") or ""),
        model_name=str(top.get("ManufacturerModelName", "") or ""),
        magnetic_field_strength_t=_float(path, "MagneticFieldStrength", top.get("MagneticFieldStrength")),
        mr_acquisition_type=_text(attr("MRAcquisitionType", "MRFOVGeometrySequence")),
        scanning_sequence=scanning,
        sequence_variant=variant,
        sequence_name=sequence_name,
        inversion_time_ms=_float(
            path,
            "InversionTime",
            attr("InversionTime", "MRModifierSequence", "MRTimingAndRelatedParametersSequence"),
        ),
        image_type=image_type,
        magnitude=magnitude,
        repetition_time_ms=_float(
            path, "RepetitionTime", attr("RepetitionTime", "MRTimingAndRelatedParametersSequence")
        ),
        flip_angle_deg=_float(path, "FlipAngle", attr("FlipAngle", "MRTimingAndRelatedParametersSequence")),
        pixel_bandwidth_hz=_float(
            path, "PixelBandwidth", attr("PixelBandwidth", "MRImagingModifierSequence")
        ),
        echo_train_length=_int(
            path, "EchoTrainLength", attr("EchoTrainLength", "MRTimingAndRelatedParametersSequence")
        ),
        images_in_acquisition=_int(path, "ImagesInAcquisition", top.get("ImagesInAcquisition")),
        number_of_frames=n_frames,
        stack_positions=_stack_positions(ds) if enhanced else None,
        rows=rows,
        columns=columns,
        pixel_spacing_mm=(spacing[0], spacing[1]),
        slice_thickness_mm=_float(path, "SliceThickness", attr("SliceThickness", measures)),
        spacing_between_slices_mm=_float(
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


def _classic_frame(path: Path, ds: _FastHeader) -> FrameHeader:
    echo_time = _float(path, "EchoTime", ds.get("EchoTime"))
    if echo_time is None:
        raise HeaderError(path, "EchoTime", "(absent)", "the echo time in ms")
    position = _floats(path, "ImagePositionPatient", ds.get("ImagePositionPatient"), 3)
    return FrameHeader(
        frame=None,
        instance_key=_uid(path, ds, "SOPInstanceUID"),
        echo_time_ms=echo_time,
        position=(position[0], position[1], position[2]),
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
    frames = []
    for index, item in enumerate(per_frame):
        echo = _macro_value(item, shared, "MREchoSequence", "EffectiveEchoTime")
        echo_time = _float(path, f"frame {index + 1} EffectiveEchoTime", echo)
        if echo_time is None:
            raise HeaderError(path, f"frame {index + 1} EffectiveEchoTime", "(absent)", "the echo time in ms")
        position = _floats(
            path,
            f"frame {index + 1} ImagePositionPatient",
            _macro_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"),
            3,
        )
        frames.append(
            FrameHeader(
                frame=index,
                instance_key=f"{sop}#{index + 1}",
                echo_time_ms=echo_time,
                position=(position[0], position[1], position[2]),
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
            number = content[0].get("InStackPositionNumber")
            if number is not None:
                highest = max(highest, int(number))
    return highest or None


def _enhanced_sequence_tokens(ds: _FastHeader, group: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Enhanced MR states the sequence in coded attributes; map them onto classic ScanningSequence and
    SequenceVariant tokens so that one protocol rule reads both forms."""
    scanning: list[str] = []
    pulse = str(ds.get("EchoPulseSequence", "") or "")
    if pulse in ("GRADIENT", "BOTH"):
        scanning.append("GR")
    if pulse in ("SPIN", "BOTH"):
        scanning.append("SE")
    if str(ds.get("EchoPlanarPulseSequence", "") or "") == "YES":
        scanning.append("EP")
    modifier = group("MRModifierSequence")
    if modifier is not None and str(modifier.get("InversionRecovery", "") or "") == "YES":
        scanning.append("IR")
    variant: list[str] = []
    spoiling = str((modifier or Dataset()).get("Spoiling", "") or "")
    if spoiling in ("RF", "RF_AND_GRADIENT"):
        variant.append("SP")
    return tuple(scanning), tuple(variant)


def _classic_magnitude(ds: _FastHeader, image_type: tuple[str, ...]) -> bool | None:
    component = str(ds.get("ComplexImageComponent", "") or "")
    if component:
        return component == "MAGNITUDE"
    if "P" in image_type or "PHASE" in image_type:
        return False
    if "M" in image_type or "MAGNITUDE" in image_type:
        return True
    return None


def _check_pixel_bytes(path: Path, header: ObjectHeader, n_frames: int, remaining: int) -> None:
    """A file cut short in transfer still has a complete header; its pixel data is shorter than the header
    says. Catching it here keeps a broken file out of the acquisition before any pixel is read."""
    dtype = _pixel_dtype(path, header.bits_allocated, header.pixel_representation)
    expected = n_frames * header.rows * header.columns * dtype.itemsize
    available = remaining - _PIXEL_ELEMENT_HEADER_BYTES
    if available < expected:
        raise HeaderError(
            path, "PixelData", f"{max(available, 0)} bytes", f"{expected} bytes (file truncated?)"
        )


def _pixel_dtype(path: Path, bits_allocated: int, pixel_representation: int) -> np.dtype[Any]:
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
    return numbers
