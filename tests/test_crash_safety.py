"""Crash safety: SIGKILL at random moments while series stream, restart, and nothing is lost or sent twice.

A few runs here (the kill moments spread over a whole run); ``bench/crash.py`` runs 20 and more and reports
where the kills landed. What each run checks is in ``tests/crash_harness.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from crash_harness import Outcome, Staged, compare, random_kill_times, run_once, stage

#: Kills per test run: one in each third of the run (ingest, inference, DICOM and journal commits overlap).
RUNS = 3


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Staged:
    return stage(tmp_path_factory.mktemp("staged"))


@pytest.fixture(scope="module")
def reference(staged: Staged, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    outcome = run_once(staged, tmp_path_factory.mktemp("reference") / "run", kill_at_s=None)
    assert compare(outcome, outcome) == []
    return outcome


def test_the_reference_run_publishes_both_passing_series_and_rejects_the_third(reference: Outcome) -> None:
    states = sorted(reference.states.values())
    assert states == ["published", "published", "rejected"], reference.states
    assert len(reference.volumes) == 2 and set(reference.series) == set(reference.volumes)
    assert all(count == 40 for _, _, count in reference.series.values())
    assert sorted(a for a, _, republished in reference.received if not republished) == sorted(
        reference.volumes
    )


def test_sigkill_at_random_moments_loses_nothing_and_sends_nothing_twice(
    staged: Staged, reference: Outcome, tmp_path: Path
) -> None:
    failures = []
    for n, kill_at in enumerate(random_kill_times(RUNS, reference.seconds, seed=20261204)):
        run = run_once(staged, tmp_path / f"run-{n}", kill_at_s=kill_at)
        problems = compare(reference, run)
        if problems:
            failures.append(f"run {n} killed at {kill_at:.2f} s ({run.phase}): " + "; ".join(problems))
    assert not failures, "\n".join(failures)


def test_the_comparison_catches_a_volume_sent_twice_and_a_missing_series(reference: Outcome) -> None:
    """The checks above can fail: a run that sent a volume twice, or lost a DICOM series, is reported."""
    acquisition_id = next(iter(reference.volumes))
    sent_twice = (*reference.received, (acquisition_id, reference.volumes[acquisition_id], False))
    series = dict(reference.series)
    del series[acquisition_id]
    broken = Outcome(reference.states, reference.volumes, series, sent_twice, reference.seconds)
    problems = compare(reference, broken)
    assert any("more than once" in p for p in problems) and any("DICOM series" in p for p in problems)
