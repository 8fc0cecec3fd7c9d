"""``sct-agent demo``: the main job end to end, on the embedded default.

Until the agent pipeline exists, the demo is the part of the job that does: a simulated scanner exports a
dual-echo series and the matching reference CT as DICOM, the files are read back the way any DICOM consumer
reads them, the embedded default model turns the two echoes into a synthetic CT slab by slab, and a picture of
MR, sCT and CT is written with the sCT's error against the CT. Reading back, rather than using the phantom's
arrays, is deliberate: the model sees what it would see from a scanner.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from agent.montage import CT_WINDOW_HU, Panel, render_montage
from engines.backends.registry import AUTO, BACKENDS
from engines.evaluation.metrics import compute_metrics, masks_from_ct
from engines.inference.engine import SctEngine
from engines.scanner.export import ExportOptions, SimulationRequest, simulate
from engines.scanner.readback import read_ct_series, read_mr_series

DEFAULT_SEED = 7


@dataclass(frozen=True, slots=True)
class DemoResult:
    picture: Path
    mr_files: int
    mr_bytes: int
    ct_files: int
    phantom_seconds: float
    export_seconds: float
    model: str
    backend: str
    inference_seconds: float
    mae_hu: float
    bone_dice_200: float


def run_demo(out: Path, seed: int = DEFAULT_SEED, backend: str = AUTO) -> DemoResult:
    export_dir, ct_dir = out / "export", out / "ct"
    # The demo owns these folders: a second run replaces the first run's series instead of mixing with it.
    for folder in (export_dir, ct_dir):
        shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    summary = simulate(SimulationRequest(seed=seed), ExportOptions(out_dir=export_dir, ct_dir=ct_dir))
    export_seconds = time.perf_counter() - started - summary.simulation_seconds
    mr = read_mr_series(export_dir)
    ct = read_ct_series(ct_dir)
    te = mr.echo_times_ms
    engine = SctEngine.load(backend=backend, in_plane=mr.echoes.shape[-2:])
    started = time.perf_counter()
    sct = engine.infer_volume(mr.echoes)
    inference_seconds = time.perf_counter() - started
    info = engine.info
    engine.close()
    metrics = compute_metrics(sct, ct.hu, masks_from_ct(ct.hu))
    panels = [
        Panel(f"MR echo 1, TE {te[0]:g} ms", mr.echoes[0]),
        Panel(f"MR echo 2, TE {te[1]:g} ms", mr.echoes[1]) if len(te) > 1 else None,
        Panel(f"SYNTHETIC CT, {info.model_id} {info.model_version}", sct, CT_WINDOW_HU),
        Panel("reference CT (simulated)", ct.hu, CT_WINDOW_HU),
    ]
    caption = (
        f"phantom seed {seed}: {mr.attributes.magnetic_field_strength_t:g} T, TR {mr.attributes.repetition_time_ms:g} ms, "
        f"{mr.echoes.shape[1]} sagittal slices; mid-sagittal (top) and mid-axial (bottom) from the DICOM files; "
        f"sCT MAE {metrics.mae_hu:.0f} HU in the body"
    )
    picture = render_montage(
        [p for p in panels if p is not None], mr.geometry, out / "scan.png", caption=caption
    )
    return DemoResult(
        picture=picture,
        mr_files=summary.file_count,
        mr_bytes=summary.total_bytes,
        ct_files=len(summary.ct_paths),
        phantom_seconds=summary.simulation_seconds,
        export_seconds=export_seconds,
        model=f"{info.model_id} {info.model_version}",
        backend=f"{info.backend} {info.precision}",
        inference_seconds=inference_seconds,
        mae_hu=metrics.mae_hu,
        bone_dice_200=metrics.bone_dice["200"],
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="simulate a scan, export it as DICOM, read it back, infer the sCT and write a picture",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"phantom subject (default: {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--backend", default=AUTO, choices=[AUTO, *BACKENDS], help="inference backend (default: auto)"
    )
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.seed, args.backend)
    print(
        f"simulated scanner export: {result.mr_files} MR files, {result.mr_bytes / 1e6:.1f} MB "
        f"({result.phantom_seconds:.1f} s phantom, {result.export_seconds:.1f} s DICOM), "
        f"{result.ct_files} CT files"
    )
    print(
        f"synthetic CT: {result.model} on {result.backend}, {result.inference_seconds:.1f} s for the volume; "
        f"MAE {result.mae_hu:.1f} HU in the body, bone Dice at 200 HU {result.bone_dice_200:.3f}"
    )
    print(f"picture: {result.picture}")
    return 0
