"""An AOTInductor package on the CPU: the model compiled ahead of time into one file that loads in a second.

Why: ``torch.compile`` redoes its work at every start (30 to 50 s for the lumbar window on our 2 cores), while a
package built once by ``sct-agent engine build`` (or the first start) loads in about a second and is then trusted
through acceptance like any compiled engine. Per slab it is as fast as ``torch-optimised`` fp32 (bench/engine.py).
fp32 only: packages built under fp16 or bf16 autocast compiled, but ran a 24×64×64 window in 30 s and more on our
CPUs (against 0.05 s eager), so reduced precision stays with ``torch-optimised``. AOTInductor packages crashed on
the lent GPU's stack, so the CUDA path keeps inductor's own on-disk cache instead (``torch_cuda``).

The package is compiled in a child process and runs in a worker process (``aot_worker``): the compiler and the
package's runner hold Python's GIL for seconds at a time (a whole slab, for the runner), which in the agent's
process stopped the watcher and the verdicts. A build happens at the first start or for a new window shape
while the agent serves other series, so it must not stall them either.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from engines.backends.aot_worker import STDERR_FD, AotWorker, EngineWorkerError
from engines.backends.base import BackendUnavailableError, Precision
from engines.backends.cached_backend import CachedEngineBackend
from engines.model.manifest import ModelManifest


class TorchAotBackend(CachedEngineBackend):
    """fp32, channels_last_3d, frozen weights, compiled by AOTInductor into ``engine.pt2``, run by a worker."""

    name = "torch-aot"
    artefact = "engine.pt2"

    _worker: AotWorker | None = None

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
        command = [
            sys.executable,
            "-m",
            __name__,
            "--model",
            str(self.manifest.folder),
            "--weights-sha256",
            self.manifest.weights_sha256,
            "--confidence-sha256",
            self.manifest.confidence_sha256,
            "--window",
            ",".join(str(n) for n in self.input_shape),
            "--threads",
            str(self.options.threads or 0),
            "--out",
            str(path),
        ]
        # The wait releases the GIL; the child's own messages go to the same stderr (the journal).
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=STDERR_FD, check=False)
        if completed.returncode != 0 or not path.is_file():
            raise BackendUnavailableError(
                f"{self.name}: compiling the package for window {self.input_shape} failed (compiler exit "
                f"status {completed.returncode}; its messages are in the log above)",
                found=completed.returncode,
                expected="exit status 0 and a package file",
            )

    def _load(self, path: Path) -> None:
        self.close()
        worker = AotWorker(path, self.input_shape, self.options.threads, self.outputs)
        try:
            worker.start()
        except EngineWorkerError as error:
            worker.close()
            raise BackendUnavailableError(
                f"{self.name}: {error}", attribute=error.attribute, found=error.found, expected=error.expected
            ) from error
        self._worker = worker

    def _run(self, window: torch.Tensor) -> torch.Tensor:
        assert self._worker is not None, "run before load"
        return self._worker.run(window)

    def _after_commit(self, path: Path) -> None:
        # The package moved from its scratch folder: a worker started again after a fault loads it from here.
        if self._worker is not None:
            self._worker.package = path

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    def _details(self) -> dict[str, Any]:
        details = {**super()._details(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        if self._worker is not None:
            details["worker"] = {
                "pid": self._worker.pid,
                "ready_s": round(self._worker.ready_s, 3),
                "starts": self._worker.starts,
            }
        return details


def compile_package(manifest: ModelManifest, input_shape: tuple[int, ...], path: Path) -> None:
    """Export the model for one static window and compile it into an AOTInductor package at ``path``."""
    model = manifest.build_model().to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    example = torch.zeros((1, *input_shape), dtype=torch.float32).to(memory_format=torch.channels_last_3d)
    with warnings.catch_warnings():
        # torch's own pytree code warns about its own deprecated LeafSpec while exporting.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
        program = torch.export.export(model, (example,))
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"freezing": True}
        )


def main(argv: list[str] | None = None) -> int:
    """The compiler's child process: ``python -m engines.backends.aot_inductor`` (run by ``_build`` only)."""
    parser = argparse.ArgumentParser(description="Compile a model folder into an AOTInductor package.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--weights-sha256", required=True)
    parser.add_argument("--confidence-sha256", default="")
    parser.add_argument("--window", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    manifest = ModelManifest.load(args.model)
    if manifest.weights_sha256 != args.weights_sha256:
        print(
            f"engine build: weights.sha256 found {manifest.weights_sha256}, expected {args.weights_sha256}",
            file=sys.stderr,
        )
        return 1
    if manifest.confidence_sha256 != args.confidence_sha256:
        print(
            f"engine build: confidence statistics sha256 found {manifest.confidence_sha256!r}, "
            f"expected {args.confidence_sha256!r}",
            file=sys.stderr,
        )
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_package(manifest, tuple(int(n) for n in args.window.split(",")), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
