"""PyTorch on the CPU: fp32 eager (the reference every other backend is compared with) and an optimised path.

The optimised path stacks what measured fastest on our 2-core box (docs/model.md): channels_last_3d memory
format (oneDNN's blocked kernels), ``torch.compile`` with freezing (weights folded as constants, BatchNorm into
the convolutions), and fp16 or bf16 autocast where the CPU executes them natively.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from engines.backends.base import BackendUnavailableError, InferenceBackend, Precision
from engines.backends.cpu_features import native_precisions

_AUTOCAST = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}


class _TorchCpuBackend(InferenceBackend):
    _model: nn.Module

    def _set_threads(self) -> None:
        if self.options.threads:
            torch.set_num_threads(self.options.threads)

    def _forward(self, module: Any, window: torch.Tensor, *, channels_last: bool) -> torch.Tensor:
        x = window[None]
        if channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        precision = self.precision
        with torch.autocast(
            "cpu", dtype=_AUTOCAST.get(precision, torch.float32), enabled=precision in _AUTOCAST
        ):
            out = module(x)
        result: torch.Tensor = out[0].float()
        return result

    def _details(self) -> dict[str, Any]:
        return {"threads": torch.get_num_threads(), "torch": torch.__version__}


class TorchEagerBackend(_TorchCpuBackend):
    """fp32, NCDHW, no compilation: slow but exactly the trained model; the accuracy reference."""

    name = "torch-eager"

    def _prepare(self) -> None:
        if self.precision is not Precision.FP32:
            raise ValueError(f"{self.name} runs fp32 only; found precision {self.precision.value}")
        self._set_threads()
        self._model = self.manifest.build_model()

    def _run(self, window: torch.Tensor) -> torch.Tensor:
        return self._forward(self._model, window, channels_last=False)


class TorchOptimisedBackend(_TorchCpuBackend):
    """channels_last_3d + ``torch.compile(freezing)`` + autocast at the configured precision."""

    name = "torch-optimised"

    def _prepare(self) -> None:
        precision = self.precision
        if precision not in native_precisions():
            raise BackendUnavailableError(
                f"{self.name}: precision {precision.value} is not native on this CPU "
                f"(native: {', '.join(p.value for p in native_precisions())}); emulated it is slower than fp32"
            )
        self._set_threads()
        if self.options.cache_dir is not None:
            cache = self.options.cache_dir / "inductor"
            cache.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
        model = self.manifest.build_model().to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self._model = torch.compile(model, dynamic=False, options={"freezing": True})  # type: ignore[assignment]

    def _run(self, window: torch.Tensor) -> torch.Tensor:
        return self._forward(self._model, window, channels_last=True)
