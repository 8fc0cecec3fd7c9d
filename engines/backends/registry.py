"""Backend names as configuration spells them, and the ``auto`` rule that picks one.

``auto`` tries, in order, and logs why each was taken or passed over:

1. ``tensorrt`` fp16, then ``torch-cuda`` fp16, on a GPU: each is used only if its libraries and a GPU are
   present and its compiled engine passes acceptance against the fp32 reference (``cached_backend``); otherwise
   it says why in one line and ``auto`` moves on;
2. the embedded CPU default: the fastest configuration that is (a) accelerated on this CPU (AMX or AVX512-FP16;
   see cpu_features) and (b) recorded in the model's manifest as agreeing with fp32 eager within
   ``backend_tolerance_hu``. Without such units the choice is fp32, which is exact, as an AOTInductor package
   (``torch-aot``, run in its own worker process): bench/engine.py measured it as fast per slab as
   ``torch-optimised`` fp32 (11.40 s against 11.70 s on our 2 cores), and a restart loads the cached package in
   seconds where ``torch.compile`` takes 30 to 50 s at every start. Where the package cannot be built or
   accepted, ``auto`` says why and takes ``torch-optimised`` fp32. Speed order measured by bench/engine.py:
   optimised fp16 ≈ bf16 (with AMX) < AOT fp32 ≈ optimised fp32 < ONNX Runtime < eager fp32.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from engines.backends.aot_inductor import TorchAotBackend
from engines.backends.base import BackendOptions, BackendUnavailableError, InferenceBackend, Precision
from engines.backends.cached_backend import CachedEngineBackend, CachedEngineState
from engines.backends.cpu_features import accelerated_precisions
from engines.backends.onnx_runtime import OnnxRuntimeBackend
from engines.backends.tensorrt import TensorRtBackend
from engines.backends.torch_cpu import TorchEagerBackend, TorchOptimisedBackend
from engines.backends.torch_cuda import TorchCudaBackend
from engines.backends.triton_client import TritonBackend
from engines.model.manifest import ModelManifest

logger = logging.getLogger(__name__)

AUTO = "auto"
BACKENDS: dict[str, type[InferenceBackend]] = {
    cls.name: cls
    for cls in (
        TorchEagerBackend,
        TorchOptimisedBackend,
        TorchAotBackend,
        OnnxRuntimeBackend,
        TorchCudaBackend,
        TensorRtBackend,
        TritonBackend,
    )
}
#: GPU candidates ``auto`` tries before the CPU default, fastest first.
GPU_AUTO_ORDER = ((TensorRtBackend.name, Precision.FP16), (TorchCudaBackend.name, Precision.FP16))
#: Candidates for ``auto``, fastest first.
_AUTO_ORDER = (
    (TorchOptimisedBackend.name, Precision.FP16),
    (TorchOptimisedBackend.name, Precision.BF16),
    (TorchAotBackend.name, Precision.FP32),
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
                "no faster precision accelerated on this CPU and within tolerance; fp32 is exact, and as an "
                "AOTInductor package it runs as fast as torch.compile and starts from its cache in seconds",
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
    if name == TritonBackend.name:
        return _load_remote(manifest, input_shape, options)
    if name != AUTO:
        return _backend_class(name).load(manifest, input_shape, options)
    passed_over: list[str] = []
    for gpu_name, precision in GPU_AUTO_ORDER:
        try:
            backend = _backend_class(gpu_name).load(
                manifest, input_shape, dataclasses.replace(options, precision=precision)
            )
        except BackendUnavailableError as exc:
            logger.info("backend auto: passing over %s %s: %s", gpu_name, precision.value, exc)
            passed_over.append(str(exc))
            continue
        logger.info("backend auto -> %s %s (GPU engine accepted)", gpu_name, precision.value)
        backend.passed_over = passed_over
        return backend
    cpu_name, precision, why = resolve_auto(manifest)
    logger.info("backend auto -> %s %s (%s)", cpu_name, precision.value, why)
    cpu_options = dataclasses.replace(options, precision=precision)
    try:
        backend = _backend_class(cpu_name).load(manifest, input_shape, cpu_options)
    except BackendUnavailableError as exc:
        if cpu_name == TorchOptimisedBackend.name:
            raise
        # A package that cannot be built, loaded or accepted here: the same precision, compiled at every start.
        logger.warning("backend auto: passing over %s %s: %s", cpu_name, precision.value, exc)
        passed_over.append(str(exc))
        backend = TorchOptimisedBackend.load(manifest, input_shape, cpu_options)
    backend.passed_over = passed_over
    return backend


def _load_remote(
    manifest: ModelManifest, input_shape: tuple[int, int, int, int], options: BackendOptions
) -> TritonBackend:
    """The ``triton`` backend, and the local backend it falls back to when the link names one (loaded and warmed
    first, so that the first window the server fails costs no compile)."""
    link = options.remote
    local = None
    if link is not None and link.fallback:
        if link.fallback == TritonBackend.name:
            raise ValueError("triton.fallback: found 'triton', expected a local backend or auto")
        local = load_backend(link.fallback, manifest, input_shape, dataclasses.replace(options, remote=None))
    try:
        backend = TritonBackend.load(manifest, input_shape, options)
    except BaseException:
        if local is not None:
            local.close()
        raise
    backend.fallback = local
    return backend


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """The backend ``load_backend`` would start with, and what the engine cache holds for it."""

    backend: str
    precision: str
    #: None where the backend keeps no compiled engine in the cache (it runs eagerly, or compiles at each start).
    cache: CachedEngineState | None
    #: Why ``auto`` passed over faster backends, one line each.
    passed_over: tuple[str, ...]
    #: Why this backend: "configured", or the ``auto`` rule's reason.
    why: str


def inspect_engine(
    name: str,
    manifest: ModelManifest,
    input_shape: tuple[int, int, int, int],
    options: BackendOptions = BackendOptions(),
) -> EngineChoice:
    """Follow :func:`load_backend`'s choice for ``name`` without building or loading an engine (``sct-agent
    doctor``). Raises :class:`BackendUnavailableError` where ``load_backend`` would for a backend named
    explicitly. ``auto`` may still move on at start if the candidate's engine fails acceptance when built."""
    if name != AUTO:
        return _inspect(_backend_class(name), manifest, input_shape, options, (), "configured")
    passed_over: list[str] = []
    for gpu_name, precision in GPU_AUTO_ORDER:
        try:
            return _inspect(
                _backend_class(gpu_name),
                manifest,
                input_shape,
                dataclasses.replace(options, precision=precision),
                passed_over,
                "the first GPU backend available here",
            )
        except BackendUnavailableError as exc:
            passed_over.append(str(exc))
    cpu_name, precision, why = resolve_auto(manifest)
    return _inspect(
        _backend_class(cpu_name),
        manifest,
        input_shape,
        dataclasses.replace(options, precision=precision),
        passed_over,
        why,
    )


def _inspect(
    cls: type[InferenceBackend],
    manifest: ModelManifest,
    input_shape: tuple[int, int, int, int],
    options: BackendOptions,
    passed_over: list[str] | tuple[str, ...],
    why: str,
) -> EngineChoice:
    if issubclass(cls, CachedEngineBackend):
        state = cls.inspect_cache(manifest, input_shape, options)
        return EngineChoice(cls.name, state.precision, state, tuple(passed_over), why)
    precision = options.precision or cls.default_precision
    return EngineChoice(cls.name, precision.value, None, tuple(passed_over), why)


def _backend_class(name: str) -> type[InferenceBackend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend: found {name!r}, expected one of {', '.join([AUTO, *BACKENDS])}") from None
