"""Turn a finished training run into a model folder: weights, measured slab layout, validation figures, manifest.

Everything the manifest states about the model is measured here on held-out *validation* subjects (never the
evaluation subjects ``sct-agent evaluate`` uses), with the fp32 eager backend as the reference:

1. the halo: the smallest candidate for which stitched slabs match one whole-volume pass within
   :data:`STITCH_TARGET_HU` (half the 1 HU the product promises, as margin for other subjects);
2. the slab depth: the one that needs the fewest computed slices for the protocol's slice count;
3. validation metrics of the model and the baseline;
4. the agreement of each faster backend precision with the reference, which ``auto`` consults;
5. the per-voxel confidence: its statistics fitted and its threshold chosen on other normal validation subjects
   (``engines/confidence/calibrate.py``), written as the manifest's ``confidence`` section and its statistics file.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import BackendOptions, BackendUnavailableError, Precision
from engines.backends.registry import accuracy_key
from engines.backends.torch_cpu import TorchEagerBackend, TorchOptimisedBackend
from engines.confidence.calibrate import calibrate_model
from engines.evaluation.evaluate import evaluate_phantoms
from engines.inference.engine import SctEngine, whole_volume_reference
from engines.model.manifest import MANIFEST_NAME, ModelManifest, SlabSpec, sha256_of
from engines.model.normalisation import Normalisation
from engines.model.unet import HU_SCALE, UNetConfig
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.case import CT_HU_MAX, CT_HU_MIN
from engines.phantom.generate import generate_case
from engines.training.recipe import VALIDATION_SEED_BASE
from engines.training.trainer import RECORD_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

MODEL_ID = "sct-lumbar-dual-echo-unet"
MODEL_VERSION = "1.0.0"
VALIDATED_PROTOCOLS = ("bonemri_lumbar_1p5t",)
#: Mean |ΔHU| against fp32 eager that a faster backend may show and still be chosen by ``auto``.
BACKEND_TOLERANCE_HU = 2.0
STITCH_TARGET_HU = 0.5
HALO_CANDIDATES = (8, 16, 24, 32)
DEPTH_CANDIDATES = (32, 40, 48, 56)
VALIDATION_SUBJECTS = 2


def choose_depth(n_slices: int, halo: int) -> int:
    """Fewest computed slices per volume (ties: the shallower slab, which streams earlier)."""
    return min(DEPTH_CANDIDATES, key=lambda d: (math.ceil(n_slices / d) * (d + 2 * halo), d))


def package(
    run_dir: Path,
    *,
    threads: int | None = None,
    report: Callable[[str], None] = logger.info,
) -> ModelManifest:
    """Measure and write ``run_dir/manifest.json``; returns the loaded (hash-checked) manifest."""
    record = json.loads((run_dir / RECORD_NAME).read_text())
    options = BackendOptions(threads=threads)
    n_slices = SEED_PROTOCOL.matrix[0]
    draft = _draft(run_dir, record, SlabSpec(depth=DEPTH_CANDIDATES[0], halo=HALO_CANDIDATES[0]))
    case = generate_case(VALIDATION_SEED_BASE, SEED_PROTOCOL)

    stitch: dict[str, float] = {}
    chosen: SlabSpec | None = None
    for halo in HALO_CANDIDATES:
        depth = choose_depth(n_slices, halo)
        trial = _with_slab(draft, depth, halo)
        # The whole-volume pass depends on the halo through the edge padding beyond the volume.
        whole = whole_volume_reference(trial, case.echoes)
        engine = SctEngine.load(trial, backend=TorchEagerBackend.name, options=options)
        diff = float(np.abs(engine.infer_volume(case.echoes) - whole).max())
        engine.close()
        stitch[f"depth{depth}_halo{halo}"] = round(diff, 4)
        report(f"slab depth {depth} halo {halo}: stitched vs whole max |ΔHU| {diff:.3f}")
        if diff <= STITCH_TARGET_HU:
            chosen = SlabSpec(depth=depth, halo=halo)
            break
    if chosen is None:
        raise RuntimeError(f"no halo in {HALO_CANDIDATES} meets {STITCH_TARGET_HU} HU: {stitch}")
    manifest = _with_slab(draft, chosen.depth, chosen.halo)

    reference = SctEngine.load(manifest, backend=TorchEagerBackend.name, options=options)
    ref_hu = reference.infer_volume(case.echoes)
    accuracy: dict[str, dict[str, float]] = {}
    for precision in (Precision.FP32, Precision.BF16, Precision.FP16):
        try:
            fast = SctEngine.load(
                manifest,
                backend=TorchOptimisedBackend.name,
                options=BackendOptions(threads=threads, precision=precision),
            )
        except BackendUnavailableError as exc:
            report(f"{precision.value}: not measured ({exc})")
            continue
        delta = np.abs(fast.infer_volume(case.echoes) - ref_hu)
        fast.close()
        accuracy[accuracy_key(TorchOptimisedBackend.name, precision)] = {
            "mean_abs_hu": round(float(delta.mean()), 4),
            "p999_abs_hu": round(float(np.percentile(delta, 99.9)), 3),
            "max_abs_hu": round(float(delta.max()), 3),
        }
        report(
            f"torch-optimised {precision.value}: {accuracy[accuracy_key(TorchOptimisedBackend.name, precision)]}"
        )

    seeds = [VALIDATION_SEED_BASE + i for i in range(VALIDATION_SUBJECTS)]
    validation = evaluate_phantoms(reference, seeds, progress=report)
    reference.close()
    final = ModelManifest.from_dict(
        run_dir,
        {
            **manifest.to_dict(),
            "backend_accuracy": accuracy,
            "validation": {
                "validation_seeds": [seeds[0], seeds[-1]],
                "protocol": "seed protocol (bonemri_lumbar_1p5t nominal values)",
                "backend": "torch-eager fp32",
                "stitched_vs_whole_max_abs_hu": stitch,
                "summary": validation.to_dict()["summary"],
                "baseline_summary": (validation.to_dict()["baseline"] or {}).get("summary", {}),
            },
        },
    )
    final.write()
    return calibrate_model(run_dir, threads=threads, report=report)


def ship(run_dir: Path, dest: Path) -> ModelManifest:
    """Copy the weights and manifest of a packaged run into ``dest`` (e.g. the package's default model folder)."""
    manifest = ModelManifest.load(run_dir)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(manifest.weights_path, dest / manifest.weights_file)
    if manifest.confidence_path is not None:
        shutil.copyfile(manifest.confidence_path, dest / manifest.confidence_path.name)
    shutil.copyfile(run_dir / MANIFEST_NAME, dest / MANIFEST_NAME)
    return ModelManifest.load(dest)


def _draft(run_dir: Path, record: dict[str, Any], slab: SlabSpec) -> ModelManifest:
    arch = record["architecture"]
    architecture = UNetConfig(
        in_channels=int(arch["in_channels"]),
        out_channels=int(arch["out_channels"]),
        channels=tuple(int(c) for c in arch["channels"]),
        planar_levels=int(arch.get("planar_levels", 0)),
    )
    row, col, sl = SEED_PROTOCOL.voxel_mm
    return ModelManifest(
        folder=run_dir,
        model_id=MODEL_ID,
        version=MODEL_VERSION,
        weights_file=WEIGHTS_NAME,
        weights_sha256=sha256_of(run_dir / WEIGHTS_NAME),
        architecture=architecture,
        normalisation=Normalisation.from_dict(record["normalisation"]),
        echo_times_ms=SEED_PROTOCOL.echo_times_ms,
        spacing_mm=(sl, row, col),
        orientation=SEED_PROTOCOL.orientation.value,
        matrix=(SEED_PROTOCOL.matrix[1], SEED_PROTOCOL.matrix[2]),
        hu_range=(float(CT_HU_MIN), float(CT_HU_MAX)),
        hu_scale=HU_SCALE,
        slab=slab,
        validated_protocols=VALIDATED_PROTOCOLS,
        backend_tolerance_hu=BACKEND_TOLERANCE_HU,
        training={
            "recipe": record["recipe"],
            "training_seeds": record["training_seeds"],
            "steps": record["steps"],
            "wall_s": record["wall_s"],
            "threads": record["threads"],
            "torch": record["torch"],
            "final_l1_hu": record["loss_history_l1_hu"][-1][1] if record["loss_history_l1_hu"] else None,
        },
    )


def _with_slab(manifest: ModelManifest, depth: int, halo: int) -> ModelManifest:
    return ModelManifest.from_dict(
        manifest.folder, {**manifest.to_dict(), "slab": {"depth": depth, "halo": halo}}
    )
