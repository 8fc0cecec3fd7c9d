"""Which attributes the header reader reads, and reading them fast: straight from the raw bytes where it can.

Grouping and judging need a few dozen attributes, most of them short strings and numbers; pydicom's element
conversion costs more than parsing the file, so :class:`FastHeader` decodes text and binary numbers (in either
byte order) itself and leaves everything else (sequences, implicit VR) to pydicom. Vendor private attributes are
read only from the block their creator owns (GE and Siemens both use group 0019 for different things).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

#: The attributes read from a header; pydicom skips the rest of the file's elements (faster than a full
#: header parse, which matters for the ingest target: >= 0.9x bare ``pydicom.dcmread``).
HEADER_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "SeriesNumber", "SeriesTime", "ProtocolName",
    "SeriesDescription",
    "MagneticFieldStrength", "ImagingFrequency", "MRAcquisitionType", "ScanningSequence", "SequenceVariant",
    "SequenceName", "PulseSequenceName", "ScanOptions", "InversionTime", "ImageType", "ComplexImageComponent",
    "RepetitionTime", "FlipAngle", "PixelBandwidth", "EchoTrainLength", "ImagesInAcquisition", "NumberOfFrames",
    "Rows", "Columns", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient",
    "ImagePositionPatient", "EchoTime", "BitsAllocated", "PixelRepresentation", "DirectoryRecordSequence",
    "EchoPulseSequence", "EchoPlanarPulseSequence", "SteadyStatePulseSequence", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
)  # fmt: skip


TAGS: dict[str, BaseTag] = {k: Tag(k) for k in HEADER_KEYWORDS}


@dataclass(frozen=True, slots=True)
class Private:
    """A vendor private attribute: its tag, the creator that must own its block, and its VR (needed when the
    file is implicit VR, where a private value arrives as raw bytes)."""

    tag: BaseTag
    creator: str
    vr: str


_PHILIPS_IMAGING = "Philips Imaging DD 001"


_PHILIPS_MR_IMAGING = "Philips MR Imaging DD 001"


_GE_ACQUISITION = "GEMS_ACQU_01"


_GE_PARAMETERS = "GEMS_PARM_01"


PRIVATE: dict[str, Private] = {
    "philips_echo_count": Private(Tag(0x2001, 0x1014), _PHILIPS_IMAGING, "SL"),
    "philips_slice_count": Private(Tag(0x2001, 0x1018), _PHILIPS_IMAGING, "SL"),
    "philips_technique": Private(Tag(0x2001, 0x1020), _PHILIPS_IMAGING, "LO"),
    "philips_water_fat_shift": Private(Tag(0x2001, 0x1022), _PHILIPS_IMAGING, "FL"),
    "philips_image_type": Private(Tag(0x2005, 0x1011), _PHILIPS_MR_IMAGING, "CS"),
    "ge_echo_count": Private(Tag(0x0019, 0x107E), _GE_ACQUISITION, "SS"),
    "ge_psd_name": Private(Tag(0x0019, 0x109C), _GE_ACQUISITION, "LO"),
    "ge_internal_psd": Private(Tag(0x0019, 0x109E), _GE_ACQUISITION, "LO"),
    "ge_component": Private(Tag(0x0043, 0x102F), _GE_PARAMETERS, "SS"),
}


#: Each private block's creator element: (gggg,0010) owns (gggg,10xx).
CREATOR_TAGS = sorted({Tag(p.tag.group, p.tag.element >> 8) for p in PRIVATE.values()})


HEADER_TAGS = sorted({*TAGS.values(), *(p.tag for p in PRIVATE.values()), *CREATOR_TAGS})


#: Value representations decoded here straight from the raw bytes: text, and binary numbers in the file's byte
#: order. Anything else (sequences, and implicit VR outside private blocks) goes through pydicom's conversion.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})


_BINARY_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


class FastHeader:
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
        tag = TAGS.get(keyword)
        # get_item returns the raw element while pydicom has not converted it (its stubs say DataElement).
        element: Any = self._ds.get_item(tag) if tag is not None else None
        if not isinstance(element, RawDataElement):
            return self._ds.get(keyword, default)
        value = raw_value(element, str(element.VR))
        return self._ds.get(keyword, default) if value is UNDECODED else value

    def private(self, name: str) -> Any:
        """A vendor private value, or None when absent or when its block belongs to another creator (GE and
        Siemens both use group 0019 for different things)."""
        spec = PRIVATE[name]
        creator_tag = Tag(spec.tag.group, spec.tag.element >> 8)
        creator_element: Any = self._ds.get_item(creator_tag)
        if creator_element is None:
            return None
        creator = raw_value(creator_element, "LO") if isinstance(creator_element, RawDataElement) else None
        if creator is UNDECODED or creator is None:
            creator = creator_element.value
        if str(creator).strip() != spec.creator:
            return None
        element: Any = self._ds.get_item(spec.tag)
        if element is None:
            return None
        if isinstance(element, RawDataElement):
            vr = str(element.VR) if element.VR not in (None, "UN") else spec.vr
            value = raw_value(element, vr, little_endian=bool(element.is_little_endian))
            return None if value is UNDECODED else value
        return element.value


UNDECODED = object()


def raw_value(element: RawDataElement, vr: str, *, little_endian: bool | None = None) -> Any:
    raw: Any = element.value
    if raw is None:
        return UNDECODED
    if isinstance(raw, str):
        raw = raw.encode("latin-1", "replace")
    if vr in _TEXT_VRS:
        text = raw.decode("latin-1").strip("\x00 ")
        parts = [part.strip() for part in text.split("\\")]
        return parts[0] if len(parts) == 1 else parts
    code = _BINARY_VRS.get(vr)
    endian = element.is_little_endian if little_endian is None else little_endian
    if code is not None:
        size = struct.calcsize(code)
        if len(raw) % size:
            return UNDECODED
        # Big endian: the retired explicit VR big endian syntax, which still carries vendors' private counts.
        values = struct.unpack(f"{'<' if endian else '>'}{len(raw) // size}{code}", raw)
        if not values:
            return None
        return values[0] if len(values) == 1 else list(values)
    return UNDECODED
