"""``sct-agent evaluate`` on held-out phantoms and on DICOM pairs; the shipped model beats the baseline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from engines.backends.base import BackendOptions
from engines.backends.torch_cpu import TorchEagerBackend
from engines.evaluation.evaluate import check_held_out, evaluate_dicom
from engines.inference.engine import SctEngine
from engines.model.manifest import ModelManifest
from engines.phantom.case import PhantomCase
from engines.scanner.export import ExportOptions, export_case
from engines.training.recipe import TRAIN_SEED_BASE


def test_evaluate_phantom_json_reports_the_literature_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--phantom", "1", "--json", "--backend", TorchEagerBackend.name]) == 0
    report = json.loads(capsys.readouterr().out)
    summary, baseline = report["summary"], report["baseline"]["summary"]
    for key in (
        "mae_hu",
        "me_hu",
        "mae_by_tissue.cortical_bone",
        "mae_by_tissue.trabecular_bone",
        "mae_by_tissue.soft_tissue",
        "mae_by_tissue.fat",
        "bone_dice.150",
        "bone_dice.200",
        "bone_dice.250",
        "bambach_precision",
        "bambach_recall",
        "bambach_dice",
        "psnr_db",
    ):
        assert summary[key]["mean"] is not None, key
    # The learned model must be clearly better than intensity inversion, or it is not worth shipping.
    assert summary["mae_hu"]["mean"] < 0.6 * baseline["mae_hu"]["mean"]
    assert summary["bone_dice.200"]["mean"] > baseline["bone_dice.200"]["mean"]
    assert report["backend"]["backend"] == TorchEagerBackend.name
    assert report["cases"][0]["name"].startswith("phantom seed 9")

    # Geometry: surface distance and, per lumbar level, CT, sCT and their difference for each measure.
    geometry = report["geometry"]["summary"]
    for key in (
        "surface_distance.mean_mm",
        "surface_distance.p95_mm",
        "surface_distance.within_1mm",
        "vertebra.anterior_height_abs_diff_mm",
        "vertebra.posterior_height_abs_diff_mm",
        "vertebra.canal_diameter_abs_diff_mm",
    ):
        assert geometry[key]["mean"] is not None, key
    # A model worth shipping puts most of its bone surface within a millimetre of the CT's.
    assert geometry["surface_distance.within_1mm"]["mean"] > 0.9
    case = report["cases"][0]["geometry"]
    assert case["surface_distance"]["missing"] is None
    assert case["surface_distance"]["p95_mm"] < 2.0
    assert [level["level"] for level in case["vertebrae"]] == ["L1", "L2", "L3", "L4", "L5"]
    for level in case["vertebrae"]:
        for measure in ("anterior_height", "posterior_height", "canal_diameter"):
            ct, sct = level[measure]["ct"]["mm"], level[measure]["sct"]["mm"]
            assert 10.0 < ct < 40.0, (level["level"], measure, ct)
            assert level[measure]["difference_mm"] == pytest.approx(sct - ct, abs=0.002)


def test_evaluate_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate"]) == 2
    assert main(["evaluate", "--phantom", "0"]) == 2
    assert main(["evaluate", "--sct", "x"]) == 2
    assert "--phantom" in capsys.readouterr().err


def test_training_subjects_cannot_be_evaluation_subjects(shipped_manifest: ModelManifest) -> None:
    engine = SctEngine(shipped_manifest, TorchEagerBackend.name, BackendOptions())
    with pytest.raises(ValueError, match="were used to train or validate"):
        check_held_out(engine, [TRAIN_SEED_BASE + 1])


def test_dicom_pair_metrics_on_known_cases(held_out_case: PhantomCase, tmp_path: Path) -> None:
    export_case(held_out_case, ExportOptions(out_dir=tmp_path / "mr", ct_dir=tmp_path / "ct"))
    shifted = dataclasses.replace(
        held_out_case, ct_hu=(held_out_case.ct_hu.astype(np.int32) + 25).astype(np.int16)
    )
    export_case(shifted, ExportOptions(out_dir=tmp_path / "mr2", ct_dir=tmp_path / "ct_plus25"))

    same_case = evaluate_dicom(tmp_path / "ct", tmp_path / "ct").cases[0]
    assert same_case.geometry is not None
    assert same_case.geometry.surface.mean_mm == 0.0  # no vertebra positions in DICOM: surface distance only
    assert same_case.geometry.levels == ()
    same = same_case.model
    assert same.mae_hu == 0.0
    assert same.me_hu == 0.0
    assert all(v == 1.0 for v in same.bone_dice.values())
    assert same.bambach_dice == 1.0
    assert same.psnr_db == float("inf")

    plus = evaluate_dicom(tmp_path / "ct_plus25", tmp_path / "ct").cases[0].model
    assert plus.mae_hu == pytest.approx(25.0, abs=0.5)  # clipping at the HU limits shaves a little
    assert plus.me_hu == pytest.approx(-25.0, abs=0.5)  # ME = mean(CT - sCT): sCT too high is negative

    assert main(["evaluate", "--sct", str(tmp_path / "ct"), "--ct", str(tmp_path / "nowhere")]) == 1
