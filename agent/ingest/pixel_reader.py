"""Pixel data of MR images, read only when a slab needs them (headers alone group and judge the images).

Ingest owns every read of the scanner's files; the streamer is handed :func:`read_pixels` by the pipeline, so
the inference stage never imports the ingest stage. Uncompressed values are taken straight from the bytes (the
common case, and the fast one); big-endian values are swapped; lossless compressed frames go through pydicom's
pixel handlers one frame at a time, so a slab of an Enhanced file decodes only its own frames. Which transfer
syntaxes are read at all is decided at ingest (``transfer_syntax.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.pixels.utils import pixel_array

from agent.file_labels import error_text
from agent.ingest.header_reader import pixel_dtype
from agent.ingest.header_values import HeaderError
from agent.ingest.transfer_syntax import PixelEncoding, pixel_encoding

#: pydicom's warning for encapsulated pixel data whose file ends before the closing delimiter.
_ENDED_EARLY = r"End of file reached before delimiter"


def read_pixels(path: Path, frames: Sequence[int | None]) -> npt.NDArray[Any]:
    """The pixel arrays ``[len(frames), rows, columns]`` of the given frames of one file (``None``: a classic
    file's only image), as stored (no rescale: MR magnitude images are stored values)."""
    try:
        with warnings.catch_warnings():
            # pydicom only warns when compressed fragments end without their sequence delimiter: the file was
            # cut short, so it is refused like a truncated one. Other warnings (a vendor's odd value) stay so.
            warnings.filterwarnings("error", message=_ENDED_EARLY)
            ds = pydicom.dcmread(path)
    except (Exception, Warning) as error:
        # pydicom and the OS quote the path: the label replaces it, as in every HeaderError.
        raise HeaderError(
            path, "PixelData", f"unreadable ({error_text(error, path)})", "a complete file"
        ) from error
    rows, columns = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    dtype = pixel_dtype(path, int(ds.BitsAllocated), int(ds.PixelRepresentation))
    indices = [0 if f is None else f for f in frames]
    encoding = pixel_encoding(path, str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
    if encoding is PixelEncoding.COMPRESSED:
        return _decoded(path, ds, indices, (rows, columns), dtype)
    data = ds.get("PixelData")
    per_frame = rows * columns
    expected = n_frames * per_frame * dtype.itemsize
    if data is None or len(data) < expected:
        found = 0 if data is None else len(data)
        raise HeaderError(path, "PixelData", f"{found} bytes", f"{expected} bytes (file truncated?)")
    stored = dtype.newbyteorder(">") if encoding is PixelEncoding.BIG_ENDIAN else dtype
    array = np.frombuffer(data, dtype=stored, count=n_frames * per_frame).reshape(n_frames, rows, columns)
    return array[indices].astype(dtype, copy=False)


def _decoded(
    path: Path, ds: pydicom.Dataset, indices: list[int], shape: tuple[int, int], dtype: np.dtype[Any]
) -> npt.NDArray[Any]:
    out = np.empty((len(indices), *shape), dtype=dtype)
    for position, index in enumerate(indices):
        try:
            frame = pixel_array(ds, index=index)
        except Exception as error:  # a decoder's own error types differ per codec; each means a bad stream
            raise HeaderError(
                path,
                "PixelData",
                f"frame {index} could not be decoded ({error_text(error, path)})",
                f"a complete {ds.file_meta.TransferSyntaxUID.name} stream",
            ) from error
        if frame.shape != shape:
            raise HeaderError(path, "PixelData", f"a {frame.shape} frame", f"{shape} (Rows, Columns)")
        out[position] = frame
    return out
