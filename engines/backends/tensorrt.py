"""TensorRT through torch-tensorrt's dynamo path: a static-shape fp16 engine, saved as an ExportedProgram.

Written against torch-tensorrt 2.13.0 (the version the ``tensorrt`` extra pins, matching torch 2.13):
``torch_tensorrt.compile(module, ir="dynamo", arg_inputs=[example])`` builds the engine,
``torch_tensorrt.save(module, path, output_format="exported_program", arg_inputs=[example])`` serialises it and
``torch_tensorrt.load(path).module()`` loads it back. In 2.13 the dynamo path builds strongly typed networks, so
fp16 is chosen by converting the model and its input to half (``enabled_precisions`` is read only by the legacy
frontends).

torch-tensorrt is imported only when this backend is chosen: where it (or a GPU) is absent the backend says so
in one line and ``auto`` moves on. TensorRT's libraries are too large to carry to the GPU we are lent, so this
path has not run there; everything around it (key, cache, acceptance, fallback) is the shared, tested code of
``cached_backend``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engines.backends.base import BackendUnavailableError, Precision
from engines.backends.torch_cuda import OwnCudaStream

_DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16}


def import_torch_tensorrt() -> Any:
    """The torch_tensorrt module, or :class:`BackendUnavailableError` saying in one line why not."""
    try:
        import torch_tensorrt  # noqa: PLC0415 - optional, GPU machines only
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailableError(
            f"tensorrt: torch-tensorrt is not importable ({first_line}); install the 'tensorrt' extra on a GPU box",
            found="not importable",
            expected="torch-tensorrt 2.13 with TensorRT 11.0",
        ) from None
    return torch_tensorrt


class TensorRtBackend(OwnCudaStream):
    name = "tensorrt"
    artefact = "engine.ep"
    default_precision = Precision.FP16

    _trt: Any = None
    _module: Any = None

    def _require(self) -> None:
        if self.precision not in _DTYPES:
            raise BackendUnavailableError(
                f"{self.name}: precision {self.precision.value} is not offered; use fp16 or fp32",
                found=self.precision.value,
                expected="fp16 or fp32",
            )
        self._trt = import_torch_tensorrt()
        self._claim_gpu()

    def _compiler_version(self) -> str:
        version = getattr(self._trt, "__version__", "?")
        try:
            import tensorrt  # noqa: PLC0415

            return f"torch-tensorrt {version}, TensorRT {tensorrt.__version__}"
        except ImportError:
            return f"torch-tensorrt {version}"

    def _example(self) -> torch.Tensor:
        dtype = _DTYPES[self.precision]
        return torch.zeros((1, *self.input_shape), dtype=dtype, device=self.device)

    def _build(self, path: Path) -> None:
        dtype = _DTYPES[self.precision]
        model = self.manifest.build_model().to(self.device, dtype=dtype)
        example = self._example()
        compiled = self._trt.compile(model, ir="dynamo", arg_inputs=[example])
        self._trt.save(compiled, str(path), output_format="exported_program", arg_inputs=[example])

    def _load(self, path: Path) -> None:
        self._module = self._trt.load(str(path)).module()

    def _run(self, window: torch.Tensor) -> torch.Tensor:
        out = self._module(window[None].to(_DTYPES[self.precision]))
        result = out[0] if isinstance(out, list | tuple) else out
        return result[0]  # type: ignore[no-any-return]

    def _details(self) -> dict[str, Any]:
        return {
            **super()._details(),
            "compiler": self._compiler_version(),
            "gpu": torch.cuda.get_device_name(self.device),
        }
