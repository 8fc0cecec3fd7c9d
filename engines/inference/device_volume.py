"""A dual-echo volume that lives where the network runs, filled slice by slice as the images arrive.

Why: on a GPU the network computes a slab in about 9 ms, while the host path around it (numpy gather, padding,
float32 copies, transfers, HU in numpy) cost ten times that. With the volume kept on the device, a slab's input
is a gather of slices that are already there, and only the int16 core slab travels back (see ``SctEngine``).
The same code runs with device ``cpu``, where it is the embedded default's path.

Pixels are stored as the 16 bits the scanner wrote (int16 storage holding uint16 values, the same footprint as the
DICOM pixel data) and widened to float32 only for the slab being computed, so a volume costs what its DICOM
pixels cost. Uploads come from the streamer thread and slabs are computed on the engine thread. On CUDA each
slice goes through a pinned staging buffer on the volume's own stream, so the copy overlaps the network running
on the backend's stream, and :meth:`DeviceVolume.wait_for_uploads` makes the compute stream wait for them. On
the CPU uploads are plain copies, ordered before the slab that reads them by the queue between the threads.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from sct_core.errors import SctError

#: Pinned host buffers a CUDA volume cycles through: enough that the streamer rarely waits for a copy to finish
#: before it can stage the next slice, few enough that pinned memory stays a few MB.
STAGING_BUFFERS = 8
#: Pixel values the int16 storage holds, as unsigned 16-bit numbers (what MR magnitude images are).
PIXEL_RANGE = (0, 65535)
_LOW_16_BITS = 0xFFFF


class PixelRangeError(SctError, ValueError):
    """An image's pixels do not fit the 16 unsigned bits the volume stores."""

    def __init__(self, message: str, *, found: object = None, expected: str = "") -> None:
        super().__init__(message, attribute="pixel values", found=found, expected=expected)


class DeviceVolume:
    """``[echo, slice, row, column]`` raw pixels on ``device``; one per acquisition being streamed."""

    def __init__(self, n_echoes: int, shape: tuple[int, int, int], device: torch.device) -> None:
        if n_echoes < 1 or min(shape) < 1:
            raise ValueError(f"volume shape: found {n_echoes} echoes x {shape}, expected positive sizes")
        self.shape = (n_echoes, *shape)
        self.device = device
        self._data = torch.zeros(self.shape, dtype=torch.int16, device=device)
        self._cuda = device.type == "cuda"
        self._lock = threading.Lock()
        if self._cuda:
            plane = shape[1:]
            self._stream: Any = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            # The zero fill above was queued on the current stream; uploads on ours must come after it.
            self._stream.wait_stream(torch.cuda.current_stream(device))
            self._uploaded: Any = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._staging = [
                torch.empty(plane, dtype=torch.int16, pin_memory=True) for _ in range(STAGING_BUFFERS)
            ]
            self._staged: list[Any] = [None] * STAGING_BUFFERS
            self._next = 0

    @property
    def in_plane(self) -> tuple[int, int]:
        return self.shape[2], self.shape[3]

    @property
    def n_slices(self) -> int:
        return self.shape[1]

    def put(self, echo: int, index: int, image: npt.NDArray[Any]) -> None:
        """Store one slice of one echo (called from the streamer thread as images are read)."""
        if image.shape != self.in_plane:
            raise ValueError(
                f"image shape: found {image.shape}, expected {self.in_plane} (rows, columns of the slice grid)"
            )
        bits = _as_16_bits(image)
        if not self._cuda:
            self._data[echo, index].numpy()[...] = bits
            return
        with self._lock:
            slot = self._next
            self._next = (slot + 1) % STAGING_BUFFERS
            if self._staged[slot] is not None:
                self._staged[slot].synchronize()
            staging = self._staging[slot]
            staging.numpy()[...] = bits
            with torch.cuda.stream(self._stream):
                self._data[echo, index].copy_(staging, non_blocking=True)
                done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                done.record(self._stream)
                self._staged[slot] = done
                self._uploaded.record(self._stream)

    def wait_for_uploads(self) -> None:
        """Make the current stream wait for every upload issued so far (nothing to do on the CPU)."""
        if self._cuda:
            with self._lock:
                torch.cuda.current_stream(self.device).wait_event(self._uploaded)

    def window(
        self,
        slices: torch.Tensor,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """The normalised float32 network input: the given slices (edge slices repeated by the indices), padded
        in-plane by the given row and column indices (``None``: no padding), divided by ``scale``."""
        x = self._data.index_select(1, slices)
        if rows is not None:
            x = x.index_select(2, rows)
        if cols is not None:
            x = x.index_select(3, cols)
        widened = x.to(torch.int32).bitwise_and_(_LOW_16_BITS).to(torch.float32)
        return widened.mul_(1.0 / scale)

    def to_host(self) -> npt.NDArray[np.uint16]:
        """The pixels as uint16 on the host (tests and diagnostics)."""
        self.wait_for_uploads()
        return np.ascontiguousarray(self._data.cpu().numpy().view(np.uint16))


def _as_16_bits(image: npt.NDArray[Any]) -> npt.NDArray[np.int16]:
    """The image's uint16 values as int16 bits; other integer images are accepted when their values fit."""
    if image.dtype == np.uint16:
        return np.ascontiguousarray(image).view(np.int16)
    if not np.issubdtype(image.dtype, np.integer):
        raise PixelRangeError(
            f"pixel values: found dtype {image.dtype}, expected integer pixels (uint16 MR magnitudes)",
            found=str(image.dtype),
            expected="integer",
        )
    low, high = int(image.min()), int(image.max())
    if low < PIXEL_RANGE[0] or high > PIXEL_RANGE[1]:
        raise PixelRangeError(
            f"pixel values: found {low}..{high}, expected {PIXEL_RANGE[0]}..{PIXEL_RANGE[1]} (unsigned 16 bit)",
            found=(low, high),
            expected=f"{PIXEL_RANGE[0]}..{PIXEL_RANGE[1]}",
        )
    return np.ascontiguousarray(image.astype(np.uint16)).view(np.int16)
