"""PyTorch on an NVIDIA GPU: fp16, channels_last_3d, compiled by inductor with autotuning, on its own stream.

Measured on the lent H200 with the shipped model (docs/gpu.md; window 2×88×344×344): fp32 eager 61.6 ms per slab,
fp16 channels_last_3d eager 17.7 ms, fp16 ``torch.compile(mode="max-autotune-no-cudagraphs")`` 9.0 ms after a 65 s
compile. fp16 agrees with the fp32 CPU reference to 0.11 HU mean (max 3.1 HU); bf16 is worse (0.67, max 24) and no
faster, so fp16 is the default.

What restarts fastest there: AOTInductor packages crashed (SIGSEGV) on that GPU stack, while inductor's on-disk
caches brought a second process to ready in 10.6 s instead of 72.6 s. So the "engine" of this backend is an
inductor cache folder under the engine key (GPU, driver, CUDA, torch, weights, window, precision); acceptance
against the fp32 reference runs at every start, which on the GPU costs one slab.

CUDA graphs: inductor's ``max-autotune`` mode records them per thread, and the agent loads the engine on its
main thread but runs slabs on the engine thread, so this backend uses the no-cudagraphs mode; at 9 ms of kernels
per slab the launch overhead CUDA graphs would save is small.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from engines.backends.base import BackendUnavailableError, Precision
from engines.backends.cached_backend import CachedEngineBackend

COMPILE_MODE = "max-autotune-no-cudagraphs"
_DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}


def cuda_unavailable_reason() -> str | None:
    """Why there is no usable CUDA device (None when there is one), in one line."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return f"no CUDA GPU is visible (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return None


class OwnCudaStream(CachedEngineBackend):
    """A GPU backend on a CUDA stream of its own, so slice uploads on the volume's stream overlap its kernels."""

    _stream: Any = None

    def _claim_gpu(self) -> None:
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"{self.name}: {reason}", found="no GPU", expected="a CUDA GPU")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    def stream_context(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()


class TorchCudaBackend(OwnCudaStream):
    name = "torch-cuda"
    artefact = "inductor"
    hashed = False
    default_precision = Precision.FP16

    _compiled: Any = None

    def _require(self) -> None:
        self._claim_gpu()

    def _build(self, path: Path) -> None:
        # The engine is inductor's cache, filled by the compile that ``_load`` (called next) runs.
        path.mkdir(parents=True, exist_ok=True)

    def _load(self, path: Path) -> None:
        # Inductor reads its cache folder from the environment when it compiles; the FX graph and autotuning
        # caches there are what make the second start fast.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        dtype = _DTYPES[self.precision]
        model = self.manifest.build_model().to(self.device, dtype=dtype)
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self._compiled = torch.compile(model, mode=COMPILE_MODE, dynamic=False)
        with torch.inference_mode(), self.stream_context():
            self._run(torch.zeros(self.input_shape, dtype=torch.float32, device=self.device))
        self.synchronize()

    def _after_commit(self, path: Path) -> None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)

    def _run(self, window: torch.Tensor) -> torch.Tensor:
        x = window[None].to(_DTYPES[self.precision]).contiguous(memory_format=torch.channels_last_3d)
        return self._compiled(x)[0]  # type: ignore[no-any-return]

    def _details(self) -> dict[str, Any]:
        return {
            **super()._details(),
            "gpu": torch.cuda.get_device_name(self.device),
            "compile_mode": COMPILE_MODE,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
