"""ONNX Runtime on the CPU from an ONNX file exported once per (weights hash, window shape) and cached.

Kept as the portable path (ARM boxes, sites that standardise on ONNX) and as the yardstick the issue names; on our
CPU it is slower than the optimised PyTorch path and needs more memory (docs/model.md).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.backends.base import BackendUnavailableError, InferenceBackend, Precision

logger = logging.getLogger(__name__)

OPSET = 18
#: The exporter's optimiser passes log every rewrite at INFO; the agent's log is for operators.
_NOISY_EXPORT_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def _prepare(self) -> None:
        if self.precision is not Precision.FP32:
            raise ValueError(f"{self.name} runs fp32 only; found precision {self.precision.value}")
        try:
            import onnxruntime as ort  # noqa: PLC0415 - optional dependency, imported when chosen
        except ImportError as exc:
            raise BackendUnavailableError(
                f"{self.name}: onnxruntime is not installed (pip install 'sct-edge-agent[onnx]')"
            ) from exc
        path = self._export()
        session_options = ort.SessionOptions()
        if self.options.threads:
            session_options.intra_op_num_threads = self.options.threads
            session_options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(path), sess_options=session_options, providers=["CPUExecutionProvider"]
        )
        self._input_name = self._session.get_inputs()[0].name
        self._path = path

    def _export(self) -> Path:
        cache = self.options.cache_dir or Path(tempfile.gettempdir()) / "sct-edge-agent"
        shape = "x".join(map(str, self.input_shape))
        # The file is the network and its confidence head: named by both hashes.
        model_hash = self.manifest.weights_sha256[:16] + (
            f"-c{self.manifest.confidence_sha256[:16]}" if self.manifest.confidence_sha256 else ""
        )
        path = cache / "onnx" / f"{model_hash}-{shape}-opset{OPSET}.onnx"
        if path.exists():
            return path
        try:
            import onnxscript  # noqa: F401, PLC0415 - the dynamo exporter needs it
        except ImportError as exc:
            raise BackendUnavailableError(
                f"{self.name}: exporting needs onnxscript (pip install 'sct-edge-agent[onnx]')"
            ) from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        model = self.manifest.build_model()
        example = torch.zeros((1, *self.input_shape))
        tmp = path.with_suffix(".tmp.onnx")
        with warnings.catch_warnings():
            # The exporter warns about pytree internals and missing torchvision; neither concerns this model.
            warnings.simplefilter("ignore")
            for name in _NOISY_EXPORT_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, verbose=False)
            assert program is not None
            program.save(str(tmp))
        tmp.replace(path)
        logger.info("exported %s to %s", self.manifest.label, path)
        return path

    def _run(self, window: torch.Tensor) -> torch.Tensor:
        host = np.ascontiguousarray(window.cpu().numpy(), dtype=np.float32)
        (out,) = self._session.run(None, {self._input_name: host[None]})
        return torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.float32)[0]))

    def _details(self) -> dict[str, Any]:
        import onnxruntime as ort  # noqa: PLC0415

        return {"onnxruntime": ort.__version__, "onnx_file": str(self._path)}
