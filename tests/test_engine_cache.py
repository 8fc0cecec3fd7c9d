"""Compiled engines are built once, cached under their key, accepted against fp32 eager, and refused (then
rebuilt) when their file is altered, when their key names another machine, or when they fail acceptance.

A real AOTInductor package on the CPU stands for every cached engine: TensorRT and CUDA engines go through the
same ``CachedEngineBackend`` flow, with only their build and load steps differing. ``auto``'s choices and its
one-line reasons for passing over the GPU backends are checked on this GPU-less machine.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.backends.acceptance import acceptance_sample
from engines.backends.aot_inductor import TorchAotBackend
from engines.backends.base import BackendOptions, BackendUnavailableError
from engines.backends.engine_cache import RECORD_NAME
from engines.backends.registry import AUTO, load_backend, resolve_auto
from engines.backends.tensorrt import TensorRtBackend, import_torch_tensorrt
from engines.backends.torch_cuda import TorchCudaBackend
from engines.model.manifest import ModelManifest

#: A window small enough to compile in well under a minute on two cores.
WINDOW = (2, 24, 64, 64)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory, shipped_manifest: ModelManifest) -> Path:
    """A cache folder holding one accepted AOTInductor engine (and the stored acceptance sample)."""
    cache = tmp_path_factory.mktemp("engine-cache")
    backend = TorchAotBackend.load(shipped_manifest, WINDOW, BackendOptions(threads=2, cache_dir=cache))
    assert backend.origin == "built" and backend.refusals == []
    return cache


def copy_of(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the built cache and its engine folder."""
    target = tmp_path / "cache"
    shutil.copytree(cache, target)
    (folder,) = (target / "engines").iterdir()
    return target, folder


def test_an_engine_is_built_once_then_loaded_from_the_cache_and_accepted(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path
) -> None:
    cache, folder = copy_of(built_cache, tmp_path)
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["key"]["backend"] == "torch-aot" and record["key"]["window"] == list(WINDOW)
    assert record["key"]["model_sha256"] == shipped_manifest.weights_sha256
    assert record["acceptance"]["passed"] is True
    assert record["acceptance"]["mean_abs_hu"] <= shipped_manifest.backend_tolerance_hu
    assert len(record["sha256"]) == 64 and record["build_s"] > 0

    progress: list[tuple[str, float]] = []
    backend = TorchAotBackend.load(
        shipped_manifest,
        WINDOW,
        BackendOptions(threads=2, cache_dir=cache, progress=lambda s, f: progress.append((s, f))),
    )
    assert backend.origin == "cached" and backend.refusals == []
    assert backend.info.details["acceptance"]["passed"] is True
    assert progress[-1] == ("torch-aot fp32: ready", 1.0)
    assert not any("compiling" in step for step, _ in progress)
    # The cached engine computes what the model computes: the stored sample against its fp32 reference.
    sample = acceptance_sample(shipped_manifest, WINDOW, cache)
    delta = np.abs(backend.infer(sample.window) - sample.reference) * shipped_manifest.hu_scale
    assert float(delta.max()) < 0.5
    assert float(np.abs(sample.reference).max()) > 0.1  # a real phantom window, not zeros


def test_an_altered_engine_file_is_refused_and_rebuilt(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path
) -> None:
    cache, folder = copy_of(built_cache, tmp_path)
    with (folder / TorchAotBackend.artefact).open("ab") as handle:
        handle.write(b"\0")
    backend = TorchAotBackend.load(shipped_manifest, WINDOW, BackendOptions(threads=2, cache_dir=cache))
    assert backend.origin == "built"
    (refusal,) = backend.refusals
    assert "engine.pt2 sha256 found" in refusal and "(the file was altered after it was built)" in refusal
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["acceptance"]["passed"] is True


def test_an_engine_built_for_another_machine_is_refused_and_rebuilt(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path
) -> None:
    cache, folder = copy_of(built_cache, tmp_path)
    record = json.loads((folder / RECORD_NAME).read_text())
    ours = record["key"]["device"]
    record["key"].update(device="NVIDIA H200", compute_capability="9.0")
    (folder / RECORD_NAME).write_text(json.dumps(record))
    backend = TorchAotBackend.load(shipped_manifest, WINDOW, BackendOptions(threads=2, cache_dir=cache))
    assert backend.origin == "built"
    (refusal,) = backend.refusals
    assert "was built for another configuration" in refusal
    assert f"device: found 'NVIDIA H200', expected {ours!r}" in refusal
    assert "compute_capability: found '9.0', expected ''" in refusal
    assert json.loads((folder / RECORD_NAME).read_text())["key"]["device"] == ours


def test_an_engine_that_fails_acceptance_is_refused_and_the_backend_is_unavailable(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path
) -> None:
    """A model whose tolerance no engine can meet: the cached engine is refused, and so is the rebuilt one."""
    cache, folder = copy_of(built_cache, tmp_path)
    strict = dataclasses.replace(shipped_manifest, backend_tolerance_hu=-1.0)
    with pytest.raises(
        BackendUnavailableError, match=r"the engine just built failed acceptance: mean \|ΔHU\|"
    ) as info:
        TorchAotBackend.load(strict, WINDOW, BackendOptions(threads=2, cache_dir=cache))
    assert info.value.attribute == "engine.backend"
    assert not folder.exists()  # the refused engine is gone, none half-written took its place
    assert not [p for p in (cache / "engines").iterdir() if p.name.startswith(".")]


def test_auto_passes_over_the_gpu_backends_in_one_line_each(
    shipped_manifest: ModelManifest, tmp_path: Path
) -> None:
    backend = load_backend(AUTO, shipped_manifest, WINDOW, BackendOptions(threads=2, cache_dir=tmp_path))
    name, precision, _ = resolve_auto(shipped_manifest)
    assert (backend.info.backend, backend.info.precision) == (name, precision.value)
    trt, cuda = backend.info.details["passed_over"]
    assert trt.startswith("tensorrt: torch-tensorrt is not importable (No module named 'torch_tensorrt')")
    assert cuda.startswith("torch-cuda: this torch (") and "CPU-only build" in cuda
    assert all("\n" not in line for line in (trt, cuda))


def test_tensorrt_that_cannot_find_its_libraries_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shipped_manifest: ModelManifest
) -> None:
    """torch-tensorrt installed without TensorRT's libraries raises a plain Exception at import (seen on our
    machines with the 2.13.0 wheel); the backend reports its first line and auto moves on."""
    package = tmp_path / "torch_tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise Exception('import error when try to import _TensorRTProxyModule, got error Could not find "
        "libnvinfer.so.11  Search paths: [\\'/usr/local/cuda-13.2/lib64\\']\\nsecond line')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_tensorrt", raising=False)
    with pytest.raises(BackendUnavailableError, match=r"libnvinfer\.so\.11") as info:
        import_torch_tensorrt()
    assert "second line" not in str(info.value)
    with pytest.raises(BackendUnavailableError, match="tensorrt: torch-tensorrt is not importable"):
        TensorRtBackend.load(shipped_manifest, WINDOW, BackendOptions(cache_dir=tmp_path))
    with pytest.raises(BackendUnavailableError, match=r"torch-cuda: this torch .* is a CPU-only build"):
        TorchCudaBackend.load(shipped_manifest, WINDOW, BackendOptions(cache_dir=tmp_path))
