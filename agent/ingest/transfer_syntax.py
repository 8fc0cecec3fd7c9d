"""Which transfer syntaxes the agent reads, and why it refuses the others.

Consoles export uncompressed images by default, but sites switch on compression to save network and archive
space: JPEG Lossless, JPEG-LS, JPEG 2000 and RLE (all lossless) and deflate. Their pixels decode to exactly the
values the scanner reconstructed, so the model sees what it was validated on; they are decoded with pydicom's
pixel handlers (RLE natively, the others through python-gdcm, one maintained codec package covering them all).

Lossy compression (JPEG baseline and extended, JPEG-LS near-lossless, lossy JPEG 2000, video) changes the
intensities the model maps to HU, by amounts no protocol rule can see: a lossy image is refused, naming its
TransferSyntaxUID, whatever decoder is installed. So is a lossless syntax whose decoder is missing on this
machine, with the package that provides it.

The check runs on the header, at ingest, so the technologist learns it with the verdict, not when a slab is due.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from agent.ingest.header_values import HeaderError

#: Compressed syntaxes whose decoded pixels equal the scanner's values.
LOSSLESS_COMPRESSED = frozenset(
    {
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        RLELossless,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
    }
)
#: What to install for a lossless syntax whose decoder is missing (python-gdcm reads all but HTJ2K).
CODEC_PACKAGE = "python-gdcm"
_HTJ2K_PACKAGE = "pylibjpeg and pylibjpeg-openjpeg"
_EXPECTED = (
    "uncompressed (implicit or explicit VR little endian, explicit VR big endian), deflated, or lossless "
    "JPEG, JPEG-LS, JPEG 2000 or RLE"
)


class PixelEncoding(Enum):
    """How a file's pixel data is stored, which decides how it is read (``pixel_reader``)."""

    #: Raw little-endian values at the end of the file (implicit and explicit VR).
    LITTLE_ENDIAN = "little endian"
    #: The whole dataset deflated: raw little-endian values once pydicom has inflated it (no byte count to check
    #: in the file, whose length is the compressed stream's).
    DEFLATED = "deflated"
    #: Raw big-endian values (the retired explicit VR big endian syntax; some older consoles).
    BIG_ENDIAN = "big endian"
    #: Encapsulated lossless frames, decoded by a pixel handler.
    COMPRESSED = "compressed"


def pixel_encoding(path: Path, transfer_syntax: str) -> PixelEncoding:
    """The encoding of a file in ``transfer_syntax``; :class:`HeaderError` naming the UID where it is refused."""
    uid = UID(transfer_syntax.strip()) if transfer_syntax else ImplicitVRLittleEndian
    if uid in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        return PixelEncoding.LITTLE_ENDIAN
    if uid == DeflatedExplicitVRLittleEndian:
        return PixelEncoding.DEFLATED
    if uid == ExplicitVRBigEndian:
        return PixelEncoding.BIG_ENDIAN
    found = uid if uid.name == uid else f"{uid} ({uid.name})"
    if uid not in LOSSLESS_COMPRESSED:
        reason = (
            "lossy compression alters the intensities the model was validated on" if uid.is_compressed else ""
        )
        raise HeaderError(path, "TransferSyntaxUID", f"{found}{'; ' + reason if reason else ''}", _EXPECTED)
    if not get_decoder(uid).is_available:
        raise HeaderError(
            path,
            "TransferSyntaxUID",
            f"{found}, which no installed decoder reads",
            f"{_EXPECTED} (install {_HTJ2K_PACKAGE if uid in (HTJ2KLossless, HTJ2KLosslessRPCL) else CODEC_PACKAGE} "
            f"to decode it)",
        )
    return PixelEncoding.COMPRESSED
