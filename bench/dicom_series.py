"""How long the agent takes to write a full lumbar sCT as a DICOM CT series, and what it costs next to a bare
pydicom write of the same pixels.

The DICOM stage runs beside the ZeroMQ publisher, so its time never delays a robot; it bounds how soon a
navigation system or PACS can import the series. The agent's writer does more than a bare ``save_as`` loop:
it reads every source MR header to check study and frame of reference, builds the source references of
both echoes per slice, fsyncs every file and renames the folder atomically. This script times both on the
seed protocol's full volume (100 x 338 x 338, one file per slice) and reports medians over ``--runs`` and their
ratio, measured in one process (the machine is shared and noisy). It also runs ``dciodvfy`` on the first file.

    .venv/bin/python bench/dicom_series.py [--runs 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from agent.dicom_out.sct_series import write_sct_series
from agent.ingest.grouping import acquisition_id_for
from agent.ingest.header_reader import read_header
from agent.records import ImageRef, SctVolume
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, export_case

BENCH_SEED = 7


def volume_for(case: PhantomCase, export: Path) -> SctVolume:
    """The phantom's CT as the sCT of the exported MR, with every slice's source images (as the streamer
    would hand them over)."""
    geometry = case.geometry
    origin = float(np.dot(geometry.origin, geometry.slice_direction))
    slots: dict[int, list[ImageRef]] = {}
    acquisition_id = ""
    for path in sorted(export.rglob("*.dcm")):
        parsed = read_header(path)
        acquisition_id = acquisition_id_for(parsed.header)
        for frame in parsed.frames:
            position = float(np.dot(frame.position, geometry.slice_direction))
            k = round((position - origin) / geometry.spacing[0])
            slots.setdefault(k, []).append(
                ImageRef(path, frame.frame, frame.echo_time_ms, position, frame.instance_key)
            )
    sources = tuple(tuple(sorted(slots[k], key=lambda r: r.echo_time_ms)) for k in range(geometry.shape[0]))
    hu = np.ascontiguousarray(case.ct_hu.astype(np.int16))
    return SctVolume(
        acquisition_id=acquisition_id,
        protocol_id="bonemri_lumbar_1p5t",
        model_id="bench",
        model_version="0",
        geometry=geometry,
        hu=hu,
        sha256=hashlib.sha256(hu.tobytes()).hexdigest(),
        slab_count=1,
        produced_at=time.time(),
        sources=sources,
    )


def bare_write(files: list[Path], out: Path) -> float:
    """Re-save the agent's own datasets with pydicom alone (no checks, no fsync, no rename): the yardstick."""
    datasets = [pydicom.dcmread(f) for f in files]
    out.mkdir()
    started = time.perf_counter()
    for k, ds in enumerate(datasets):
        ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sct-bench-dicom-"))
    try:
        case = generate_case(BENCH_SEED, SEED_PROTOCOL)
        export_case(case, ExportOptions(out_dir=work / "mr"))
        volume = volume_for(case, work / "mr")
        agent_s, bare_s = [], []
        written = None
        for run in range(args.runs):
            written = write_sct_series(volume, work / f"sct-{run}")
            agent_s.append(written.seconds)
            bare_s.append(bare_write(list(written.files), work / f"bare-{run}"))
        assert written is not None
        size_mb = sum(f.stat().st_size for f in written.files) / 1e6
        dciodvfy = shutil.which("dciodvfy")
        verdict = "dciodvfy not installed"
        if dciodvfy:
            result = subprocess.run(
                [dciodvfy, str(written.files[0])], capture_output=True, text=True, check=False
            )
            lines = (result.stdout + result.stderr).splitlines()
            errors = [line for line in lines if line.startswith("Error")]
            warnings = [line for line in lines if line.startswith("Warning")]
            verdict = f"{len(errors)} errors, {len(warnings)} warnings"
        results = {
            "slices": len(written.files),
            "series_mb": round(size_mb, 1),
            "agent_write_s_median": statistics.median(agent_s),
            "bare_pydicom_write_s_median": statistics.median(bare_s),
            "ratio_agent_to_bare": statistics.median(a / b for a, b in zip(agent_s, bare_s, strict=True)),
            "dciodvfy_first_file": verdict,
            "runs": args.runs,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"sCT DICOM series: {results['slices']} files, {results['series_mb']} MB")
    print(
        f"  agent write (checks, source references, fsync, atomic rename): median "
        f"{results['agent_write_s_median']:.2f} s"
    )
    print(
        f"  bare pydicom save_as of the same datasets: median {results['bare_pydicom_write_s_median']:.2f} s"
    )
    print(f"  ratio agent / bare (median of per-run ratios): {results['ratio_agent_to_bare']:.2f}")
    print(f"  dciodvfy on the first file: {results['dciodvfy_first_file']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
