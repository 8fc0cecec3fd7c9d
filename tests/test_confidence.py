"""The shipped model's per-voxel confidence: its manifest section and statistics file (refused when tampered with),
computed in the same pass as the HU by the engine, stitched exactly, flagging pathology a normal twin does not
show, and a model without confidence running exactly as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.backends.base import BackendOptions
from engines.backends.engine_cache import EngineKey
from engines.backends.torch_cpu import TorchEagerBackend
from engines.confidence.density import ConfidentUNet3d
from engines.confidence.regions import find_flagged_regions
from engines.confidence.spec import CONFIDENCE_MAX
from engines.evaluation.out_of_domain import assess_case
from engines.inference.engine import SctEngine, whole_volume_outputs
from engines.model.manifest import (
    DEFAULT_MODEL_DIR,
    MANIFEST_NAME,
    ConfidenceStatisticsError,
    ManifestError,
    ModelManifest,
    sha256_of,
)
from engines.model.unet import LightUNet3d
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.phantom.pathology import Pathology

#: In-plane crop through the spine (as tests/test_slabs.py): the whole slice axis, a fifth of the work.
CROP = 150
#: Stitched slabs against one whole-volume pass: the uint8 confidence may differ by rounding of a value that
#: sits on a half-unit boundary, nothing more.
STITCH_TOLERANCE = 1


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, dest)
    return dest


@pytest.fixture
def no_confidence_model(model_copy: Path) -> ModelManifest:
    """The shipped weights as a site model without a confidence section (and without the statistics file)."""
    manifest = ModelManifest.load(model_copy)
    assert manifest.confidence_path is not None
    manifest.confidence_path.unlink()
    data = json.loads((model_copy / MANIFEST_NAME).read_text())
    del data["confidence"]
    (model_copy / MANIFEST_NAME).write_text(json.dumps(data))
    return ModelManifest.load(model_copy)


def centre_crop(echoes: np.ndarray) -> np.ndarray:
    rows, cols = echoes.shape[-2:]
    r0, c0 = (rows - CROP) // 2, (cols - CROP) // 2
    return np.ascontiguousarray(echoes[..., r0 : r0 + CROP, c0 : c0 + CROP])


def test_shipped_manifest_carries_a_calibrated_confidence(shipped_manifest: ModelManifest) -> None:
    spec = shipped_manifest.confidence
    assert spec is not None
    assert 0 < spec.threshold < CONFIDENCE_MAX and spec.min_region_mm3 > 0
    assert shipped_manifest.confidence_path is not None
    assert sha256_of(shipped_manifest.confidence_path) == spec.statistics_sha256
    # Calibrated on validation subjects only: never on the seeds `evaluate` measures on.
    calibration = spec.calibration
    for seed in (*calibration["fit_seeds"], *calibration["check_seeds"]):
        assert 800_000 <= seed < 900_000
    assert calibration["operating_point"] > 0
    assert shipped_manifest.network_outputs == 2
    network = shipped_manifest.build_model()
    assert isinstance(network, ConfidentUNet3d) and not network.training


def test_manifest_confidence_section_round_trips(shipped_manifest: ModelManifest, model_copy: Path) -> None:
    data = shipped_manifest.to_dict()
    again = ModelManifest.from_dict(model_copy, json.loads(json.dumps(data)))
    assert again.confidence == shipped_manifest.confidence
    assert again.to_dict() == data
    written = ModelManifest.from_dict(model_copy, data)
    written.write()
    assert ModelManifest.load(model_copy).confidence == shipped_manifest.confidence


def test_tampered_statistics_are_refused_with_both_hashes(model_copy: Path) -> None:
    manifest = ModelManifest.load(model_copy)
    path = manifest.confidence_path
    assert path is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ConfidenceStatisticsError) as excinfo:
        ModelManifest.load(model_copy)
    message = str(excinfo.value)
    assert manifest.confidence_sha256 in message
    assert sha256_of(path) in message
    assert str(path) in message
    with pytest.raises(ConfidenceStatisticsError):
        manifest.build_model()  # a manifest loaded before the change still refuses, before deserialising


def test_statistics_that_do_not_fit_the_network_are_refused(model_copy: Path) -> None:
    """A file whose hash the manifest names but whose levels are not this network's (a model folder assembled from
    two models): refused naming the levels, not a shape error in the middle of a slab."""
    manifest = ModelManifest.load(model_copy)
    path = manifest.confidence_path
    assert path is not None
    state = torch.load(path, weights_only=True)
    first = next(k for k in state if k.endswith(".stride"))
    state[first] = torch.tensor(int(state[first]) * 2)
    torch.save(state, path)
    data = json.loads((model_copy / MANIFEST_NAME).read_text())
    data["confidence"]["statistics"]["sha256"] = sha256_of(path)
    (model_copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ConfidenceStatisticsError, match="levels"):
        ModelManifest.load(model_copy).build_model()


def test_statistics_reading_beyond_the_slab_halo_are_refused(model_copy: Path) -> None:
    """A neighbourhood 7 blocks deep across slices reads 20 slices each side, past the 16-slice halo: stitched slabs
    would not equal a whole-volume pass, so the model is refused naming the reach and the halo."""
    manifest = ModelManifest.load(model_copy)
    path = manifest.confidence_path
    assert path is not None
    state = torch.load(path, weights_only=True)
    state["taps.input.extractor.contexts"] = torch.tensor([[3, 3, 3], [7, 5, 5]])
    torch.save(state, path)
    data = json.loads((model_copy / MANIFEST_NAME).read_text())
    data["confidence"]["statistics"]["sha256"] = sha256_of(path)
    (model_copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ConfidenceStatisticsError) as excinfo:
        ModelManifest.load(model_copy).build_model()
    assert "reads 20 slices on each side, beyond the slab halo of 16" in str(excinfo.value)
    assert excinfo.value.found == 20


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        ({"method": "monte-carlo-dropout"}, "confidence.method"),
        ({"statistics": None}, "confidence.statistics"),
        ({"statistics": {"file": "confidence.pt", "sha256": "abc"}}, "confidence.statistics.sha256"),
        ({"threshold": 0}, "confidence.threshold"),
    ],
)
def test_bad_confidence_sections_are_refused_naming_the_attribute(
    shipped_manifest: ModelManifest, model_copy: Path, change: dict[str, object], attribute: str
) -> None:
    data = shipped_manifest.to_dict()
    data["confidence"] = {**data["confidence"], **change}
    with pytest.raises(ManifestError) as excinfo:
        ModelManifest.from_dict(model_copy, data)
    assert excinfo.value.attribute == attribute


def test_compiled_engines_are_keyed_by_the_statistics(
    shipped_manifest: ModelManifest, no_confidence_model: ModelManifest
) -> None:
    """A compiled engine carries the head and its statistics: another statistics file is another engine. An
    engine recorded before confidence existed stays valid for a model without one."""
    key = EngineKey.current(
        backend="torch-aot",
        precision="fp32",
        window=(2, 40, 64, 64),
        manifest=shipped_manifest,
        device=torch.device("cpu"),
    )
    plain = EngineKey.current(
        backend="torch-aot",
        precision="fp32",
        window=(2, 40, 64, 64),
        manifest=no_confidence_model,
        device=torch.device("cpu"),
    )
    assert key.confidence_sha256 == shipped_manifest.confidence_sha256 != ""
    assert plain.differences(key.to_dict()) == [
        f"confidence_sha256: found {key.confidence_sha256!r}, expected ''"
    ]
    older = {k: v for k, v in plain.to_dict().items() if k != "confidence_sha256"}
    assert plain.differences(older) == []
    assert key.differences(older) == [f"confidence_sha256: found '', expected {key.confidence_sha256!r}"]


def test_stitched_confidence_equals_a_whole_volume_pass(
    held_out_case: PhantomCase, shipped_manifest: ModelManifest
) -> None:
    """The halo covers the confidence's receptive field (its coarsest level upsampled) as it covers the HU's."""
    echoes = centre_crop(held_out_case.echoes)
    whole_hu, whole_confidence = whole_volume_outputs(shipped_manifest, echoes)
    assert whole_confidence is not None
    engine = SctEngine.load(shipped_manifest, backend=TorchEagerBackend.name, in_plane=(CROP, CROP))
    assert len(engine.plan(echoes.shape[1]).windows) > 1
    hu, confidence = engine.infer_volume_with_confidence(echoes)
    assert confidence.dtype == np.uint8 and confidence.shape == echoes.shape[1:]
    delta = np.abs(confidence.astype(np.int16) - whole_confidence.astype(np.int16))
    assert int(delta.max()) <= STITCH_TOLERANCE, f"at {np.unravel_index(delta.argmax(), delta.shape)}"
    assert float(np.abs(hu - whole_hu).max()) <= 1.0
    # Not vacuous: the crop spans typical tissue (255) and less typical voxels.
    assert int(confidence.max()) == CONFIDENCE_MAX
    assert int(confidence.min()) < CONFIDENCE_MAX - 30


def test_run_slab_writes_the_confidence_beside_the_hu(
    held_out_case: PhantomCase, shipped_manifest: ModelManifest
) -> None:
    """The agent's path: a filling device volume, one slab, int16 HU and uint8 confidence of the same pass."""
    echoes = centre_crop(held_out_case.echoes)
    engine = SctEngine.load(shipped_manifest, backend=TorchEagerBackend.name, in_plane=(CROP, CROP))
    assert engine.confidence == shipped_manifest.confidence
    hu_volume, confidence_volume = engine.infer_volume_with_confidence(echoes)
    plan = engine.plan(echoes.shape[1])
    volume = engine.new_volume(2, echoes.shape[1:])
    window = plan.windows[-1]
    for echo in range(2):
        for k in window.needed_slices:
            volume.put(echo, k, echoes[echo, k])
    shape = (window.core_stop - window.core_start, CROP, CROP)
    out, confidence_out = engine.new_output(shape), engine.new_confidence_output(shape)
    returned = engine.run_slab(volume, plan, window, engine.scale(echoes), out, confidence_out=confidence_out)
    assert returned is out
    np.testing.assert_array_equal(confidence_out, confidence_volume[window.core_start : window.core_stop])
    np.testing.assert_array_equal(
        out, np.rint(hu_volume[window.core_start : window.core_stop]).astype(np.int16)
    )
    with pytest.raises(ValueError, match="expected uint8"):
        engine.run_slab(
            volume,
            plan,
            window,
            engine.scale(echoes),
            confidence_out=np.zeros(shape, dtype=np.int16),
        )


@pytest.mark.slow
def test_screws_are_flagged_and_their_normal_twin_is_not(
    held_out_case: PhantomCase, shipped_manifest: ModelManifest
) -> None:
    """Pedicle screws (the pathology phantom) in a held-out subject: every screw and rod is inside a flagged
    region; the same subject without them has no flagged region at all."""
    spec = shipped_manifest.confidence
    assert spec is not None
    engine = SctEngine.load(shipped_manifest, backend=TorchEagerBackend.name)
    _, normal = engine.infer_volume_with_confidence(held_out_case.echoes)
    spacing = held_out_case.geometry.spacing
    assert find_flagged_regions(normal, spec, spacing).regions == ()
    screws = generate_case(held_out_case.seed, SEED_PROTOCOL, pathologies=(Pathology.SCREWS,))
    _, confidence = engine.infer_volume_with_confidence(screws.echoes)
    verdict = assess_case(
        confidence,
        spec,
        spacing,
        screws.labels,
        anomaly=screws.anomaly,
        object_names=[(o.name, o.kind.value) for o in screws.anomaly_objects],
        twin_confidence=normal,
    )
    assert len(verdict.objects) == len(screws.anomaly_objects) >= 2
    assert [o.name for o in verdict.objects if not o.detected] == []
    assert all(o.twin_score is not None and o.score > o.twin_score for o in verdict.objects)


def test_a_model_without_confidence_runs_as_before(
    held_out_case: PhantomCase, no_confidence_model: ModelManifest, shipped_manifest: ModelManifest
) -> None:
    manifest = no_confidence_model
    assert manifest.confidence is None and manifest.confidence_path is None and manifest.network_outputs == 1
    assert type(manifest.build_model()) is LightUNet3d
    assert "confidence" not in manifest.to_dict()
    echoes = centre_crop(held_out_case.echoes)
    engine = SctEngine.load(manifest, backend=TorchEagerBackend.name, in_plane=(CROP, CROP))
    assert engine.confidence is None
    plain = engine.infer_volume(echoes)
    with_confidence = SctEngine.load(shipped_manifest, backend=TorchEagerBackend.name, in_plane=(CROP, CROP))
    # The head only reads the network's features: the HU are those of the same network without it.
    np.testing.assert_array_equal(plain, with_confidence.infer_volume(echoes))
    plan = engine.plan(echoes.shape[1])
    volume = engine.new_volume(2, echoes.shape[1:])
    window = plan.windows[0]
    for echo in range(2):
        for k in window.needed_slices:
            volume.put(echo, k, echoes[echo, k])
    shape = (window.core_stop, CROP, CROP)
    slab = engine.run_slab(volume, plan, window, engine.scale(echoes))
    np.testing.assert_array_equal(slab, np.rint(plain[: window.core_stop]).astype(np.int16))
    with pytest.raises(ValueError, match="has no confidence"):
        engine.run_slab(
            volume, plan, window, engine.scale(echoes), confidence_out=engine.new_confidence_output(shape)
        )
    with pytest.raises(ValueError, match="has no confidence section"):
        engine.infer_volume_with_confidence(echoes)
    backend = TorchEagerBackend.load(manifest, engine.window_shape((CROP, CROP)), BackendOptions())
    assert backend.outputs == 1
