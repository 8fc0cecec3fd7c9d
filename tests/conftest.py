"""Shared fixtures: one held-out phantom subject and the shipped model, built once per test session; a check
that a test's threads are gone when it ends; dcmtk's storescp on loopback. The run's very last line lists the
skipped tests and why (CI installs every tool a test needs, so a skip there is a finding, not noise)."""

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

#: (reason, test ids) of every test skipped in this run, in the order seen.
_SKIPPED: dict[str, list[str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    _SKIPPED.setdefault(reason.removeprefix("Skipped: "), []).append(report.nodeid)


def pytest_unconfigure(config: pytest.Config) -> None:
    """After pytest's own summary: one line, ``skipped: none`` or each reason with the tests it skipped."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if not _SKIPPED:
        reporter.write_line("skipped: none")
        return
    count = sum(len(ids) for ids in _SKIPPED.values())
    reasons = "; ".join(f"{reason} ({', '.join(ids)})" for reason, ids in _SKIPPED.items())
    reporter.write_line(f"skipped {count}: {reasons}")


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
