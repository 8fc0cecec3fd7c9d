"""The backend interface the slab runner talks to; CPU, CUDA and TensorRT backends plug in here.

A backend knows nothing about DICOM, slabs or HU: it takes a normalised window ``[echoes, depth, rows, cols]``
(float32) and returns the network output ``[outputs, depth, rows, cols]``: HU / hu_scale, and for a model with a
confidence section its confidence (0..255) as a second channel of the same pass. Shapes are static per backend
instance because compiled and TensorRT engines are; a window of another shape is refused with both shapes in the
message rather than silently recompiled in the middle of a patient's series.

The primary entry is :meth:`InferenceBackend.run_outputs` on torch tensors that already live on the backend's
``device``, so the slab path can keep a volume on the GPU and copy back only the int16 result (:meth:`run` is its
HU channel); :meth:`infer` and :meth:`infer_outputs` are the numpy conveniences for offline callers. A backend that computes elsewhere (ONNX Runtime) converts inside ``_run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import torch

from engines.backends.remote_link import RemoteLink
from engines.model.manifest import ModelManifest
from sct_core.errors import SctError

F32 = npt.NDArray[np.float32]


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class BackendUnavailableError(SctError, RuntimeError):
    """The backend's libraries or device are not present on this machine (e.g. TensorRT without a GPU)."""

    def __init__(
        self, message: str, *, attribute: str = "engine.backend", found: object = None, expected: str = ""
    ) -> None:
        super().__init__(message, attribute=attribute, found=found, expected=expected)


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """Settings common to all backends."""

    #: Intra-op threads for CPU backends; None = torch's default (all cores).
    threads: int | None = None
    #: None = the backend's own default (fp32 on the CPU, fp16 on a GPU); ``auto`` sets it explicitly.
    precision: Precision | None = None
    #: Where exported/compiled artefacts are cached (ONNX files, inductor cache, TensorRT engines).
    cache_dir: Path | None = None
    #: Told ``(step, fraction done)`` while an engine is built (``sct-agent engine build`` draws a bar).
    progress: Callable[[str, float], None] | None = None
    #: The link to a remote server, for the ``triton`` backend (engines.backends.remote_link); ignored by others.
    remote: RemoteLink | None = None


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What is running, for logs, metrics (engine info gauge) and the published header."""

    backend: str
    device: str
    precision: str
    input_shape: tuple[int, ...]
    model_id: str
    model_version: str
    weights_sha256: str
    warmup_s: float
    details: dict[str, Any] = field(default_factory=dict)


class InferenceBackend(ABC):
    """One loaded, warmed-up model for one static window shape."""

    name: ClassVar[str]
    #: True where ``_prepare`` already ran full windows (acceptance), so ``load`` skips the warm-up.
    warmed_by_prepare: ClassVar[bool] = False
    #: Precision when the options name none.
    default_precision: ClassVar[Precision] = Precision.FP32

    def __init__(
        self, manifest: ModelManifest, input_shape: tuple[int, int, int, int], options: BackendOptions
    ):
        if input_shape[0] != manifest.architecture.in_channels:
            raise ValueError(
                f"input channels: found {input_shape[0]}, model {manifest.label} expects "
                f"{manifest.architecture.in_channels} (one per echo)"
            )
        factor = manifest.architecture.downsampling_factor
        if any(n % factor for n in input_shape[1:]):
            raise ValueError(f"window shape {input_shape[1:]} must be multiples of {factor} on every axis")
        self.manifest = manifest
        self.input_shape = input_shape
        self.options = dataclasses.replace(options, precision=options.precision or self.default_precision)
        #: Where ``run`` expects its window and leaves its output; GPU backends set their CUDA device.
        self.device = torch.device("cpu")
        #: Why ``auto`` passed over faster backends before this one, one line each (empty when chosen by name).
        self.passed_over: list[str] = []
        self._warmup_s = 0.0

    @classmethod
    def load(
        cls, manifest: ModelManifest, input_shape: tuple[int, int, int, int], options: BackendOptions
    ) -> Self:
        """Build the backend and run one warm-up inference (compilation happens here, not on the first slab)."""
        backend = cls(manifest, input_shape, options)
        started = time.perf_counter()
        try:
            backend._prepare()
            if not backend.warmed_by_prepare:
                with torch.inference_mode(), backend.stream_context():
                    backend.run(torch.zeros(input_shape, dtype=torch.float32, device=backend.device))
                backend.synchronize()
        except BaseException:
            backend.close()  # a worker process or device memory taken before the failure
            raise
        backend._warmup_s = time.perf_counter() - started
        return backend

    def infer(self, window: F32) -> F32:
        """The HU channel ``[depth, rows, cols]``, numpy in and out (host memory), for offline callers."""
        return np.ascontiguousarray(self.infer_outputs(window)[0])

    def infer_outputs(self, window: F32) -> F32:
        """Every output channel ``[outputs, depth, rows, cols]``, numpy in and out (host memory)."""
        tensor = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))
        with torch.inference_mode(), self.stream_context():
            out = self.run_outputs(tensor.to(self.device))
            result = out.float().cpu().numpy()
        return np.ascontiguousarray(result)

    @property
    def outputs(self) -> int:
        """Output channels: 1 (HU), or 2 (HU and confidence) for a model with a confidence section."""
        return self.manifest.network_outputs

    def run(self, window: torch.Tensor) -> torch.Tensor:
        """The HU channel of :meth:`run_outputs`: ``[depth, rows, cols]`` (HU / hu_scale)."""
        return self.run_outputs(window)[0]

    def run_outputs(self, window: torch.Tensor) -> torch.Tensor:
        """Network output ``[outputs, depth, rows, cols]`` on ``device`` for a float32 window on ``device``.

        Call inside ``torch.inference_mode()`` and :meth:`stream_context`; the result may be a view of a buffer
        the backend reuses on its next call, so take what you need from it first.
        """
        if tuple(window.shape) != self.input_shape:
            raise ValueError(
                f"slab window shape {tuple(window.shape)} differs from the shape {self.input_shape} this "
                f"{self.name} backend was built for"
            )
        out = self._run(window)
        if out.shape[0] != self.outputs:
            raise ValueError(
                f"{self.name}: the network returned {out.shape[0]} output channels, the model "
                f"{self.manifest.label} has {self.outputs}"
            )
        return out

    def stream_context(self) -> contextlib.AbstractContextManager[object]:
        """The CUDA stream the backend computes on (its own, so uploads on another stream overlap it)."""
        return contextlib.nullcontext()

    def synchronize(self) -> None:  # noqa: B027 - optional hook
        """Wait for work queued on the backend's stream; CPU backends finish inside ``run``."""

    @property
    def precision(self) -> Precision:
        """The precision this backend runs at (the options', or its default)."""
        assert self.options.precision is not None  # resolved in __init__
        return self.options.precision

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            backend=self.name,
            device=self._device(),
            precision=self.precision.value,
            input_shape=self.input_shape,
            model_id=self.manifest.model_id,
            model_version=self.manifest.version,
            weights_sha256=self.manifest.weights_sha256,
            warmup_s=round(self._warmup_s, 3),
            details={**self._details(), **({"passed_over": self.passed_over} if self.passed_over else {})},
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory or sessions; the default has nothing to release."""

    @abstractmethod
    def _prepare(self) -> None: ...

    @abstractmethod
    def _run(self, window: torch.Tensor) -> torch.Tensor:
        """Every output channel ``[outputs, depth, rows, cols]`` for one window."""

    def _device(self) -> str:
        return str(self.device)

    def _details(self) -> dict[str, Any]:
        return {}
