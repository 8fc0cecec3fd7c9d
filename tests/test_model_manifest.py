"""The shipped model's manifest, and refusal of weights or manifests that are not what they claim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engines.model.manifest import (
    DEFAULT_MODEL_DIR,
    MANIFEST_NAME,
    ManifestError,
    ModelManifest,
    WeightsIntegrityError,
    sha256_of,
)
from engines.model.unet import LightUNet3d, parameter_count


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, dest)
    return dest


def _edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_shipped_manifest_describes_the_model(shipped_manifest: ModelManifest) -> None:
    m = shipped_manifest
    assert m.weights_sha256 == sha256_of(m.weights_path)
    assert "bonemri_lumbar_1p5t" in m.validated_protocols
    assert m.architecture.in_channels == len(m.echo_times_ms) == 2
    assert list(m.echo_times_ms) == sorted(m.echo_times_ms)
    assert m.slab.depth % m.architecture.downsampling_factor == 0
    assert m.slab.halo % m.architecture.downsampling_factor == 0
    assert m.hu_range == (-1024.0, 3071.0)
    assert 1_000_000 <= parameter_count(LightUNet3d(m.architecture)) <= 2_000_000
    assert m.training["steps"] == m.training["recipe"]["steps"]
    summary = m.validation["summary"]
    assert summary["mae_hu"]["mean"] > 0
    assert 0 < summary["bone_dice.200"]["mean"] <= 1
    stitched = m.validation["stitched_vs_whole_max_abs_hu"]
    assert stitched[f"depth{m.slab.depth}_halo{m.slab.halo}"] <= 1.0


def test_shipped_weights_load_into_the_network(shipped_manifest: ModelManifest) -> None:
    model = shipped_manifest.build_model()
    assert not model.training


def test_tampered_weights_are_refused_with_both_hashes(model_copy: Path) -> None:
    manifest = ModelManifest.load(model_copy)
    weights = manifest.weights_path
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError) as excinfo:
        ModelManifest.load(model_copy)
    message = str(excinfo.value)
    assert manifest.weights_sha256 in message
    assert sha256_of(weights) in message
    assert str(weights) in message
    with pytest.raises(WeightsIntegrityError):
        manifest.build_model()  # a manifest loaded before the change still refuses


def test_truncated_or_missing_weights_are_refused(model_copy: Path) -> None:
    weights = ModelManifest.load(model_copy).weights_path
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        ModelManifest.load(model_copy)
    weights.unlink()
    with pytest.raises(WeightsIntegrityError, match="unreadable"):
        ModelManifest.load(model_copy)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"schema_version": "2.0"}, "schema_version found '2.0'"),
        ({"validated_protocols": []}, "validated_protocols is empty"),
        ({"slab": {"depth": 32, "halo": 12}}, "slab.halo: found 12"),
        ({"backend_tolerance_hu": -1}, "backend_tolerance_hu found -1"),
        ({"model_id": ""}, "model_id found ''"),
        ({"weights": {"file": "weights.pt", "sha256": "abc"}}, "weights.sha256 found 'abc'"),
    ],
)
def test_bad_manifest_fields_are_named(model_copy: Path, changes: dict[str, object], expected: str) -> None:
    _edit_manifest(model_copy, **changes)
    with pytest.raises(ManifestError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        ModelManifest.load(model_copy)


def test_missing_manifest_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no model manifest"):
        ModelManifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        ModelManifest.load(tmp_path)
