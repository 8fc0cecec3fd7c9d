"""Fault benchmark: SIGKILL the agent at random moments while series stream, restart it, check every time.

Usage: .venv/bin/python bench/crash.py [--runs 20] [--seed 20261204] [--json FILE] [--keep DIR]

Each run exports two passing small lumbar series and one the protocol rejects (TE 2) into a fresh export folder
while the agent (``sct-agent run``, its own process) runs with DICOM output on and a subscriber connected; the
agent is sent SIGKILL at a random moment within the time an uninterrupted run takes (one kill in each equal
part of that window, so the kills cover ingest, inference, publishing, DICOM writing and journal commits), the
scanner goes on exporting, and the agent is started again until every acquisition is finished. A run passes
when nothing differs from the uninterrupted reference run: the same acquisition states, one committed volume per
passing series with the reference sha256, one complete DICOM series each with the reference Series Instance UID
(no duplicate, no partial folder), no volume sent as new twice or with other content, every volume received,
the journal's integrity check clean. ``tests/crash_harness.py`` is the harness; ``tests/test_crash_safety.py``
runs three kills of it in the test suite.

Reports passes out of runs, where the kills landed (the phase read from the journal the killed agent left) and
the median time to recover (restart to every acquisition finished is inside each run's time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from crash_harness import compare, random_kill_times, run_once, stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument(
        "--keep", type=Path, help="keep every run's folders here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sct-crash-") as temp:
        root = args.keep or Path(temp)
        started = time.monotonic()
        staged = stage(root / "staged")
        reference = run_once(staged, root / "reference", kill_at_s=None)
        print(
            f"reference run: {reference.seconds:.1f} s, {len(reference.volumes)} volumes, states "
            f"{sorted(Counter(reference.states.values()).items())}",
            flush=True,
        )
        results: list[dict[str, object]] = []
        seconds: list[float] = []
        for n, kill_at in enumerate(random_kill_times(args.runs, reference.seconds, args.seed)):
            run = run_once(staged, root / f"run-{n:02d}", kill_at_s=kill_at)
            problems = compare(reference, run)
            seconds.append(run.seconds)
            results.append(
                {
                    "run": n,
                    "kill_at_s": round(kill_at, 3),
                    "phase": run.phase,
                    "seconds": round(run.seconds, 2),
                    "problems": problems,
                }
            )
            verdict = "ok" if not problems else "FAILED: " + "; ".join(problems)
            print(
                f"run {n:2d}: SIGKILL at {kill_at:6.2f} s ({run.phase}), done in {run.seconds:5.1f} s: {verdict}",
                flush=True,
            )
    passed = sum(1 for r in results if not r["problems"])
    phases = Counter(str(r["phase"]) for r in results)
    figures = {
        "runs": len(results),
        "passed": passed,
        "phases": dict(sorted(phases.items())),
        "reference_s": round(reference.seconds, 2),
        "median_run_s": round(statistics.median(seconds), 2) if seconds else None,
        "wall_s": round(time.monotonic() - started, 1),
        "results": results,
    }
    print(
        f"passed {passed} of {len(results)}; kills by phase: {dict(sorted(phases.items()))}; "
        f"reference {reference.seconds:.1f} s, median killed run {figures['median_run_s']} s"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
