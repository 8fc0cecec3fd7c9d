"""Acceptance of a compiled engine: it must reproduce the fp32 eager reference on a stored phantom window.

Why: a compiler (TensorRT, inductor) may pick kernels, precisions and fusions that change the numbers, and a
driver or library update can change them again without any error. An engine is trusted only after it has been
run on a real input and compared with the trained model run exactly (fp32, eager, on the CPU). The input is a
window of a held-out phantom subject, cut to the engine's static shape; it and the reference output are computed
once per model and window shape and stored in the cache folder, so accepting an engine at every start costs one
inference, not a phantom simulation.

The rule is the manifest's: mean |ΔHU| within ``backend_tolerance_hu``, the same rule ``auto`` applies to the
manifest's recorded backend accuracies. The maximum and 99.9th percentile are recorded beside it. For a model with
a confidence output the engine computes it in the same pass, so it must reproduce that too: mean |Δconfidence|
within :data:`CONFIDENCE_TOLERANCE` (the compiled head is ordinary layers, so a broken one shows here).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engines.backends.base import InferenceBackend
from engines.model.manifest import ModelManifest
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.training.recipe import EVALUATION_SEED_BASE

logger = logging.getLogger(__name__)

#: A subject outside the training seeds and the ranges ``evaluate`` and the tests use.
ACCEPTANCE_SEED = EVALUATION_SEED_BASE + 700
ACCEPTANCE_FOLDER = "acceptance"
#: Mean |Δconfidence| (of 255) a compiled engine may show against fp32 eager. Reduced precision moves the features
#: the confidence is measured on; a head that is broken (overflow, a wrong buffer) is off by tens.
CONFIDENCE_TOLERANCE = 2.0


@dataclass(frozen=True, slots=True)
class AcceptanceResult:
    mean_abs_hu: float
    p999_abs_hu: float
    max_abs_hu: float
    tolerance_hu: float
    window: tuple[int, ...]
    #: Agreement of the confidence channel (0..255 units); None for a model without confidence.
    confidence_mean_abs: float | None = None
    confidence_max_abs: float | None = None

    @property
    def passed(self) -> bool:
        hu_ok = self.mean_abs_hu <= self.tolerance_hu
        return hu_ok and (
            self.confidence_mean_abs is None or self.confidence_mean_abs <= CONFIDENCE_TOLERANCE
        )

    def describe(self) -> str:
        verdict = "within" if self.mean_abs_hu <= self.tolerance_hu else "OUTSIDE"
        text = (
            f"mean |ΔHU| {self.mean_abs_hu:.3f} {verdict} tolerance {self.tolerance_hu} "
            f"(p99.9 {self.p999_abs_hu:.2f}, max {self.max_abs_hu:.2f} HU)"
        )
        if self.confidence_mean_abs is not None:
            inside = "within" if self.confidence_mean_abs <= CONFIDENCE_TOLERANCE else "OUTSIDE"
            text += (
                f", mean |Δconfidence| {self.confidence_mean_abs:.3f} {inside} tolerance {CONFIDENCE_TOLERANCE} "
                f"(max {self.confidence_max_abs})"
            )
        return text + " vs fp32 eager"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["window"] = list(self.window)
        data["passed"] = self.passed
        return data

    @classmethod
    def from_record(cls, data: dict[str, Any], tolerance_hu: float) -> AcceptanceResult:
        """Figures recorded when an engine was accepted, judged against ``tolerance_hu`` (the manifest's now)."""
        return cls(
            mean_abs_hu=float(data["mean_abs_hu"]),
            p999_abs_hu=float(data["p999_abs_hu"]),
            max_abs_hu=float(data["max_abs_hu"]),
            tolerance_hu=tolerance_hu,
            window=tuple(int(n) for n in data["window"]),
            confidence_mean_abs=_optional_float(data.get("confidence_mean_abs")),
            confidence_max_abs=_optional_float(data.get("confidence_max_abs")),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True, eq=False)
class AcceptanceSample:
    """A normalised network input of the engine's window shape and the fp32 eager output for it."""

    window: npt.NDArray[np.float32]
    reference: npt.NDArray[np.float32]


def acceptance_sample(
    manifest: ModelManifest, shape: tuple[int, int, int, int], cache_dir: Path
) -> AcceptanceSample:
    """The stored sample for this model and window shape, made (phantom + fp32 eager pass) on first use."""
    folder = cache_dir / ACCEPTANCE_FOLDER
    model_hash = manifest.weights_sha256[:16] + (
        f"-c{manifest.confidence_sha256[:16]}" if manifest.confidence_sha256 else ""
    )
    path = folder / f"{model_hash}-{'x'.join(map(str, shape))}.npz"
    if path.exists():
        try:
            with np.load(path) as stored:
                sample = AcceptanceSample(stored["window"], stored["reference"])
            if sample.window.shape == shape and sample.reference.shape == (
                manifest.network_outputs,
                *shape[1:],
            ):
                return sample
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("acceptance sample %s unreadable (%s); making it again", path, exc)
    logger.info("making the acceptance sample for window %s (phantom seed %d)", shape, ACCEPTANCE_SEED)
    window = phantom_window(manifest, shape)
    model = manifest.build_model()
    with torch.inference_mode():
        reference = model(torch.from_numpy(window)[None])[0].numpy()
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, window=window, reference=reference)
    partial.replace(path)
    return AcceptanceSample(window, np.ascontiguousarray(reference, dtype=np.float32))


def phantom_window(manifest: ModelManifest, shape: tuple[int, int, int, int]) -> npt.NDArray[np.float32]:
    """The held-out phantom's centre, cut (or edge-padded) to ``shape``, normalised as the engine normalises."""
    case = generate_case(ACCEPTANCE_SEED, SEED_PROTOCOL)
    echoes = case.echoes
    channels, depth, rows, cols = shape
    if echoes.shape[0] != channels:
        raise ValueError(f"acceptance window: found {echoes.shape[0]} echoes, the engine takes {channels}")
    indices = [
        _centred(n_have, n_want) for n_have, n_want in zip(echoes.shape[1:], (depth, rows, cols), strict=True)
    ]
    window = echoes[:, indices[0]][:, :, indices[1]][:, :, :, indices[2]].astype(np.float32)
    window *= np.float32(1.0 / manifest.normalisation.scale(echoes))
    return np.ascontiguousarray(window)


def _centred(have: int, want: int) -> npt.NDArray[np.intp]:
    """``want`` indices centred on an axis of ``have``, edges repeated where the axis is shorter."""
    start = (have - want) // 2
    return np.clip(np.arange(start, start + want), 0, have - 1)


def accept(backend: InferenceBackend, sample: AcceptanceSample) -> AcceptanceResult:
    """Run the sample through ``backend`` and compare with the reference: HU, and confidence where there is one."""
    manifest = backend.manifest
    out = backend.infer_outputs(sample.window).astype(np.float32)
    delta = np.abs(out[0] - sample.reference[0]) * np.float32(manifest.hu_scale)
    confidence_mean: float | None = None
    confidence_max: float | None = None
    if manifest.network_outputs > 1:
        # Compared as the engine publishes it: rounded to the uint8 the agent sees.
        found = np.clip(np.rint(out[1]), 0, 255)
        expected = np.clip(np.rint(sample.reference[1]), 0, 255)
        confidence_delta = np.abs(found - expected)
        confidence_mean = round(float(confidence_delta.mean()), 4)
        confidence_max = round(float(confidence_delta.max()), 1)
    return AcceptanceResult(
        mean_abs_hu=round(float(delta.mean()), 4),
        p999_abs_hu=round(float(np.percentile(delta, 99.9)), 3),
        max_abs_hu=round(float(delta.max()), 3),
        tolerance_hu=manifest.backend_tolerance_hu,
        window=tuple(sample.window.shape),
        confidence_mean_abs=confidence_mean,
        confidence_max_abs=confidence_max,
    )
