"""Ingest speed of the agent's header reader and grouping on real vendor exports and on a simulated series.

The assembler must keep up with the scanner (docs/architecture.md, Target figures): at least 0.9x the files
per second of a bare header-only ``pydicom.dcmread``. The vendor conventions (private tags, per-image kinds,
CSA counts) add work per file, so this measures the ratio on what the agent really meets: every real series of
``../shared/dicom`` with at least MIN_FILES files, and the simulated full lumbar series ``bench/e2e.py`` uses.
Both rates are medians over ``--repeats`` passes in one process, compared as a ratio (the machine is shared
and noisy).

    .venv/bin/python bench/ingest.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import BENCH_SEED, ingest  # a sibling bench script, not a package

from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, export_case

SHARED_DICOM = Path(__file__).resolve().parent.parent.parent / "shared" / "dicom"
#: Series with fewer files measure set-up, not ingest.
MIN_FILES = 30


def real_series() -> dict[str, list[Path]]:
    if not SHARED_DICOM.is_dir():
        print(f"note: {SHARED_DICOM} not found; real series skipped", file=sys.stderr)
        return {}
    found = {}
    for folder in sorted(p for p in SHARED_DICOM.glob("*/*") if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.is_file())
        if len(files) >= MIN_FILES:
            found[str(folder.relative_to(SHARED_DICOM))] = files
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for name, files in real_series().items():
        results[name] = ingest(files, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="sct-bench-ingest-"))
    try:
        case = generate_case(BENCH_SEED, SEED_PROTOCOL)
        export_case(case, ExportOptions(out_dir=work / "series"))
        results["simulated lumbar (2 x 100 files)"] = ingest(
            sorted((work / "series").iterdir()), args.repeats
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'series':62} {'files/s':>9} {'bare':>9} {'ratio':>6} {'burst':>6}")
    for name, figures in results.items():
        print(
            f"{name:62} {figures['agent_files_per_s']:9.0f} {figures['bare_header_only_files_per_s']:9.0f} "
            f"{figures['ingest_ratio_header_only']:6.2f} {figures['ingest_burst_ratio_header_only']:6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
