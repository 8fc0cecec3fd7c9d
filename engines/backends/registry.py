"""Backend names as configuration spells them, and the ``auto`` rule that picks the embedded default.

``auto`` = the fastest CPU configuration that is (a) accelerated on this CPU (AMX or AVX512-FP16; see
cpu_features) and (b) recorded in the model's manifest as agreeing with fp32 eager within
``backend_tolerance_hu``. Without such units the choice is optimised fp32, which is exact. Speed order measured
by bench/engine.py: optimised fp16 ≈ bf16 (with AMX) < optimised fp32 < ONNX Runtime < eager fp32.
"""

from __future__ import annotations

import logging

from engines.backends.base import BackendOptions, InferenceBackend, Precision
from engines.backends.cpu_features import accelerated_precisions
from engines.backends.onnx_runtime import OnnxRuntimeBackend
from engines.backends.torch_cpu import TorchEagerBackend, TorchOptimisedBackend
from engines.model.manifest import ModelManifest

logger = logging.getLogger(__name__)

AUTO = "auto"
BACKENDS: dict[str, type[InferenceBackend]] = {
    cls.name: cls for cls in (TorchEagerBackend, TorchOptimisedBackend, OnnxRuntimeBackend)
}
#: Candidates for ``auto``, fastest first.
_AUTO_ORDER = (
    (TorchOptimisedBackend.name, Precision.FP16),
    (TorchOptimisedBackend.name, Precision.BF16),
    (TorchOptimisedBackend.name, Precision.FP32),
)


def accuracy_key(backend: str, precision: Precision) -> str:
    return f"{backend}/{precision.value}"


def resolve_auto(manifest: ModelManifest) -> tuple[str, Precision, str]:
    """(backend, precision, why) chosen by the ``auto`` rule."""
    fast = accelerated_precisions()
    for name, precision in _AUTO_ORDER:
        if precision not in fast:
            continue
        if precision is Precision.FP32:
            return (
                name,
                precision,
                "no faster precision accelerated on this CPU and within tolerance; fp32 is exact",
            )
        record = manifest.backend_accuracy.get(accuracy_key(name, precision))
        if record is None:
            continue
        mean_abs = float(record.get("mean_abs_hu", float("inf")))
        if mean_abs <= manifest.backend_tolerance_hu:
            return (
                name,
                precision,
                (
                    f"accelerated on this CPU, mean |ΔHU| {mean_abs:.2f} <= tolerance {manifest.backend_tolerance_hu}"
                ),
            )
    raise AssertionError("fp32 is always native")  # pragma: no cover


def load_backend(
    name: str,
    manifest: ModelManifest,
    input_shape: tuple[int, int, int, int],
    options: BackendOptions = BackendOptions(),
) -> InferenceBackend:
    """Load, warm up and return backend ``name`` (or the ``auto`` choice) for windows of ``input_shape``."""
    if name == AUTO:
        name, precision, why = resolve_auto(manifest)
        options = BackendOptions(threads=options.threads, precision=precision, cache_dir=options.cache_dir)
        logger.info("backend auto -> %s %s (%s)", name, precision.value, why)
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend: found {name!r}, expected one of {', '.join([AUTO, *BACKENDS])}") from None
    return cls.load(manifest, input_shape, options)
