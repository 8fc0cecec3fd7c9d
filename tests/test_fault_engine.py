"""Fault: the engine fails mid-series, or its cached compiled engine is damaged.

Out of memory on the CPU, as it really happens: the kernel's OOM killer SIGKILLs the biggest process, which
for the ``torch-aot`` backend is the engine's worker process (engines/backends/aot_worker.py). The series
whose slab was in flight must fail cleanly (an ``error`` status naming the acquisition, the engine and the
signal, then ``cancelled``; ``sct_agent_engine_failures_total{cause="worker_ended"}``), nothing of it may be
published as a volume, the agent stays up and the next series is published. The kill is made certain, not
raced: the worker is stopped (SIGSTOP) before the series arrives, so the slab request waits in its socket, and
killed once the engine stage is visibly holding that slab (the next ones queue behind it).

A damaged engine file in the cache (bytes flipped in the AOTInductor package) is refused at start with a
message naming the file and why (its sha256 differs from the one recorded when it passed acceptance), and the
engine is built again and accepted before the agent says ready.

The CUDA backend's ``torch.OutOfMemoryError`` (the caching allocator freed, the series failed with the device
and the memory held in the message) needs a GPU: tests/test_gpu.py has it, skipped here.

Both compile a real AOTInductor package for the small series' window (tests/fault_support.py), so they are slow.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from agent_support import SMALL_SLAB_DEPTH, agent_config, write_test_protocol
from fault_support import metric, recording, scrape, small_series, write_small_model

from agent.ops.config import AgentConfig, EngineConfig
from agent.service import AgentService
from engines.backends.engine_cache import RECORD_NAME
from engines.model.manifest import sha256_of
from engines.phantom.case import PhantomCase
from engines.scanner.export import ExportOptions, export_case

pytestmark = pytest.mark.slow

#: How long the engine thread is given, once it holds the slab, to write its request to the stopped worker.
REQUEST_SETTLE_S = 0.5
SERIES_SEED = 900401


def aot_config(root: Path, model: Path, protocols: Path, cache: Path) -> AgentConfig:
    config = agent_config(root, protocols, model, quiet_period_s=3.0)
    return replace(
        config,
        engine=EngineConfig(
            model=model, backend="torch-aot", slab_depth=SMALL_SLAB_DEPTH, threads=2, cache_dir=cache
        ),
    )


def engine_workers() -> list[int]:
    """Process ids of the engine worker processes this test process started (children running aot_worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"engines.backends.aot_worker" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shared")
    return write_small_model(root / "model"), write_test_protocol(root / "protocols")


@pytest.fixture(scope="module")
def built_cache(shared: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engine cache holding the small window's AOTInductor package, built and accepted by a real agent."""
    model, protocols = shared
    root = tmp_path_factory.mktemp("build")
    cache = root / "engine-cache"
    with AgentService(aot_config(root, model, protocols, cache)) as agent:
        assert agent.healthy()
    (folder,) = (cache / "engines").iterdir()
    assert (folder / "engine.pt2").is_file() and (folder / RECORD_NAME).is_file()
    return cache


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return small_series(SERIES_SEED)


@pytest.fixture
def cache_copy(built_cache: Path, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "engine-cache"
    shutil.copytree(built_cache, copy)
    yield copy


def test_a_worker_killed_mid_series_fails_that_series_only_and_the_next_is_published(
    shared: tuple[Path, Path], cache_copy: Path, case: PhantomCase, tmp_path: Path
) -> None:
    model, protocols = shared
    config = aot_config(tmp_path, model, protocols, cache_copy)
    with (
        AgentService(config) as agent,
        recording(agent.endpoints.publish, agent.endpoints.snapshot) as recorder,
    ):
        url = agent.endpoints.metrics_url
        assert url is not None
        assert 'engine="cached"' in scrape(url).split("sct_agent_engine_info{", 1)[1].split("}", 1)[0]
        (worker,) = engine_workers()
        os.kill(worker, signal.SIGSTOP)
        try:
            export_case(case, ExportOptions(out_dir=config.watch.folder / "victim", rate_files_per_s=300.0))
            # The engine thread holds the first slab (its request waits for the stopped worker) once the
            # following ones queue behind it.
            recorder.wait(
                "the engine stage holding a slab",
                lambda: metric(scrape(url), 'sct_agent_queue_depth{queue="engine"}') >= 1,
            )
            time.sleep(REQUEST_SETTLE_S)
        finally:
            os.kill(worker, signal.SIGKILL)  # what the kernel's OOM killer sends

        recorder.wait("the engine failure reported", lambda: bool(recorder.statuses("error")))
        (failure,) = recorder.statuses("error")
        victim = failure.acquisition_id
        assert victim is not None
        recorder.wait("the victim's final verdict", lambda: victim in recorder.final_pass())
        assert failure.body["stage"] == "engine"
        message = failure.body["message"]
        assert message.startswith(
            "engine torch-aot fp32 on cpu failed on slab 1 of 3: EngineWorkerEndedError: "
        )
        assert f"engine worker (pid {worker}) ended with signal SIGKILL" in message
        recorder.wait("the stream cancelled", lambda: bool(recorder.statuses("cancelled")))
        (cancelled,) = recorder.statuses("cancelled")
        assert cancelled.acquisition_id == victim
        assert cancelled.body["reason"] == "engine failed (worker_ended)"
        text = scrape(url)
        assert metric(text, 'sct_agent_engine_failures_total{cause="worker_ended"}') == 1
        assert metric(text, 'sct_agent_errors_total{stage="engine"}') == 1
        assert agent.healthy()

        # The next series: a new worker computes it, and it is published whole.
        export_case(case, ExportOptions(out_dir=config.watch.folder / "next", rate_files_per_s=300.0))
        recorder.wait("the next series' volume", lambda: recorder.volume_count() == 1)
        (volume,) = recorder.volumes
        assert volume.acquisition_id != victim
        assert volume.complete_from_slabs and volume.matches_volume_message
        (replacement,) = engine_workers()
        assert replacement != worker
        # Nothing of the failed series went out: no slab (the later ones were passed over), no volume.
        assert recorder.slabs_of(victim) == []
        assert [v.acquisition_id for v in recorder.volumes] == [volume.acquisition_id]
        text = scrape(url)
        assert metric(text, "sct_agent_volumes_published_total") == 1
        assert metric(text, 'sct_agent_engine_failures_total{cause="worker_ended"}') == 1
    assert not engine_workers(), "the engine worker outlived the agent"


def test_a_damaged_cached_engine_is_refused_naming_the_file_and_built_again(
    shared: tuple[Path, Path], cache_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, protocols = shared
    (folder,) = (cache_copy / "engines").iterdir()
    package = folder / "engine.pt2"
    recorded = sha256_of(package)
    data = bytearray(package.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    package.write_bytes(bytes(data))
    damaged = sha256_of(package)

    config = aot_config(tmp_path, model, protocols, cache_copy)
    with (
        caplog.at_level(logging.WARNING, logger="engines.backends.cached_backend"),
        AgentService(config) as agent,
    ):
        url = agent.endpoints.metrics_url
        assert url is not None
        text = scrape(url)
        assert metric(text, "sct_agent_engine_refusals") == 1
        assert metric(text, "sct_agent_engine_accepted") == 1
        info = text.split("sct_agent_engine_info{", 1)[1].split("}", 1)[0]
        assert 'backend="torch-aot"' in info and 'engine="built"' in info
        assert agent.healthy()
    refusal = (
        f"cached engine {folder}: engine.pt2 sha256 found {damaged}, expected {recorded} (the file "
        "was altered after it was built); building it again"
    )
    assert refusal in caplog.text
    # The rebuilt package is in place under a record that matches it.
    rebuilt = sha256_of(package)
    assert rebuilt != damaged
    assert f'"sha256": "{rebuilt}"' in (folder / RECORD_NAME).read_text()
