"""Compiled engines are built once, cached under their key, accepted against fp32 eager, and refused (then
rebuilt) when their file is altered, when their key names another machine, or when they fail acceptance.

A real AOTInductor package on the CPU stands for every cached engine: TensorRT and CUDA engines go through the
same ``CachedEngineBackend`` flow, with only their build and load steps differing. ``auto``'s choices and its
one-line reasons for passing over the GPU backends are checked on this GPU-less machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engines.backends.acceptance import AcceptanceSample, acceptance_sample
from engines.backends.aot_inductor import TorchAotBackend
from engines.backends.aot_worker import EngineWorkerError
from engines.backends.base import BackendOptions, BackendUnavailableError
from engines.backends.cached_backend import ACCEPTED, MISSING, REFUSED
from engines.backends.engine_cache import RECORD_NAME
from engines.backends.registry import AUTO, inspect_engine, load_backend, resolve_auto
from engines.backends.tensorrt import TensorRtBackend, import_torch_tensorrt
from engines.backends.torch_cpu import TorchEagerBackend
from engines.backends.torch_cuda import TorchCudaBackend
from engines.inference.engine import SctEngine
from engines.model.manifest import ModelManifest
from engines.phantom.case import PhantomCase

#: A window small enough to compile in well under a minute on two cores: slabs of 8 with the model's 16-slice
#: halos, so an engine on a 64 x 64 crop runs slabs through this cached package.
SLAB_DEPTH = 8
IN_PLANE = (64, 64)
WINDOW = (2, 40, *IN_PLANE)
#: The GIL test: a ticker's period, how many windows it watches, and how many ticks each window must allow
#: (a window of WINDOW takes about 0.25 s on our 2 cores: over twenty periods).
TICK_S = 0.01
WINDOWS = 5
MIN_TICKS_PER_WINDOW = 4
#: fp32 package against fp32 eager, both rounded to whole HU.
STREAMED_AGREEMENT_HU = 1.0
#: Long enough for the request to reach the stopped worker before it is killed.
KILL_AFTER_S = 0.5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory, shipped_manifest: ModelManifest) -> Path:
    """A cache folder holding one accepted AOTInductor engine (and the stored acceptance sample)."""
    cache = tmp_path_factory.mktemp("engine-cache")
    backend = TorchAotBackend.load(shipped_manifest, WINDOW, BackendOptions(threads=2, cache_dir=cache))
    backend.close()
    assert backend.origin == "built" and backend.refusals == []
    return cache


@pytest.fixture
def loaded(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path
) -> Iterator[tuple[TorchAotBackend, AcceptanceSample]]:
    """The cached engine loaded (its worker process running) and the stored sample with its fp32 reference."""
    cache, _ = copy_of(built_cache, tmp_path)
    backend = TorchAotBackend.load(shipped_manifest, WINDOW, BackendOptions(threads=2, cache_dir=cache))
    try:
        yield backend, acceptance_sample(shipped_manifest, WINDOW, cache)
    finally:
        backend.close()


def copy_of(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the built cache and its engine folder."""
    target = tmp_path / "cache"
    shutil.copytree(cache, target)
    (folder,) = (target / "engines").iterdir()
    return target, folder


def test_an_engine_is_built_once_then_loaded_from_the_cache_and_accepted(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cache, folder = copy_of(built_cache, tmp_path)
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["key"]["backend"] == "torch-aot" and record["key"]["window"] == list(WINDOW)
    assert record["key"]["model_sha256"] == shipped_manifest.weights_sha256
    assert record["key"]["confidence_sha256"] == shipped_manifest.confidence_sha256 != ""
    assert record["acceptance"]["passed"] is True
    assert record["acceptance"]["mean_abs_hu"] <= shipped_manifest.backend_tolerance_hu
    assert len(record["sha256"]) == 64 and record["build_s"] > 0

    progress: list[tuple[str, float]] = []
    backend = TorchAotBackend.load(
        shipped_manifest,
        WINDOW,
        BackendOptions(threads=2, cache_dir=cache, progress=lambda s, f: progress.append((s, f))),
    )
    request.addfinalizer(backend.close)
    assert backend.origin == "cached" and backend.refusals == []
    assert backend.info.details["acceptance"]["passed"] is True
    assert progress[-1] == ("torch-aot fp32: ready", 1.0)
    assert not any("compiling" in step for step, _ in progress)
    # The cached engine computes what the model computes: the stored sample against its fp32 reference.
    sample = acceptance_sample(shipped_manifest, WINDOW, cache)
    outputs = backend.infer_outputs(sample.window)
    delta = np.abs(outputs[0] - sample.reference[0]) * shipped_manifest.hu_scale
    assert float(delta.max()) < 0.5
    assert float(np.abs(sample.reference[0]).max()) > 0.1  # a real phantom window, not zeros
    # The package computes the confidence with the HU, as the eager network does (uint8, rounding aside).
    confidence = np.abs(np.rint(outputs[1]) - np.rint(sample.reference[1]))
    assert float(confidence.max()) <= 1
    assert record["acceptance"]["confidence_mean_abs"] <= 0.01


def test_an_altered_engine_file_is_refused_and_rebuilt(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path
) -> None:
    cache, folder = copy_of(built_cache, tmp_path)
    with (folder / TorchAotBackend.artefact).open("ab") as handle:
        handle.write(b"\0")
    backend = TorchAotBackend.load(shipped_manifest, WINDOW, BackendOptions(threads=2, cache_dir=cache))
    backend.close()
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
    backend.close()
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


def test_inspecting_the_cache_tells_what_a_start_would_do_and_changes_nothing(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path
) -> None:
    """``inspect_cache`` (sct-agent doctor) reaches the verdicts ``load`` reaches, without loading or removing."""
    options = BackendOptions(threads=2, cache_dir=tmp_path / "empty")
    missing = TorchAotBackend.inspect_cache(shipped_manifest, WINDOW, options)
    assert (missing.state, missing.ready, missing.previous_build_s) == (MISSING, False, None)
    assert not (tmp_path / "empty").exists()

    cache, folder = copy_of(built_cache, tmp_path)
    options = BackendOptions(threads=2, cache_dir=cache)
    accepted = TorchAotBackend.inspect_cache(shipped_manifest, WINDOW, options)
    assert (accepted.state, accepted.ready, accepted.folder) == (ACCEPTED, True, folder)
    assert accepted.reason.startswith("mean |ΔHU|") and accepted.record is not None

    strict = dataclasses.replace(shipped_manifest, backend_tolerance_hu=-1.0)
    failed = TorchAotBackend.inspect_cache(strict, WINDOW, options)
    assert failed.state == REFUSED and "failed acceptance: recorded mean |ΔHU|" in failed.reason

    record = json.loads((folder / RECORD_NAME).read_text())
    record["key"]["device"] = "NVIDIA H200"
    (folder / RECORD_NAME).write_text(json.dumps(record))
    other = TorchAotBackend.inspect_cache(shipped_manifest, WINDOW, options)
    assert other.state == REFUSED and "device: found 'NVIDIA H200'" in other.reason
    # The refused engine's build time is this machine's best estimate of the rebuild; the engine stays.
    assert other.previous_build_s == record["build_s"]
    assert (folder / TorchAotBackend.artefact).exists() and (folder / RECORD_NAME).exists()


def test_inspecting_a_backend_without_a_gpu_says_why_as_load_does(shipped_manifest: ModelManifest) -> None:
    with pytest.raises(BackendUnavailableError, match=r"torch-cuda: this torch .* is a CPU-only build"):
        inspect_engine(TorchCudaBackend.name, shipped_manifest, WINDOW)
    choice = inspect_engine(AUTO, shipped_manifest, WINDOW, BackendOptions(cache_dir=Path("/nonexistent")))
    name, precision, _ = resolve_auto(shipped_manifest)
    assert (choice.backend, choice.precision) == (name, precision.value)
    assert [line.split(":")[0] for line in choice.passed_over] == ["tensorrt", "torch-cuda"]


def test_a_slab_in_the_engine_worker_leaves_the_agent_threads_running(
    loaded: tuple[TorchAotBackend, AcceptanceSample],
) -> None:
    """The package's runner holds the GIL for a whole window; in its worker process it cannot stall ours.

    In the agent's own process a thread ticking every 10 ms ticked once during an 11.5 s lumbar slab; here the
    ticker must keep ticking while windows are computed (at least a few ticks per window, each window taking
    well over 10 ms), and the worker must answer what the model computes.
    """
    backend, sample = loaded
    ticks = 0
    done = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.wait(TICK_S):
            ticks += 1

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.perf_counter()
    try:
        for _ in range(WINDOWS):
            out = backend.infer(sample.window)
    finally:
        done.set()
        ticker.join()
    elapsed = time.perf_counter() - started
    assert elapsed > WINDOWS * TICK_S  # the test means something only if windows outlast ticks
    assert ticks >= MIN_TICKS_PER_WINDOW * WINDOWS, f"{ticks} ticks in {elapsed:.2f} s of {WINDOWS} windows"
    assert float(np.abs(out - sample.reference[0]).max()) * shipped_hu_scale(backend) < 0.5


def test_a_worker_that_dies_fails_one_window_and_the_next_starts_a_new_one(
    loaded: tuple[TorchAotBackend, AcceptanceSample], caplog: pytest.LogCaptureFixture
) -> None:
    backend, sample = loaded
    pid = backend.info.details["worker"]["pid"]
    # Stopped, the worker cannot answer before it is killed, mid-request (as the kernel's OOM killer would).
    os.kill(pid, signal.SIGSTOP)
    killer = threading.Timer(KILL_AFTER_S, os.kill, (pid, signal.SIGKILL))
    killer.start()
    with pytest.raises(
        EngineWorkerError, match=rf"engine worker \(pid {pid}\) ended with signal SIGKILL"
    ) as info:
        backend.infer(sample.window)
    killer.join()
    assert info.value.attribute == "engine.worker"
    out = backend.infer(sample.window)
    worker = backend.info.details["worker"]
    assert worker["starts"] == 2 and worker["pid"] != pid
    assert float(np.abs(out - sample.reference[0]).max()) * shipped_hu_scale(backend) < 0.5
    # Killed between windows: noticed and replaced before the next window, which then succeeds.
    os.kill(worker["pid"], signal.SIGKILL)
    wait_until_ended(worker["pid"])
    with caplog.at_level(logging.WARNING, logger="engines.backends.aot_worker"):
        backend.infer(sample.window)
    assert (
        f"engine worker (pid {worker['pid']}) had ended with signal SIGKILL; starting a new one"
        in caplog.text
    )
    assert backend.info.details["worker"]["starts"] == 3


def test_the_engine_streams_a_volume_through_the_worker(
    built_cache: Path,
    shipped_manifest: ModelManifest,
    held_out_case: PhantomCase,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The agent's slab path (device volume, halo gather, HU, int16) on the worker's shared output, slab after
    slab, gives what the eager reference gives."""
    cache, _ = copy_of(built_cache, tmp_path)
    rows, cols = held_out_case.echoes.shape[2:]
    top, left = (rows - IN_PLANE[0]) // 2, (cols - IN_PLANE[1]) // 2
    echoes = held_out_case.echoes[:, :, top : top + IN_PLANE[0], left : left + IN_PLANE[1]]
    options = BackendOptions(threads=2, cache_dir=cache)
    aot = SctEngine.load(
        shipped_manifest,
        backend=TorchAotBackend.name,
        options=options,
        in_plane=IN_PLANE,
        slab_depth=SLAB_DEPTH,
    )
    request.addfinalizer(aot.close)
    assert aot.info.details["engine"] == "cached"
    eager = SctEngine.load(
        shipped_manifest, backend=TorchEagerBackend.name, in_plane=IN_PLANE, slab_depth=SLAB_DEPTH
    )
    request.addfinalizer(eager.close)
    streamed, reference = aot.infer_volume(echoes), eager.infer_volume(echoes)
    assert len(aot.plan(echoes.shape[1]).windows) > 10
    assert float(np.abs(streamed - reference).max()) <= STREAMED_AGREEMENT_HU
    # The centre crop holds vertebral bone and fat: not a vacuous comparison.
    assert streamed.max() > 300 and streamed.min() < -100


def test_closing_the_backend_ends_its_worker(loaded: tuple[TorchAotBackend, AcceptanceSample]) -> None:
    backend, _ = loaded
    pid = backend.info.details["worker"]["pid"]
    backend.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def shipped_hu_scale(backend: TorchAotBackend) -> float:
    return float(backend.manifest.hu_scale)


def wait_until_ended(pid: int, timeout_s: float = 10.0) -> None:
    """Until the killed child can be collected (without collecting it: that is the backend's job)."""
    deadline = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline, f"pid {pid} still running"
        time.sleep(0.01)


def test_auto_passes_over_the_gpu_backends_in_one_line_each(
    built_cache: Path, shipped_manifest: ModelManifest, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Without a GPU, auto says why in one line per GPU backend and takes the CPU rule's choice (on a CPU
    without accelerated reduced precision, the cached fp32 AOTInductor engine)."""
    cache, _ = copy_of(built_cache, tmp_path)
    backend = load_backend(AUTO, shipped_manifest, WINDOW, BackendOptions(threads=2, cache_dir=cache))
    request.addfinalizer(backend.close)
    name, precision, _ = resolve_auto(shipped_manifest)
    assert (backend.info.backend, backend.info.precision) == (name, precision.value)
    if name == TorchAotBackend.name:
        assert backend.info.details["engine"] == "cached"
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
