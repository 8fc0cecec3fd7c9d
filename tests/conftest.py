"""Shared fixtures: one held-out phantom subject and the shipped model, built once per test session; a check
that a test's threads are gone when it ends; dcmtk's storescp on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sct_dicom_support import StartStorescp, storescp_launcher
from zmq.utils.garbage import GarbageCollectorThread

from engines.model.manifest import ModelManifest, default_manifest
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.training.recipe import EVALUATION_SEED_BASE

#: A held-out subject outside the range ``sct-agent evaluate --phantom N`` uses for small N.
HELD_OUT_TEST_SEED = EVALUATION_SEED_BASE + 500


@pytest.fixture(scope="session")
def held_out_case() -> PhantomCase:
    return generate_case(HELD_OUT_TEST_SEED, SEED_PROTOCOL)


@pytest.fixture(scope="session")
def shipped_manifest() -> ModelManifest:
    return default_manifest()


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Every thread a test starts (publisher, ZAP handler, client helpers) is joined by its end; pyzmq's own
    zero-copy garbage-collector thread, one per process, excepted. Use with ``usefixtures``."""
    before = set(threading.enumerate())
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not isinstance(t, GarbageCollectorThread)
    ]
    assert leaked == []


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StartStorescp]:
    """Starts dcmtk storescp on a port (extra options allowed); returns its output folder. Killed afterwards."""
    with storescp_launcher(tmp_path) as start:
        yield start
