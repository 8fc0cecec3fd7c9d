"""What a server does with windows from many agents: run them through one warmed backend per window shape.

Agents send windows of the shape their slab plan makes (two echoes, the slab depth plus both halos, the in-plane
matrix padded to the network's downsampling factor). Backends are static per shape, as compiled and TensorRT
engines are, so the runner keeps one per shape it has seen, loaded and accepted on first use (``warm`` loads the
expected ones before the server says it is ready) and closed again when more than ``max_shapes`` are held. A
shape the network cannot take, or one too large for the memory the server sets aside, is refused with the shape
found and the one expected; nothing is silently padded or cropped on the server, where the agent could not see it.

A batch (Triton's dynamic batcher joins requests of one shape from several agents) runs window by window through
the backend: each window then takes exactly the path a local one does, so a window's output does not depend on
which other agents' windows shared its batch.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from engines.backends.base import BackendInfo, BackendOptions, InferenceBackend
from engines.backends.registry import load_backend
from engines.model.manifest import ModelManifest
from sct_core.errors import SctError

F32 = npt.NDArray[np.float32]

#: Largest window a server accepts, in voxels per echo: 96 slices of 512 × 512 (a slab depth of 64 with the
#: shipped halo, on the largest matrix a spine protocol uses), so one request cannot exhaust the server's memory.
MAX_WINDOW_VOXELS: Final = 96 * 512 * 512
#: Window shapes kept loaded; agents with the same protocol share one, so a few cover a site.
DEFAULT_MAX_SHAPES: Final = 4

logger = logging.getLogger(__name__)


class WindowShapeError(SctError, ValueError):
    """A window the served model cannot take."""

    def __init__(self, message: str, *, found: object, expected: str) -> None:
        super().__init__(message, attribute="window", found=found, expected=expected)


class WindowRunner:
    """Thread-safe: Triton may call it from several model instances; one backend runs one window at a time."""

    def __init__(
        self,
        manifest: ModelManifest,
        backend: str,
        options: BackendOptions,
        *,
        max_shapes: int = DEFAULT_MAX_SHAPES,
    ) -> None:
        if max_shapes < 1:
            raise ValueError(f"max_shapes: found {max_shapes}, expected 1 or more")
        self.manifest = manifest
        self.backend_name = backend
        self.options = options
        self.max_shapes = max_shapes
        self._backends: OrderedDict[tuple[int, int, int, int], InferenceBackend] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """The window shape ``[echoes, depth, rows, cols]`` if the model can take it; WindowShapeError otherwise."""
        arch = self.manifest.architecture
        factor = arch.downsampling_factor
        expected = (
            f"[{arch.in_channels}, depth, rows, cols], each of depth, rows and cols a multiple of {factor}"
        )
        if len(shape) != 4 or shape[0] != arch.in_channels:
            raise WindowShapeError(
                f"window shape: found {list(shape)}, expected {expected}", found=shape, expected=expected
            )
        if any(n < factor or n % factor for n in shape[1:]):
            raise WindowShapeError(
                f"window shape: found {list(shape)}, expected {expected}", found=shape, expected=expected
            )
        voxels = shape[1] * shape[2] * shape[3]
        if voxels > MAX_WINDOW_VOXELS:
            raise WindowShapeError(
                f"window shape {list(shape)}: found {voxels} voxels per echo, expected at most {MAX_WINDOW_VOXELS}",
                found=shape,
                expected=f"at most {MAX_WINDOW_VOXELS} voxels per echo",
            )
        return (shape[0], shape[1], shape[2], shape[3])

    def backend_for(self, shape: tuple[int, ...]) -> InferenceBackend:
        """The warmed backend for a window shape, loaded (and accepted, for GPU engines) on first use."""
        key = self.check(shape)
        with self._lock:
            backend = self._backends.get(key)
            if backend is not None:
                self._backends.move_to_end(key)
                return backend
            backend = load_backend(self.backend_name, self.manifest, key, self.options)
            logger.info(
                "serving %s on %s %s for window %s (warm-up %.1f s)",
                self.manifest.label,
                backend.info.backend,
                backend.info.precision,
                "x".join(map(str, key)),
                backend.info.warmup_s,
            )
            self._backends[key] = backend
            while len(self._backends) > self.max_shapes:
                _, evicted = self._backends.popitem(last=False)
                logger.info(
                    "closing the engine for window %s (least recently used)",
                    "x".join(map(str, evicted.input_shape)),
                )
                evicted.close()
            return backend

    def warm(self, shape: tuple[int, int, int, int]) -> BackendInfo:
        """Load the backend for a shape agents will send, so that their first window is not slow."""
        return self.backend_for(shape).info

    def run(self, windows: F32) -> F32:
        """Network outputs ``[batch, outputs, depth, rows, cols]`` of windows ``[batch, echoes, depth, rows, cols]``."""
        if windows.ndim != 5:
            raise WindowShapeError(
                f"windows: found {windows.ndim} dimensions, expected 5 [batch, echoes, depth, rows, cols]",
                found=windows.shape,
                expected="[batch, echoes, depth, rows, cols]",
            )
        backend = self.backend_for(windows.shape[1:])
        out = np.empty((windows.shape[0], backend.outputs, *windows.shape[2:]), dtype=np.float32)
        with self._lock, torch.inference_mode(), backend.stream_context():
            for k in range(windows.shape[0]):
                window = torch.from_numpy(np.ascontiguousarray(windows[k], dtype=np.float32)).to(
                    backend.device
                )
                out[k] = backend.run_outputs(window).float().cpu().numpy()
            backend.synchronize()
        return out

    @property
    def shapes(self) -> list[tuple[int, int, int, int]]:
        return list(self._backends)

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()
