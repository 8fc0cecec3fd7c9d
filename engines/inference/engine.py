"""The sCT engine: a verified model on a warmed-up backend, run slab by slab over dual-echo volumes.

This is the one object the agent's engine stage holds. Callers hand it echoes already ordered by echo time
(``[echo, slice, row, col]``, any integer or float dtype) and get HU back as float32, clipped to the manifest's HU
range. ``infer_slab`` works on a volume that is still filling up: it reads only the slices the slab's window
needs (``SlabPlan.windows[k].needed_slices``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engines.backends.base import BackendInfo, BackendOptions, InferenceBackend
from engines.backends.registry import AUTO, load_backend
from engines.inference.slabs import SlabPlan, SlabWindow, pad_in_plane
from engines.model.manifest import ModelManifest, default_manifest

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


class SctEngine:
    def __init__(
        self,
        manifest: ModelManifest,
        backend_name: str,
        options: BackendOptions,
        slab_depth: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.backend_name = backend_name
        self.options = options
        #: Output slices per slab. The manifest's depth is the default; another multiple of the network's
        #: downsampling factor gives the same stitched result (the halo, which decides exactness, stays the
        #: manifest's), trading per-slab latency against halo overhead.
        self.slab_depth = slab_depth or manifest.slab.depth
        factor = manifest.architecture.downsampling_factor
        if self.slab_depth < 1 or self.slab_depth % factor:
            raise ValueError(
                f"slab depth: found {self.slab_depth}, expected a positive multiple of {factor} "
                f"(the network's downsampling factor)"
            )
        self._backends: dict[tuple[int, int, int, int], InferenceBackend] = {}

    @classmethod
    def load(
        cls,
        manifest: ModelManifest | None = None,
        *,
        backend: str = AUTO,
        options: BackendOptions = BackendOptions(),
        in_plane: tuple[int, int] | None = None,
        slab_depth: int | None = None,
    ) -> SctEngine:
        """Load and warm up for the manifest's matrix (or ``in_plane``), so the first slab is not slow."""
        engine = cls(manifest or default_manifest(), backend, options, slab_depth)
        engine.backend_for(in_plane or engine.manifest.matrix)
        return engine

    @property
    def info(self) -> BackendInfo:
        return next(iter(self._backends.values())).info

    def window_shape(self, in_plane: tuple[int, int]) -> tuple[int, int, int, int]:
        factor = self.manifest.architecture.downsampling_factor
        rows, cols = (-(-n // factor) * factor for n in in_plane)
        depth = self.slab_depth + 2 * self.manifest.slab.halo
        return (self.manifest.architecture.in_channels, depth, rows, cols)

    def backend_for(self, in_plane: tuple[int, int]) -> InferenceBackend:
        """The backend for this in-plane size, loaded (and warmed up) on first use."""
        shape = self.window_shape(in_plane)
        if shape not in self._backends:
            backend = load_backend(self.backend_name, self.manifest, shape, self.options)
            logger.info(
                "engine %s on %s %s, window %s, warm-up %.1f s",
                self.manifest.label,
                backend.info.backend,
                backend.info.precision,
                "x".join(map(str, shape)),
                backend.info.warmup_s,
            )
            self._backends[shape] = backend
        return self._backends[shape]

    def plan(self, n_slices: int) -> SlabPlan:
        return SlabPlan.for_volume(n_slices, self.slab_depth, self.manifest.slab.halo)

    def scale(self, echoes: npt.NDArray[Any]) -> float:
        """Intensity scale of a volume; needs only its leading slices (see Normalisation)."""
        return self.manifest.normalisation.scale(echoes)

    def infer_slab(self, echoes: npt.NDArray[Any], plan: SlabPlan, window: SlabWindow, scale: float) -> F32:
        """HU of the window's core slices ``[core_start, core_stop)``."""
        self._check_echoes(echoes, plan)
        rows, cols = echoes.shape[-2:]
        x = network_input(self.manifest, echoes, plan.slice_indices(window), scale)
        out = self.backend_for((rows, cols)).infer(x)
        core = out[plan.halo : plan.halo + (window.core_stop - window.core_start), :rows, :cols]
        return to_hu(self.manifest, core)

    def infer_volume(self, echoes: npt.NDArray[Any]) -> F32:
        """HU of a complete volume, slab by slab (what the agent publishes, stitched)."""
        plan = self.plan(echoes.shape[1])
        scale = self.scale(echoes)
        out = np.empty(echoes.shape[1:], dtype=np.float32)
        for window in plan.windows:
            out[window.core_start : window.core_stop] = self.infer_slab(echoes, plan, window, scale)
        return out

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()

    def _check_echoes(self, echoes: npt.NDArray[Any], plan: SlabPlan) -> None:
        expected = self.manifest.architecture.in_channels
        if echoes.ndim != 4 or echoes.shape[0] != expected:
            raise ValueError(
                f"echoes: found shape {echoes.shape}, expected [{expected} echoes, slices, rows, columns]"
            )
        if echoes.shape[1] != plan.n_slices:
            raise ValueError(f"echoes: found {echoes.shape[1]} slices, the slab plan expects {plan.n_slices}")


def network_input(
    manifest: ModelManifest, echoes: npt.NDArray[Any], slice_indices: npt.NDArray[np.intp], scale: float
) -> F32:
    """The normalised, in-plane padded float32 input for the given slices (edge slices repeated by the indices)."""
    x = np.take(echoes, slice_indices, axis=1).astype(np.float32)
    x *= np.float32(1.0 / scale)
    return pad_in_plane(x, manifest.architecture.downsampling_factor)


def to_hu(manifest: ModelManifest, raw: F32) -> F32:
    """Network output to HU, clipped to the manifest's range (a new array; ``raw`` may be a backend's view)."""
    low, high = manifest.hu_range
    hu = raw * np.float32(manifest.hu_scale)
    return np.clip(hu, low, high, out=hu)


def whole_volume_reference(manifest: ModelManifest, echoes: npt.NDArray[Any]) -> F32:
    """One fp32 eager pass over the whole padded volume: the ground truth that stitched slabs must match."""
    plan = SlabPlan.for_volume(echoes.shape[1], manifest.slab.depth, manifest.slab.halo)
    rows, cols = echoes.shape[-2:]
    x = network_input(manifest, echoes, plan.reference_indices(), manifest.normalisation.scale(echoes))
    with torch.inference_mode():
        raw = manifest.build_model()(torch.from_numpy(x)[None])[0, 0].numpy()
    return to_hu(manifest, raw[plan.halo : plan.halo + plan.n_slices, :rows, :cols])
