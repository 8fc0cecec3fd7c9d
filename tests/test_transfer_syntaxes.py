"""Exports in every transfer syntax a console writes: read to the exact stored values, or refused naming the
TransferSyntaxUID.

The files are real scanner DICOM (Philips, Siemens, GE from ``../shared/dicom``) and simulated exports, re-encoded
by dcmtk (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmconv``) and by GDCM
(JPEG 2000, which dcmtk does not write), from a simulated classic series and an Enhanced multi-frame file.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from real_dicom_support import PHILIPS_CLASSIC, PHILIPS_ENHANCED, SIEMENS_2D_MAGNITUDE, series_files
from scanner_support import export_small

from agent.ingest.header_reader import read_header
from agent.ingest.header_values import HeaderError
from agent.ingest.pixel_reader import read_pixels
from engines.scanner.export import OutputFormat

DCMTK = shutil.which("dcmconv")
pytestmark = pytest.mark.skipif(DCMTK is None, reason="dcmtk is not installed (apt-get install dcmtk)")


def dcmtk(tool: str, *options: str) -> Callable[[Path, Path], None]:
    def encode(source: Path, target: Path) -> None:
        subprocess.run(
            [tool, *options, str(source), str(target)], check=True, capture_output=True, timeout=60
        )

    return encode


def gdcm_jpeg2000(source: Path, target: Path) -> None:
    """GDCM's own transcoder (what ``gdcmconv --j2k`` does), lossless JPEG 2000."""
    import gdcm  # noqa: PLC0415 - only this encoder needs it

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEG2000Lossless))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


#: (TransferSyntaxUID, encoder): what the consoles' compression and conversion options produce.
READABLE = {
    "jpeg-lossless": (JPEGLosslessSV1, dcmtk("dcmcjpeg", "+e1")),
    "jpeg-ls": (JPEGLSLossless, dcmtk("dcmcjpls", "+el")),
    "jpeg-2000": (JPEG2000Lossless, gdcm_jpeg2000),
    "rle": (RLELossless, dcmtk("dcmcrle")),
    "deflate": (DeflatedExplicitVRLittleEndian, dcmtk("dcmconv", "+td")),
    "big-endian": (ExplicitVRBigEndian, dcmtk("dcmconv", "+tb")),
    "implicit-vr": (ImplicitVRLittleEndian, dcmtk("dcmconv", "+ti")),
}


def encoded(source: Path, folder: Path, syntax: str) -> Path:
    """``source`` re-encoded in ``syntax`` (a key of READABLE), checked to carry that TransferSyntaxUID."""
    uid, encode = READABLE[syntax]
    target = folder / f"{source.stem}-{syntax}.dcm"
    encode(source, target)
    assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    return target


@pytest.fixture(scope="module")
def classic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One classic MR file of a simulated series (explicit VR little endian, as the simulator writes)."""
    summary = export_small(tmp_path_factory.mktemp("classic"))
    return summary.paths[len(summary.paths) // 2]


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    summary = export_small(tmp_path_factory.mktemp("enhanced"), format=OutputFormat.ENHANCED)
    return summary.paths[0]


@pytest.mark.parametrize("name", list(READABLE))
def test_a_classic_image_in_each_syntax_reads_to_the_stored_values(
    classic: Path, tmp_path: Path, name: str
) -> None:
    target = encoded(classic, tmp_path, name)
    original, recoded = read_header(classic), read_header(target)
    assert recoded.header == original.header and recoded.frames == original.frames
    expected = read_pixels(classic, [None])
    pixels = read_pixels(target, [None])
    assert pixels.dtype == expected.dtype and pixels.dtype.isnative
    assert np.array_equal(pixels, expected)
    assert int(expected.max()) > 100  # a real image, not zeros


@pytest.mark.parametrize("name", ["jpeg-lossless", "jpeg-ls", "rle"])
def test_an_enhanced_file_decodes_only_the_frames_asked_for(
    enhanced: Path, tmp_path: Path, name: str
) -> None:
    target = encoded(enhanced, tmp_path, name)
    assert len(read_header(target).frames) == len(read_header(enhanced).frames)
    wanted = [3, 0, 7]
    assert np.array_equal(read_pixels(target, wanted), read_pixels(enhanced, wanted))


#: One real image per vendor (GE's 3D B0 map, Philips' dual-echo FFE, Siemens' field map magnitude).
REAL_FILES = {
    "ge": "dcm_qa_fmap/GE_3_3db0maps_3D_EFGRE3D",
    "philips": PHILIPS_CLASSIC,
    "siemens": SIEMENS_2D_MAGNITUDE,
}


# JPEG 2000 is left to the simulated export: GDCM's writer, its only encoder here, rewrites a classic Philips
# image as an Enhanced MR object, which no console does.
@pytest.mark.parametrize(
    "syntax", ["jpeg-lossless", "jpeg-ls", "rle", "big-endian", "implicit-vr", "deflate"]
)
@pytest.mark.parametrize("vendor", list(REAL_FILES))
def test_real_scanner_images_read_the_same_in_each_syntax(vendor: str, syntax: str, tmp_path: Path) -> None:
    source = series_files(REAL_FILES[vendor])[0]
    target = encoded(source, tmp_path, syntax)
    assert read_header(target).header == read_header(source).header
    expected = read_pixels(source, [None])
    assert np.array_equal(read_pixels(target, [None]), expected)
    assert int(expected.max()) > 0


def test_a_real_enhanced_file_compressed_decodes_its_frames(tmp_path: Path) -> None:
    """Philips' Enhanced MR object: 212 frames, two echoes, JPEG-LS."""
    (source,) = (p for p in series_files(PHILIPS_ENHANCED) if p.suffix.lower() != ".txt")
    target = encoded(source, tmp_path, "jpeg-ls")
    parsed = read_header(target)
    assert len(parsed.frames) == len(read_header(source).frames) == 212
    wanted = [0, 105, 211]
    assert np.array_equal(read_pixels(target, wanted), read_pixels(source, wanted))


def test_lossy_compression_is_refused_naming_the_transfer_syntax(classic: Path, tmp_path: Path) -> None:
    """JPEG-LS near-lossless decodes fine, but to values the scanner did not reconstruct: refused at the header,
    so the technologist hears it with the verdict."""
    target = tmp_path / "near-lossless.dcm"
    dcmtk("dcmcjpls", "+en")(classic, target)
    with pytest.raises(HeaderError) as info:
        read_header(target)
    error = info.value
    assert error.attribute == "TransferSyntaxUID"
    assert error.found.startswith(f"{JPEGLSNearLossless} (JPEG-LS Lossy (Near-Lossless) Image Compression)")
    assert "lossy compression alters the intensities" in error.found
    assert "lossless JPEG, JPEG-LS, JPEG 2000 or RLE" in error.expected


def test_a_compressed_file_cut_short_is_refused_when_its_pixels_are_read(
    classic: Path, tmp_path: Path
) -> None:
    target = encoded(classic, tmp_path, "jpeg-ls")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) - len(data) // 3])
    with pytest.raises(HeaderError) as info:
        read_pixels(target, [None])
    assert info.value.attribute == "PixelData"
    assert "End of file reached before delimiter" in info.value.found
