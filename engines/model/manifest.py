"""The model manifest: what a set of weights is, what it expects, what it may be used for, and proof of identity.

A model folder holds ``manifest.json`` and the weights file it names. Loading checks the weights' sha256 before
anything deserialises them, so a corrupted, truncated or swapped file is refused with both hashes in the message.
The agent runs a model only on series that pass one of ``validated_protocols``; a site model is dropped in as a
folder with its own manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.confidence.density import METHOD as FEATURE_DENSITY_METHOD
from engines.confidence.density import ConfidentUNet3d, FeatureDensity, head_levels_wrong, tap_levels
from engines.confidence.spec import ConfidenceSpec, ConfidenceSpecError
from engines.model.normalisation import Normalisation
from engines.model.unet import LightUNet3d, UNetConfig
from sct_core.errors import SctError

MANIFEST_NAME = "manifest.json"
#: Major version of the manifest schema this code reads; a higher major is refused, minors are compatible.
SCHEMA_VERSION = "1.0"
#: Folder of the model shipped in the package (the embedded default).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
_HASH_CHUNK = 1 << 20


class ManifestError(SctError, ValueError):
    """The manifest is missing, unreadable or names a field with a value this code cannot use."""

    def __init__(
        self, message: str, *, attribute: str = "model manifest", found: object = None, expected: str = ""
    ) -> None:
        super().__init__(message, attribute=attribute, found=found, expected=expected)


class WeightsIntegrityError(ManifestError):
    """The weights file is missing or its sha256 differs from the manifest's."""


class ConfidenceStatisticsError(WeightsIntegrityError):
    """The confidence statistics file is missing, its sha256 differs from the manifest's, or it does not fit the
    network. Refused like weights: a tampered file would silently change what the product flags."""


@dataclass(frozen=True, slots=True)
class SlabSpec:
    """Slabs along the slice axis: ``depth`` output slices each, computed with ``halo`` extra slices per side."""

    depth: int
    halo: int

    def check(self, alignment: int) -> None:
        for name, value in (("depth", self.depth), ("halo", self.halo)):
            if value < (1 if name == "depth" else 0) or value % alignment:
                raise ManifestError(
                    f"slab.{name}: found {value}, expected a {'positive ' if name == 'depth' else ''}"
                    f"multiple of {alignment} (the network's downsampling factor)"
                )


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """Parsed ``manifest.json``; see docs/model.md for every field."""

    folder: Path
    model_id: str
    version: str
    weights_file: str
    weights_sha256: str
    architecture: UNetConfig
    normalisation: Normalisation
    #: Echo times the model was trained around, ms, in channel order (channel i = i-th shortest TE).
    echo_times_ms: tuple[float, ...]
    #: (slice, row, column) voxel spacing of the training data, mm.
    spacing_mm: tuple[float, float, float]
    orientation: str
    #: (rows, columns) of the training grid; backends warm up for this in-plane size.
    matrix: tuple[int, int]
    hu_range: tuple[float, float]
    hu_scale: float
    slab: SlabSpec
    validated_protocols: tuple[str, ...]
    #: Largest mean |ΔHU| against fp32 eager that a faster backend may show and still be used.
    backend_tolerance_hu: float
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    #: Measured agreement of each ``backend/precision`` with fp32 eager on a held-out phantom:
    #: ``{"torch-optimised/fp16": {"mean_abs_hu": .., "max_abs_hu": ..}}``. Lets ``auto`` pick the fastest
    #: precision the model tolerates without re-measuring at every start.
    backend_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The optional ``confidence`` section: how the model says where not to trust it (None: it does not).
    confidence: ConfidenceSpec | None = None
    schema_version: str = SCHEMA_VERSION

    @property
    def weights_path(self) -> Path:
        return self.folder / self.weights_file

    @property
    def label(self) -> str:
        return f"{self.model_id} {self.version}"

    @property
    def confidence_path(self) -> Path | None:
        """The confidence statistics file, None for a model without confidence."""
        if self.confidence is None or not self.confidence.statistics_file:
            return None
        return self.folder / self.confidence.statistics_file

    @property
    def confidence_sha256(self) -> str:
        """sha256 of the confidence statistics ("" without): part of every compiled engine's identity."""
        return self.confidence.statistics_sha256 if self.confidence is not None else ""

    @property
    def network_outputs(self) -> int:
        """Channels the network returns: HU, and the confidence when the model has one."""
        return 2 if self.confidence is not None else 1

    @classmethod
    def load(cls, folder: Path) -> ModelManifest:
        """Read and check ``folder/manifest.json``, including the weights hash."""
        path = folder / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no model manifest here") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
        manifest = cls.from_dict(folder, data)
        manifest.verify_weights()
        manifest.verify_confidence()
        return manifest

    @classmethod
    def from_dict(cls, folder: Path, data: dict[str, Any]) -> ModelManifest:
        reader = _Reader(folder / MANIFEST_NAME, data)
        schema = reader.text("schema_version")
        supported = SCHEMA_VERSION.split(".", maxsplit=1)[0]
        if schema.split(".", maxsplit=1)[0] != supported:
            raise ManifestError(
                f"{reader.path}: schema_version found {schema!r}, this agent reads {supported}.x"
            )
        arch = reader.obj("architecture")
        if arch.get("name") != "LightUNet3d":
            raise ManifestError(
                f"{reader.path}: architecture.name found {arch.get('name')!r}, expected 'LightUNet3d'"
            )
        try:
            architecture = UNetConfig(
                in_channels=int(arch["in_channels"]),
                out_channels=int(arch["out_channels"]),
                channels=tuple(int(c) for c in arch["channels"]),
                planar_levels=int(arch.get("planar_levels", 0)),
            )
            normalisation = Normalisation.from_dict(reader.obj("input")["normalisation"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{reader.path}: {exc}") from exc
        inp = reader.obj("input")
        out = reader.obj("output")
        slab_d = reader.obj("slab")
        slab = SlabSpec(depth=int(slab_d.get("depth", 0)), halo=int(slab_d.get("halo", -1)))
        slab.check(architecture.downsampling_factor)
        weights = reader.obj("weights")
        sha = str(weights.get("sha256", ""))
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ManifestError(
                f"{reader.path}: weights.sha256 found {sha!r}, expected 64 lowercase hex digits"
            )
        echo_times = tuple(float(t) for t in inp.get("echo_times_ms", ()))
        if len(echo_times) != architecture.in_channels:
            raise ManifestError(
                f"{reader.path}: input.echo_times_ms has {len(echo_times)} values, "
                f"architecture.in_channels is {architecture.in_channels}"
            )
        hu_range = tuple(float(v) for v in out.get("hu_range", ()))
        if len(hu_range) != 2 or not hu_range[0] < hu_range[1]:
            raise ManifestError(f"{reader.path}: output.hu_range found {hu_range}, expected [low, high]")
        if out.get("units") != "HU":
            raise ManifestError(f"{reader.path}: output.units found {out.get('units')!r}, expected 'HU'")
        protocols = tuple(str(p) for p in data.get("validated_protocols", ()))
        if not protocols:
            raise ManifestError(
                f"{reader.path}: validated_protocols is empty; a model must name the protocols it was validated on"
            )
        tolerance = float(data.get("backend_tolerance_hu", math.nan))
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ManifestError(f"{reader.path}: backend_tolerance_hu found {tolerance}, expected > 0")
        confidence = _confidence(reader.path, data.get("confidence"))
        return cls(
            folder=folder,
            model_id=reader.text("model_id"),
            version=reader.text("version"),
            weights_file=str(weights.get("file", "")) or "weights.pt",
            weights_sha256=sha,
            architecture=architecture,
            normalisation=normalisation,
            echo_times_ms=echo_times,
            spacing_mm=_triple(reader.path, "input.spacing_mm", inp.get("spacing_mm")),
            orientation=str(inp.get("orientation", "")),
            matrix=_matrix(reader.path, inp.get("matrix")),
            hu_range=(hu_range[0], hu_range[1]),
            hu_scale=float(out.get("hu_scale", 1000.0)),
            slab=slab,
            validated_protocols=protocols,
            backend_tolerance_hu=tolerance,
            training=dict(data.get("training", {})),
            validation=dict(data.get("validation", {})),
            backend_accuracy={str(k): dict(v) for k, v in dict(data.get("backend_accuracy", {})).items()},
            confidence=confidence,
            schema_version=schema,
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "model_id": self.model_id,
            "version": self.version,
            "synthetic_output": True,
            "weights": {
                "file": self.weights_file,
                "sha256": self.weights_sha256,
                "format": "torch-state-dict",
            },
            "architecture": {
                "name": "LightUNet3d",
                "in_channels": self.architecture.in_channels,
                "out_channels": self.architecture.out_channels,
                "channels": list(self.architecture.channels),
                "planar_levels": self.architecture.planar_levels,
            },
            "input": {
                "channel_order": "echo magnitudes in order of increasing echo time",
                "echo_times_ms": list(self.echo_times_ms),
                "spacing_mm": list(self.spacing_mm),
                "spacing_axes": "slice, row, column",
                "orientation": self.orientation,
                "matrix": list(self.matrix),
                "normalisation": self.normalisation.to_dict(),
            },
            "output": {"units": "HU", "hu_scale": self.hu_scale, "hu_range": list(self.hu_range)},
            "slab": {"depth": self.slab.depth, "halo": self.slab.halo},
            "validated_protocols": list(self.validated_protocols),
            "backend_tolerance_hu": self.backend_tolerance_hu,
            "backend_accuracy": self.backend_accuracy,
            "training": self.training,
            "validation": self.validation,
        }
        if self.confidence is not None:
            data["confidence"] = self.confidence.to_dict()
        return data

    def write(self) -> Path:
        path = self.folder / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def verify_weights(self) -> None:
        try:
            found = sha256_of(self.weights_path)
        except OSError as exc:
            raise WeightsIntegrityError(f"{self.weights_path}: weights unreadable ({exc})") from exc
        if found != self.weights_sha256:
            raise WeightsIntegrityError(
                f"{self.weights_path}: weights sha256 is {found}, the manifest of {self.label} requires "
                f"{self.weights_sha256}; refusing to load weights that are not the validated ones"
            )

    def verify_confidence(self) -> None:
        """Check the confidence statistics' sha256 (nothing to check without a confidence section)."""
        path = self.confidence_path
        if path is None:
            return
        try:
            found = sha256_of(path)
        except OSError as exc:
            raise ConfidenceStatisticsError(
                f"{path}: confidence statistics unreadable ({exc})",
                attribute="confidence.statistics.sha256",
                found="unreadable",
                expected=self.confidence_sha256,
            ) from exc
        if found != self.confidence_sha256:
            raise ConfidenceStatisticsError(
                f"{path}: confidence statistics sha256 is {found}, the manifest of {self.label} requires "
                f"{self.confidence_sha256}; refusing statistics that are not the calibrated ones",
                attribute="confidence.statistics.sha256",
                found=found,
                expected=self.confidence_sha256,
            )

    def build_unet(self) -> LightUNet3d:
        """The sCT network alone in eval mode with verified weights loaded (fp32, CPU); calibration reads its
        features."""
        self.verify_weights()
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        model = LightUNet3d(self.architecture)
        model.load_state_dict(state)
        return model.eval()

    def build_confidence_head(self) -> FeatureDensity:
        """The calibrated confidence head (verified statistics), for a model with a confidence section."""
        path = self.confidence_path
        if path is None:
            raise ManifestError(
                f"{self.folder / MANIFEST_NAME}: {self.label} has no confidence statistics",
                attribute="confidence.statistics",
                found=None,
                expected="a statistics file",
            )
        self.verify_confidence()
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            head = FeatureDensity.from_state_dict(state)
        except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
            raise ConfidenceStatisticsError(
                f"{path}: confidence statistics do not form a confidence head ({exc})",
                attribute="confidence.statistics",
                found=type(exc).__name__,
                expected="the buffers of a feature-density head",
            ) from exc
        return head

    def build_model(self) -> nn.Module:
        """The network every backend runs, in eval mode, with verified weights (and statistics) loaded (fp32,
        CPU): the sCT network, or with a confidence section the sCT network and its confidence head, whose output
        has :attr:`network_outputs` channels (HU / hu_scale, then confidence 0..255)."""
        unet = self.build_unet()
        if self.confidence is None:
            return unet
        head = self.build_confidence_head()
        levels = tap_levels(self.architecture)
        wrong = head_levels_wrong(head, self.architecture)
        if wrong:
            raise ConfidenceStatisticsError(
                f"{self.confidence_path}: confidence statistics for levels (channels, stride) {wrong}; this "
                f"network's levels are {levels}",
                attribute="confidence.statistics",
                found=wrong,
                expected=f"levels of {levels}",
            )
        reach = head.slice_reach()
        if reach > self.slab.halo:
            raise ConfidenceStatisticsError(
                f"{self.confidence_path}: the confidence reads {reach} slices on each side, beyond the slab halo "
                f"of {self.slab.halo}: stitched slabs would differ from a whole-volume pass",
                attribute="confidence.statistics",
                found=reach,
                expected=f"at most slab.halo = {self.slab.halo} slices",
            )
        return ConfidentUNet3d(unet, head).eval()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def default_manifest() -> ModelManifest:
    """The embedded default model shipped in the package."""
    return ModelManifest.load(DEFAULT_MODEL_DIR)


class _Reader:
    def __init__(self, path: Path, data: Any) -> None:
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object, found {type(data).__name__}")
        self.path = path
        self.data: dict[str, Any] = data

    def text(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value:
            raise ManifestError(f"{self.path}: {key} found {value!r}, expected a non-empty string")
        return value

    def obj(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise ManifestError(f"{self.path}: {key} found {value!r}, expected an object")
        return value


def _confidence(path: Path, value: Any) -> ConfidenceSpec | None:
    """The optional ``confidence`` section: absent (the model flags nothing) or a method this code computes."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError(
            f"{path}: confidence found {value!r}, expected an object", attribute="confidence", found=value
        )
    try:
        spec = ConfidenceSpec.from_dict(value)
    except ConfidenceSpecError as exc:
        raise ManifestError(
            f"{path}: {exc}", attribute=exc.attribute, found=exc.found, expected=exc.expected
        ) from exc
    if spec.method != FEATURE_DENSITY_METHOD:
        raise ManifestError(
            f"{path}: confidence.method found {spec.method!r}, this agent computes {FEATURE_DENSITY_METHOD!r}",
            attribute="confidence.method",
            found=spec.method,
            expected=FEATURE_DENSITY_METHOD,
        )
    if not spec.statistics_file:
        raise ManifestError(
            f"{path}: confidence.statistics is missing; {FEATURE_DENSITY_METHOD} needs its fitted statistics",
            attribute="confidence.statistics",
            found=None,
            expected="an object with file and sha256",
        )
    return spec


def _triple(path: Path, key: str, value: Any) -> tuple[float, float, float]:
    try:
        a, b, c = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ManifestError(f"{path}: {key} found {value!r}, expected three numbers") from None
    if not all(math.isfinite(v) and v > 0 for v in (a, b, c)):
        raise ManifestError(f"{path}: {key} found {value!r}, expected three positive numbers")
    return (a, b, c)


def _matrix(path: Path, value: Any) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ManifestError(f"{path}: input.matrix found {value!r}, expected [rows, columns]") from None
    if rows < 1 or cols < 1:
        raise ManifestError(f"{path}: input.matrix found {value!r}, expected positive sizes")
    return (rows, cols)
