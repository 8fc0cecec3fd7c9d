"""The acquisition counts a Siemens classic export states only in its private protocol block.

Siemens classic MR images (VB/VD/VE software) carry no ImagesInAcquisition and an EchoTrainLength that is 0
for a two-echo field map, so a partial series cannot be told from a complete one from the standard attributes.
The console's protocol travels in the CSA series header (0029,1020) as the "ASCCONV" text block; it states the
number of contrasts (echoes), slices (2D) or slabs and images per slab (3D). XA-software interoperability
exports drop the CSA headers; then these counts are simply unknown.

Read once per acquisition (the block is ~100 kB), not for every file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

#: Private creator slots searched for the CSA creator; it reserves a block (slot 0x10 -> elements 0x10xx).
_CREATOR_TAGS = [Tag(0x0029, slot) for slot in range(0x10, 0x14)]
_CREATOR = "SIEMENS CSA HEADER"
#: CSA Series Header Info, element 0x20 within the creator's block.
_SERIES_HEADER_ELEMENT = 0x20
_ASCCONV = re.compile(rb"### ASCCONV BEGIN.*?### ASCCONV END ###", re.DOTALL)
#: sKSpace.ucDimension: 0x2 for 2D, 0x4 for 3D.
_DIMENSION_3D = 4
#: Bounds of plausible counts: a corrupt block must not announce 10^9 slices.
MAX_COUNT = 4096


@dataclass(frozen=True, slots=True)
class SiemensProtocol:
    contrasts: int | None
    #: Slices per echo: slices of a 2D protocol, slabs × images per slab of a 3D one.
    slices: int | None
    three_d: bool | None


def read_siemens_protocol(path: Path) -> SiemensProtocol | None:
    """The counts of the file's ASCCONV block, or None when the file has none (or cannot be read)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_CREATOR_TAGS)
        slots = [t.element for t in _CREATOR_TAGS if t in ds and str(ds[t].value).strip() == _CREATOR]
        if not slots:
            return None
        tag = Tag(0x0029, (slots[0] << 8) | _SERIES_HEADER_ELEMENT)
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[tag])
        raw = ds[tag].value if tag in ds else None
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(raw, bytes):
        return None
    return parse_ascconv(raw)


def parse_ascconv(raw: bytes) -> SiemensProtocol | None:
    match = _ASCCONV.search(raw)
    if match is None:
        return None
    block = match.group(0).decode("latin-1")
    values = _assignments(block)
    contrasts = _count(values.get("lContrasts"))
    slices = _count(values.get("sSliceArray.lSize"))
    dimension = _count(values.get("sKSpace.ucDimension"))
    three_d = None if dimension is None else dimension == _DIMENSION_3D
    if three_d:
        per_slab = _count(values.get("sKSpace.lImagesPerSlab"))
        slices = slices * per_slab if slices is not None and per_slab is not None else None
        if slices is not None and slices > MAX_COUNT:
            slices = None
    return SiemensProtocol(contrasts=contrasts, slices=slices, three_d=three_d)


_LINE = re.compile(r"^\s*([A-Za-z0-9_.\[\]]+)\s*=\s*(\S+)", re.MULTILINE)


def _assignments(block: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _LINE.finditer(block)}


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text, 0)
    except ValueError:
        return None
    return value if 0 < value <= MAX_COUNT else None
