"""An AOTInductor package on the CPU: the model compiled ahead of time into one file that loads in a second.

Why: ``torch.compile`` redoes its work at every start (tens of seconds on our CPUs), while a package built once by
``sct-agent engine build`` loads in well under a second and is then checked by acceptance like any compiled
engine. fp32 only: packages built under fp16 or bf16 autocast compiled, but ran a 24×64×64 window in 30 s and
more on our CPUs (against 0.05 s eager), so reduced precision stays with ``torch-optimised``. AOTInductor packages
crashed on the lent GPU's stack, so the CUDA path keeps inductor's own on-disk cache instead (``torch_cuda``).

Not for the agent: the package's runner holds Python's GIL for the whole inference. Measured on our 2 cores with
the lumbar window, a thread ticking every 10 ms ticked once during an 11.5 s slab; in the demo the assembler then
saw no file for longer than its quiet period and ended the acquisition early. So ``holds_gil`` is set, the
agent's configuration refuses this backend, and it serves offline work (``sct-agent evaluate``, benchmarks) and
proves the compiled-engine cache on the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from engines.backends.base import BackendUnavailableError, Precision
from engines.backends.cached_backend import CachedEngineBackend


class TorchAotBackend(CachedEngineBackend):
    """fp32, channels_last_3d, frozen weights, compiled by AOTInductor into ``engine.pt2``."""

    name = "torch-aot"
    artefact = "engine.pt2"
    holds_gil = True

    _runner: Any = None

    def _require(self) -> None:
        if self.precision is not Precision.FP32:
            raise BackendUnavailableError(
                f"{self.name}: precision {self.precision.value} is not offered (autocast packages run "
                f"hundreds of times slower than eager on the CPU); use fp32 or torch-optimised",
                found=self.precision.value,
                expected="fp32",
            )
        if self.options.threads:
            torch.set_num_threads(self.options.threads)

    def _build(self, path: Path) -> None:
        model = self.manifest.build_model().to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        example = torch.zeros((1, *self.input_shape), dtype=torch.float32).to(
            memory_format=torch.channels_last_3d
        )
        with warnings.catch_warnings():
            # torch's own pytree code warns about its own deprecated LeafSpec while exporting.
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
            program = torch.export.export(model, (example,))
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs={"freezing": True}
            )

    def _load(self, path: Path) -> None:
        self._runner = torch._inductor.aoti_load_package(str(path))

    def _run(self, window: torch.Tensor) -> torch.Tensor:
        x = window[None].contiguous(memory_format=torch.channels_last_3d)
        out = self._runner(x)
        result = out[0] if isinstance(out, list | tuple) else out
        hu: torch.Tensor = result[0, 0].float()
        return hu

    def _details(self) -> dict[str, Any]:
        return {**super()._details(), "threads": torch.get_num_threads(), "torch": torch.__version__}
