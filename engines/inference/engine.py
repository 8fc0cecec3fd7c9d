"""The sCT engine: a verified model on a warmed-up backend, run slab by slab over dual-echo volumes.

This is the one object the agent's engine stage holds. The agent fills a :class:`DeviceVolume` (from
:meth:`SctEngine.new_volume`) slice by slice as images arrive, echoes in order of echo time, and asks for each slab
with :meth:`SctEngine.run_slab`, which works on a volume that is still filling up: it reads only the slices the
slab's window needs (``SlabPlan.windows[k].needed_slices``). Everything between the raw pixels and the int16 HU
(halo gather, in-plane padding, normalisation, the network, HU scaling, clipping, rounding) happens on the
backend's device; on a GPU only the int16 core slab is copied back, into pinned memory. ``infer_volume`` is the
same path for a volume already in memory (evaluation, packaging).

A model with a ``confidence`` section computes, in the same network pass, a uint8 confidence per voxel (255 = as
typical as its calibration data; below ``confidence.threshold`` = not to be trusted; docs/model.md, Confidence):
``run_slab(..., confidence_out=...)`` writes the core slab's confidence beside its HU, and
``infer_volume_with_confidence`` returns both for a volume in memory. The slab halo covers the confidence's
receptive field as it covers the HU's, so stitched slabs equal a whole-volume pass for it too.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engines.backends.base import BackendInfo, BackendOptions, InferenceBackend
from engines.backends.registry import AUTO, load_backend
from engines.backends.tensorrt import TensorRtBackend
from engines.backends.torch_cuda import TorchCudaBackend, cuda_unavailable_reason
from engines.confidence.spec import CONFIDENCE_MAX, ConfidenceSpec
from engines.inference.device_volume import DeviceVolume
from engines.inference.slabs import SlabPlan, SlabWindow, pad_in_plane, padded_in_plane
from engines.model.manifest import ModelManifest, default_manifest
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

#: Slab depth on a GPU when none is configured. Measured on the lent H200 (fp16, window depth + 2 × 16 halo):
#: the last slab after the last file took 32 / 39 / 45 / 108 ms at depth 8 / 16 / 24 / 56, and the whole volume
#: 515 / 356 / - / 265 ms; 16 brings the last slab within 40 ms without tripling the halo work as 8 does.
GPU_SLAB_DEPTH = 16
#: Backend names that may put the engine on a GPU (``auto`` tries the GPU first).
GPU_BACKENDS = (AUTO, TorchCudaBackend.name, TensorRtBackend.name)

F32 = npt.NDArray[np.float32]
I16 = npt.NDArray[np.int16]
U8 = npt.NDArray[np.uint8]


def default_slab_depth(backend: str, slab_depth: int | None) -> int | None:
    """The slab depth :meth:`SctEngine.load` uses: the configured one, else ``GPU_SLAB_DEPTH`` where the backend
    may run on a GPU and one is present, else None (the manifest's)."""
    if slab_depth is None and backend in GPU_BACKENDS and cuda_unavailable_reason() is None:
        # On a GPU a shorter slab brings the last slab sooner (the halo, which decides exactness, stays).
        return GPU_SLAB_DEPTH
    return slab_depth


class EngineOutOfMemoryError(SctError, RuntimeError):
    """The device ran out of memory computing a slab. The caching allocator's free blocks were released
    before this was raised, so the next slab starts from what the tensors still alive hold."""

    def __init__(self, message: str, *, found: object, expected: str) -> None:
        super().__init__(message, attribute="engine.device_memory", found=found, expected=expected)


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

    @property
    def confidence(self) -> ConfidenceSpec | None:
        """The model's confidence: threshold and region rule (None: the model has none and flags nothing)."""
        return self.manifest.confidence

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
        engine = cls(
            manifest or default_manifest(), backend, options, default_slab_depth(backend, slab_depth)
        )
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

    @property
    def device(self) -> torch.device:
        """Where volumes live and slabs are computed: the backend's device."""
        return next(iter(self._backends.values())).device

    def gpu_memory_allocated(self) -> float:
        """Bytes of GPU memory held by tensors (0 on the CPU); for the metrics scrape."""
        return float(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" else 0.0

    def gpu_memory_reserved(self) -> float:
        """Bytes of GPU memory the caching allocator holds (0 on the CPU)."""
        return float(torch.cuda.memory_reserved(self.device)) if self.device.type == "cuda" else 0.0

    def new_volume(self, n_echoes: int, shape: tuple[int, int, int]) -> DeviceVolume:
        """An empty volume on the engine's device for one acquisition, filled by ``DeviceVolume.put``."""
        return DeviceVolume(n_echoes, shape, self.device)

    def new_output(self, shape: tuple[int, ...]) -> I16:
        """An int16 host array slabs can be copied into directly (pinned memory when the engine is on a GPU)."""
        pinned = self.device.type == "cuda"
        return torch.empty(shape, dtype=torch.int16, pin_memory=pinned).numpy()

    def new_confidence_output(self, shape: tuple[int, ...]) -> U8:
        """A uint8 host array slabs' confidence can be copied into directly (pinned on a GPU), like ``new_output``."""
        pinned = self.device.type == "cuda"
        return torch.empty(shape, dtype=torch.uint8, pin_memory=pinned).numpy()

    def run_slab(
        self,
        volume: DeviceVolume,
        plan: SlabPlan,
        window: SlabWindow,
        scale: float,
        out: I16 | None = None,
        *,
        confidence_out: U8 | None = None,
    ) -> I16:
        """HU of the window's core slices ``[core_start, core_stop)`` as int16, written into ``out`` if given
        (a ``new_output`` array or a slice of one, to spare a copy). With ``confidence_out`` (uint8, the same
        shape; a ``new_confidence_output`` array or a slice of one) and a model with confidence, the core slices'
        confidence from the same pass is written there; a model without confidence refuses it."""
        rows, cols = volume.in_plane
        core = window.core_stop - window.core_start
        if out is None:
            out = self.new_output((core, rows, cols))
        if out.shape != (core, rows, cols) or out.dtype != np.int16:
            raise ValueError(
                f"slab output: found {out.dtype} {out.shape}, expected int16 {(core, rows, cols)}"
            )
        if confidence_out is not None:
            if self.confidence is None:
                raise ValueError(
                    f"confidence output given, but the model {self.manifest.label} has no confidence"
                )
            if confidence_out.shape != (core, rows, cols) or confidence_out.dtype != np.uint8:
                raise ValueError(
                    f"slab confidence output: found {confidence_out.dtype} {confidence_out.shape}, expected uint8 "
                    f"{(core, rows, cols)}"
                )
        backend = self.backend_for((rows, cols))
        try:
            with torch.inference_mode(), backend.stream_context():
                hu, confidence = self._slab_outputs(backend, volume, plan, window, scale)
                torch.from_numpy(out).copy_(torch.round(hu).to(torch.int16), non_blocking=True)
                if confidence_out is not None and confidence is not None:
                    torch.from_numpy(confidence_out).copy_(_confidence_u8(confidence), non_blocking=True)
                backend.synchronize()
            return out
        except torch.OutOfMemoryError as error:
            # Only the text is kept: the exception's traceback holds the frames, and with them the tensors,
            # that the cache is about to give back.
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise self._out_of_memory(backend, reason)

    def _out_of_memory(self, backend: InferenceBackend, reason: str) -> EngineOutOfMemoryError:
        """Free the caching allocator's blocks and describe the failure (device, window, memory held)."""
        device = backend.device
        held = ""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            held = (
                f"; after freeing the cache {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB allocated, "
                f"{torch.cuda.memory_reserved(device) / 2**20:.0f} MiB reserved"
            )
        logger.error("engine %s on %s ran out of memory: %s%s", backend.name, device, reason, held)
        return EngineOutOfMemoryError(
            f"engine {backend.name} {backend.precision.value} on {device} ran out of memory for a slab window "
            f"{'x'.join(map(str, backend.input_shape))} ({reason}){held}",
            found="out of memory",
            expected=f"memory for one window {'x'.join(map(str, backend.input_shape))} on {device}",
        )

    def infer_volume(self, echoes: npt.NDArray[Any]) -> F32:
        """HU of a complete volume in memory (``[echo, slice, row, col]``), slab by slab: what the agent
        publishes, stitched, before rounding to int16."""
        return self._infer(echoes, with_confidence=False)[0]

    def infer_volume_with_confidence(self, echoes: npt.NDArray[Any]) -> tuple[F32, U8]:
        """HU (float32, as ``infer_volume``) and confidence (uint8, as the agent publishes it) of a complete volume
        in memory, from the same slab passes; a model without confidence refuses."""
        if self.confidence is None:
            raise ValueError(f"the model {self.manifest.label} has no confidence section; it computes none")
        hu, confidence = self._infer(echoes, with_confidence=True)
        assert confidence is not None
        return hu, confidence

    def _infer(self, echoes: npt.NDArray[Any], *, with_confidence: bool) -> tuple[F32, U8 | None]:
        self._check_echoes(echoes)
        volume = self.new_volume(echoes.shape[0], echoes.shape[1:])
        for echo in range(echoes.shape[0]):
            for k in range(echoes.shape[1]):
                volume.put(echo, k, echoes[echo, k])
        plan = self.plan(echoes.shape[1])
        scale = self.scale(echoes)
        backend = self.backend_for(volume.in_plane)
        out = np.empty(echoes.shape[1:], dtype=np.float32)
        confidence_out = np.empty(echoes.shape[1:], dtype=np.uint8) if with_confidence else None
        with torch.inference_mode(), backend.stream_context():
            for window in plan.windows:
                hu, confidence = self._slab_outputs(backend, volume, plan, window, scale)
                out[window.core_start : window.core_stop] = hu.cpu().numpy()
                if confidence_out is not None and confidence is not None:
                    confidence_out[window.core_start : window.core_stop] = (
                        _confidence_u8(confidence).cpu().numpy()
                    )
        return out, confidence_out

    def _slab_outputs(
        self,
        backend: InferenceBackend,
        volume: DeviceVolume,
        plan: SlabPlan,
        window: SlabWindow,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """HU (float32, clipped) and raw confidence (None without) of the window's core, on the device."""
        if volume.n_slices != plan.n_slices:
            raise ValueError(f"volume: found {volume.n_slices} slices, the slab plan expects {plan.n_slices}")
        rows, cols = volume.in_plane
        slices, row_index, col_index = self._indices(plan, window, (rows, cols), backend.device)
        volume.wait_for_uploads()
        raw = backend.run_outputs(volume.window(slices, row_index, col_index, scale))
        core = raw[:, plan.halo : plan.halo + (window.core_stop - window.core_start), :rows, :cols]
        low, high = self.manifest.hu_range
        hu = core[0].float().mul_(self.manifest.hu_scale).clamp_(low, high)
        return hu, (core[1] if core.shape[0] > 1 else None)

    def _indices(
        self, plan: SlabPlan, window: SlabWindow, in_plane: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Slice, row and column indices of the window's input (edges repeated), as device tensors."""
        factor = self.manifest.architecture.downsampling_factor
        slices = torch.from_numpy(plan.slice_indices(window)).to(device, non_blocking=True)
        pads: list[torch.Tensor | None] = []
        for n in in_plane:
            padded = padded_in_plane(n, factor)
            pads.append(None if padded == n else torch.clamp(torch.arange(padded), max=n - 1).to(device))
        return slices, pads[0], pads[1]

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()

    def _check_echoes(self, echoes: npt.NDArray[Any]) -> None:
        expected = self.manifest.architecture.in_channels
        if echoes.ndim != 4 or echoes.shape[0] != expected:
            raise ValueError(
                f"echoes: found shape {echoes.shape}, expected [{expected} echoes, slices, rows, columns]"
            )


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
    return whole_volume_outputs(manifest, echoes)[0]


def whole_volume_outputs(manifest: ModelManifest, echoes: npt.NDArray[Any]) -> tuple[F32, U8 | None]:
    """HU and (for a model with confidence) uint8 confidence of one fp32 eager pass over the whole padded volume."""
    plan = SlabPlan.for_volume(echoes.shape[1], manifest.slab.depth, manifest.slab.halo)
    rows, cols = echoes.shape[-2:]
    x = network_input(manifest, echoes, plan.reference_indices(), manifest.normalisation.scale(echoes))
    with torch.inference_mode():
        raw = manifest.build_model()(torch.from_numpy(x)[None])[0]
    core = raw[:, plan.halo : plan.halo + plan.n_slices, :rows, :cols]
    hu = to_hu(manifest, core[0].numpy())
    confidence = _confidence_u8(core[1]).numpy() if core.shape[0] > 1 else None
    return hu, confidence


def _confidence_u8(raw: torch.Tensor) -> torch.Tensor:
    """The network's confidence channel (0..255, float) as the uint8 the agent publishes."""
    return torch.round(raw.float()).clamp_(0, CONFIDENCE_MAX).to(torch.uint8)
