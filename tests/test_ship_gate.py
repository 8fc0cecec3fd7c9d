"""Shipping a model: refused unless it beats the shipped model on every headline metric of the same phantoms;
``force`` overrides and is recorded; the comparison lands in the candidate's manifest and training record."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from engines.model.manifest import MANIFEST_NAME, ModelManifest, default_manifest, sha256_of
from engines.model.unet import LightUNet3d
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.training.package import ship
from engines.training.recipe import EVALUATION_SEED_BASE
from engines.training.ship_gate import COMPARISON_NAME, HEADLINE_METRICS, ShipComparison, ShipRefusedError
from engines.training.trainer import RECORD_NAME

#: The seed protocol over a smaller field of view around the lower lumbar spine (vertebrae, discs, fat, muscle):
#: the same comparison in a fraction of the time of the full 100 x 338 x 338 volume.
SMALL_FOV = dataclasses.replace(SEED_PROTOCOL, fov_mm=(120.0, 120.0, 36.0))


def _untrained_candidate(folder: Path) -> ModelManifest:
    """The shipped model's manifest around freshly initialised weights: a real model folder that is worse."""
    shipped = default_manifest()
    folder.mkdir()
    torch.manual_seed(0)
    weights = folder / shipped.weights_file
    torch.save(LightUNet3d(shipped.architecture).state_dict(), weights)
    data = shipped.to_dict()
    data["weights"] = {**data["weights"], "sha256": sha256_of(weights)}
    data["version"] = "0.0.1-untrained"
    data.pop("confidence", None)  # an uncalibrated network: packaging calibrates a trained one
    ModelManifest.from_dict(folder, data).write()
    (folder / RECORD_NAME).write_text(json.dumps({"steps": 0}) + "\n")
    return ModelManifest.load(folder)


@pytest.mark.slow
def test_a_worse_candidate_is_refused_and_force_ships_it_on_the_record(tmp_path: Path) -> None:
    shipped = default_manifest()
    dest = tmp_path / "default"
    shutil.copytree(shipped.folder, dest)
    candidate = _untrained_candidate(tmp_path / "candidate")

    with pytest.raises(ShipRefusedError) as refusal:
        ship(candidate.folder, dest, subjects=1, acquisition=SMALL_FOV, threads=2)
    message = str(refusal.value)
    for headline in HEADLINE_METRICS:
        assert f"{headline.name}: candidate " in message
    assert "current better" in message and "--force" in message
    assert refusal.value.attribute == "headline metrics"
    # The shipped model is untouched, and the refusal is on the candidate's record.
    assert ModelManifest.load(dest).weights_sha256 == shipped.weights_sha256
    assert ModelManifest.load(candidate.folder).training["ship"]["decision"] == "refused"
    stored = json.loads((candidate.folder / COMPARISON_NAME).read_text())
    assert stored["phantom_seeds"] == [EVALUATION_SEED_BASE]
    assert stored["current"]["weights_sha256"] == shipped.weights_sha256
    assert stored["protocol_changes"] == {"fov_mm": [120.0, 120.0, 36.0]}
    assert stored["candidate_better_on_every_metric"] is False

    # The same measured values with the roles swapped: the shipped model beats the untrained one everywhere.
    measured = ShipComparison.from_dict(stored)
    assert not measured.candidate_better
    swapped = dataclasses.replace(
        measured, candidate_values=measured.current_values, current_values=measured.candidate_values
    )
    assert swapped.candidate_better
    assert all(line.endswith("candidate better") for line in swapped.lines())

    # Forced: shipped, and the override is in the manifest that ships (the comparison is not measured again).
    lines: list[str] = []
    shipped_now = ship(
        candidate.folder, dest, subjects=1, acquisition=SMALL_FOV, force=True, threads=2, report=lines.append
    )
    assert any("reusing" in line for line in lines)
    assert shipped_now.weights_sha256 == candidate.weights_sha256 != shipped.weights_sha256
    record = shipped_now.training["ship"]
    assert record["decision"] == "shipped" and record["forced"] is True
    assert record["comparison"]["current"]["weights_sha256"] == shipped.weights_sha256
    assert [v["metric"] for v in record["comparison"]["verdicts"]] == [h.name for h in HEADLINE_METRICS]
    assert json.loads((candidate.folder / RECORD_NAME).read_text())["ship"]["forced"] is True


def test_a_model_ships_into_an_empty_folder_without_comparison(tmp_path: Path) -> None:
    candidate = _untrained_candidate(tmp_path / "candidate")
    dest = tmp_path / "new-site-model"
    shipped = ship(candidate.folder, dest)
    assert (dest / MANIFEST_NAME).is_file()
    assert shipped.training["ship"]["comparison"] is None
    assert shipped.training["ship"]["decision"] == "shipped"
