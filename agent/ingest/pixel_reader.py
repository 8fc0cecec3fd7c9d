"""Pixel data of MR images, read only when a slab needs them (headers alone group and judge the images).

Ingest owns every read of the scanner's files; the streamer is handed :func:`read_pixels` by the pipeline, so
the inference stage never imports the ingest stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

from agent.ingest.header_reader import pixel_dtype
from agent.ingest.header_values import HeaderError


def read_pixels(path: Path, frames: Sequence[int | None]) -> npt.NDArray[Any]:
    """The pixel arrays ``[len(frames), rows, columns]`` of the given frames of one file (``None``: a classic
    file's only image), as stored (no rescale: MR magnitude images are stored values)."""
    ds = pydicom.dcmread(path)
    data = ds.get("PixelData")
    rows, columns = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    dtype = pixel_dtype(path, int(ds.BitsAllocated), int(ds.PixelRepresentation))
    per_frame = rows * columns
    expected = n_frames * per_frame * dtype.itemsize
    if data is None or len(data) < expected:
        found = 0 if data is None else len(data)
        raise HeaderError(path, "PixelData", f"{found} bytes", f"{expected} bytes (file truncated?)")
    array = np.frombuffer(data, dtype=dtype, count=n_frames * per_frame).reshape(n_frames, rows, columns)
    indices = [0 if f is None else f for f in frames]
    return array[indices]
