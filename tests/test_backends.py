"""Backends agree with the fp32 eager reference, refuse what they cannot run, and ``auto`` follows its rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engines.backends.aot_inductor import TorchAotBackend
from engines.backends.base import BackendOptions, BackendUnavailableError, Precision
from engines.backends.cpu_features import accelerated_precisions, native_precisions
from engines.backends.onnx_runtime import OnnxRuntimeBackend
from engines.backends.registry import accuracy_key, load_backend, resolve_auto
from engines.backends.torch_cpu import TorchEagerBackend, TorchOptimisedBackend
from engines.inference.slabs import SlabPlan, pad_in_plane
from engines.model.manifest import ModelManifest
from engines.phantom.case import PhantomCase

#: In-plane crop around the image centre (through the spine) that keeps compile and run times short.
CROP = 160
#: Two fp32 implementations of the same network differ only by summation order.
FP32_AGREEMENT_HU = 0.05
#: The uint8 confidence of two fp32 implementations: a value on a half-unit boundary may round either way.
FP32_AGREEMENT_CONFIDENCE = 1
#: Mean |Δconfidence| of a reduced-precision backend (as ``acceptance.CONFIDENCE_TOLERANCE``).
REDUCED_AGREEMENT_CONFIDENCE = 2.0


@pytest.fixture(scope="module")
def window(held_out_case: PhantomCase, shipped_manifest: ModelManifest) -> np.ndarray:
    echoes = held_out_case.echoes
    plan = SlabPlan.for_volume(echoes.shape[1], shipped_manifest.slab.depth, shipped_manifest.slab.halo)
    middle = plan.windows[len(plan.windows) // 2]
    rows, cols = echoes.shape[-2:]
    r0, c0 = (rows - CROP) // 2, (cols - CROP) // 2
    x = np.take(echoes, plan.slice_indices(middle), axis=1)[:, :, r0 : r0 + CROP, c0 : c0 + CROP]
    scaled = x.astype(np.float32) / np.float32(shipped_manifest.normalisation.scale(echoes))
    return pad_in_plane(scaled, shipped_manifest.architecture.downsampling_factor)


@pytest.fixture(scope="module")
def reference_outputs(window: np.ndarray, shipped_manifest: ModelManifest) -> np.ndarray:
    """fp32 eager: HU / hu_scale and the confidence channel (the shipped model has one)."""
    backend = TorchEagerBackend.load(shipped_manifest, window.shape, BackendOptions())
    outputs = backend.infer_outputs(window)
    assert outputs.shape == (2, *window.shape[1:])
    return outputs


@pytest.fixture(scope="module")
def reference_hu(reference_outputs: np.ndarray, shipped_manifest: ModelManifest) -> np.ndarray:
    hu: np.ndarray = reference_outputs[0] * np.float32(shipped_manifest.hu_scale)
    return hu


def confidence_delta(outputs: np.ndarray, reference_outputs: np.ndarray) -> np.ndarray:
    """|Δ| of the confidence channel as the engine publishes it (rounded to uint8)."""
    found = np.clip(np.rint(outputs[1]), 0, 255)
    expected = np.clip(np.rint(reference_outputs[1]), 0, 255)
    assert float(expected.min()) < 255  # the window holds less typical voxels: not a vacuous comparison
    delta: np.ndarray = np.abs(found - expected)
    return delta


def test_optimised_backend_agrees_with_eager(
    window: np.ndarray,
    reference_hu: np.ndarray,
    reference_outputs: np.ndarray,
    shipped_manifest: ModelManifest,
    tmp_path: Path,
) -> None:
    _, precision, _ = resolve_auto(shipped_manifest)
    backend = load_backend(
        TorchOptimisedBackend.name,
        shipped_manifest,
        window.shape,
        BackendOptions(precision=precision, cache_dir=tmp_path),
    )
    assert backend.info.precision == precision.value
    assert backend.info.warmup_s > 0
    outputs = backend.infer_outputs(window)
    delta = np.abs(outputs[0] * np.float32(shipped_manifest.hu_scale) - reference_hu)
    assert float(delta.mean()) <= shipped_manifest.backend_tolerance_hu
    confidence = confidence_delta(outputs, reference_outputs)
    assert float(confidence.mean()) <= REDUCED_AGREEMENT_CONFIDENCE
    if precision is Precision.FP32:
        assert float(delta.max()) <= FP32_AGREEMENT_HU
        assert float(confidence.max()) <= FP32_AGREEMENT_CONFIDENCE


def test_onnxruntime_agrees_with_eager(
    window: np.ndarray,
    reference_hu: np.ndarray,
    reference_outputs: np.ndarray,
    shipped_manifest: ModelManifest,
    tmp_path: Path,
) -> None:
    backend = OnnxRuntimeBackend.load(
        shipped_manifest, window.shape, BackendOptions(threads=2, cache_dir=tmp_path)
    )
    outputs = backend.infer_outputs(window)
    delta = np.abs(outputs[0] * np.float32(shipped_manifest.hu_scale) - reference_hu)
    assert float(delta.max()) <= FP32_AGREEMENT_HU
    assert float(confidence_delta(outputs, reference_outputs).max()) <= FP32_AGREEMENT_CONFIDENCE
    assert Path(backend.info.details["onnx_file"]).is_file()


def test_window_of_another_shape_is_refused(shipped_manifest: ModelManifest) -> None:
    shape = (2, shipped_manifest.slab.depth + 2 * shipped_manifest.slab.halo, 16, 16)
    backend = TorchEagerBackend.load(shipped_manifest, shape, BackendOptions())
    with pytest.raises(ValueError, match=r"slab window shape \(2, .*, 24, 16\) differs from the shape"):
        backend.infer(np.zeros((shape[0], shape[1], 24, 16), dtype=np.float32))


def test_bad_backend_requests_are_named(shipped_manifest: ModelManifest) -> None:
    with pytest.raises(ValueError, match="backend: found 'tensorrt-cpu', expected one of auto, torch-eager"):
        load_backend("tensorrt-cpu", shipped_manifest, (2, 16, 16, 16))
    with pytest.raises(ValueError, match="input channels: found 3"):
        load_backend(TorchEagerBackend.name, shipped_manifest, (3, 16, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        load_backend(TorchEagerBackend.name, shipped_manifest, (2, 16, 12, 16))
    with pytest.raises(ValueError, match="runs fp32 only"):
        load_backend(
            TorchEagerBackend.name, shipped_manifest, (2, 8, 8, 8), BackendOptions(precision=Precision.BF16)
        )


def test_non_native_precision_is_unavailable(shipped_manifest: ModelManifest) -> None:
    missing = [p for p in Precision if p not in native_precisions()]
    if not missing:
        pytest.skip("this CPU runs every precision natively")
    with pytest.raises(BackendUnavailableError, match=f"precision {missing[0].value} is not native"):
        load_backend(
            TorchOptimisedBackend.name, shipped_manifest, (2, 8, 8, 8), BackendOptions(precision=missing[0])
        )


def test_auto_picks_the_fastest_native_precision_within_tolerance(shipped_manifest: ModelManifest) -> None:
    def with_accuracy(records: dict[str, dict[str, float]]) -> ModelManifest:
        return dataclasses.replace(shipped_manifest, backend_accuracy=records)

    assert resolve_auto(with_accuracy({}))[:2] == (TorchAotBackend.name, Precision.FP32)
    good = {
        accuracy_key(TorchOptimisedBackend.name, p): {"mean_abs_hu": 0.1}
        for p in (Precision.FP16, Precision.BF16)
    }
    expected = next(
        (p for p in (Precision.FP16, Precision.BF16) if p in accelerated_precisions()), Precision.FP32
    )
    faster = TorchOptimisedBackend.name if expected is not Precision.FP32 else TorchAotBackend.name
    assert resolve_auto(with_accuracy(good))[:2] == (faster, expected)
    too_far = shipped_manifest.backend_tolerance_hu + 1
    bad = {k: {"mean_abs_hu": too_far} for k in good}
    assert resolve_auto(with_accuracy(bad))[1] is Precision.FP32
