"""Feature-space density: how typical the network's own features are, computed inside the sCT pass.

Method (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"): the features of
chosen levels of the U-Net (a *tap*: the bottleneck, a decoder level) are modelled, on normal validation phantoms,
as a mixture of Gaussians with one shared (tied) covariance. A voxel's raw score is the squared Mahalanobis distance
of its feature vector to the nearest component mean, divided by the channel count (so a typical voxel scores about
1 at every tap). Lee et al. fit one component per class; a regression network has no classes, so the components are
found by k-means in whitened feature space, and the tied covariance is the within-component one.

Why it can run in every backend: with ``W`` the whitening matrix and ``m_k`` the whitened component means,
``|W(f - mu) - m_k|^2 = |z|^2 - 2 z.m_k + |m_k|^2`` with ``z = W(f - mu)``: one 1x1x1 convolution for ``z``, one
for the ``K`` dot products, a sum of squares and a minimum over channels. Those are ordinary layers that
torch.compile, AOTInductor, ONNX and TensorRT compile with the network, and the statistics are buffers of the module,
so a compiled engine carries them (and its cache key carries their hash).

Mapping to uint8 confidence (monotone): ``255 - slope * ln(score / median)`` clipped to 0..255, per tap, where the
median is that of the tap's score over the calibration voxels; taps at coarser levels are upsampled (trilinear) to
full resolution and the lowest confidence of all taps is the voxel's. ``slope`` is chosen by calibration so that
the score at the calibrated operating point maps to the manifest's threshold (``calibrate.py``).

The arithmetic of the head always runs in fp32, whatever precision the network runs at: squared distances of
far-out features overflow fp16, and ``|z|^2 - 2 z.m + |m|^2`` cancels badly in 16-bit formats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from scipy.cluster.vq import kmeans2
from torch import nn

from engines.confidence.input_features import CHANNELS as INPUT_CHANNELS
from engines.confidence.input_features import (
    CONTEXTS,
    INPUT_TAP,
    LEGACY_CONTEXTS,
    Context,
    InputStatistics,
    slice_reach,
)
from engines.confidence.input_features import STRIDE as INPUT_STRIDE
from engines.confidence.spec import CONFIDENCE_MAX
from engines.model.unet import LightUNet3d, UNetConfig, level_names

#: The manifest's ``confidence.method`` for this head.
METHOD = "feature-mahalanobis"
#: Scores are floored here before the logarithm (a feature exactly on a component mean).
_SCORE_FLOOR = 1e-6
#: Ridge added to covariances, relative to their mean eigenvalue: dead channels (a ReLU that never fires on the
#: calibration data) would otherwise make the whitening matrix infinite.
COVARIANCE_RIDGE = 1e-3
_BUFFERS = ("whiten_weight", "whiten_bias", "centre_weight", "centre_bias", "log_median", "slope", "stride")

F64 = npt.NDArray[np.float64]


class TapDensity(nn.Module):
    """Raw score and confidence of one feature level; every number in it is a buffer fitted by calibration."""

    whiten_weight: torch.Tensor
    whiten_bias: torch.Tensor
    centre_weight: torch.Tensor
    centre_bias: torch.Tensor
    log_median: torch.Tensor
    slope: torch.Tensor
    stride: torch.Tensor

    def __init__(
        self, channels: int, components: int, stride: int, extractor: nn.Module | None = None
    ) -> None:
        super().__init__()
        #: For the input tap: the fixed statistics computed from the network input (no fitted numbers).
        self.extractor = extractor
        if channels < 1 or components < 1 or stride < 1:
            raise ValueError(
                f"tap density: found {channels} channels, {components} components, stride {stride}; "
                "expected positive values"
            )
        self.register_buffer("whiten_weight", torch.zeros(channels, channels, 1, 1, 1))
        self.register_buffer("whiten_bias", torch.zeros(channels))
        self.register_buffer("centre_weight", torch.zeros(components, channels, 1, 1, 1))
        self.register_buffer("centre_bias", torch.zeros(components))
        self.register_buffer("log_median", torch.zeros(()))
        self.register_buffer("slope", torch.ones(()))
        self.register_buffer("stride", torch.tensor(stride, dtype=torch.int64))
        self.channels = channels
        self.components = components
        self.stride_value = stride
        if isinstance(extractor, InputStatistics) and extractor.channels != channels:
            raise ValueError(
                f"tap density: found {channels} channels, expected the input statistics' {extractor.channels} channels "
                f"(neighbourhoods {extractor.sizes})"
            )

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest component, per channel: ``[N, 1, d, h, w]`` fp32."""
        f = features.float() if self.extractor is None else self.extractor(features)
        z = F.conv3d(f, self.whiten_weight.float(), self.whiten_bias.float())
        dots = F.conv3d(z, self.centre_weight.float(), self.centre_bias.float())
        nearest = dots.amin(dim=1, keepdim=True) + (z * z).sum(dim=1, keepdim=True)
        return nearest.clamp_min(0.0) / float(self.channels)

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """Unclipped confidence at the tap's own resolution (clipped once, after the taps are combined)."""
        log_score = torch.log(self.score(features).clamp_min(_SCORE_FLOOR))
        return CONFIDENCE_MAX - self.slope.float() * (log_score - self.log_median.float())


class FeatureDensity(nn.Module):
    """The confidence head: one :class:`TapDensity` per tapped level, combined by minimum at full resolution."""

    def __init__(self, taps: Mapping[str, TapDensity]) -> None:
        super().__init__()
        if not taps:
            raise ValueError("feature density: no taps; expected at least one feature level")
        self.taps = nn.ModuleDict(dict(taps))

    def forward(self, levels: Mapping[str, torch.Tensor], size: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Confidence ``[N, 1, *size]`` in 0..255 (float32) from the U-Net's level features."""
        if torch.is_autocast_enabled(levels[next(iter(self.taps))].device.type):
            # Reduced-precision autocast (torch-optimised bf16/fp16) would run the head's convolutions in 16 bits.
            with torch.autocast(levels[next(iter(self.taps))].device.type, enabled=False):
                return self._combine(levels, size)
        return self._combine(levels, size)

    def _combine(
        self, levels: Mapping[str, torch.Tensor], size: torch.Size | tuple[int, ...]
    ) -> torch.Tensor:
        combined: torch.Tensor | None = None
        for name, tap in self.taps.items():
            assert isinstance(tap, TapDensity)
            conf = tap.confidence(levels[name])
            if tap.stride_value > 1:
                conf = F.interpolate(conf, size=tuple(size), mode="trilinear", align_corners=False)
            combined = conf if combined is None else torch.minimum(combined, conf)
        assert combined is not None
        return combined.clamp(0.0, float(CONFIDENCE_MAX))

    def levels(self) -> dict[str, tuple[int, int]]:
        """``{level: (channels, stride)}`` the head reads, to check against the network's own levels."""
        return {
            name: (tap.channels, tap.stride_value)
            for name, tap in self.taps.items()
            if isinstance(tap, TapDensity)
        }

    def slice_reach(self) -> int:
        """Slices on each side the input statistics read (0 without an input tap; the network's own levels are
        inside its receptive field, which the halo was chosen for)."""
        return max(
            (
                slice_reach(tap.extractor.sizes)
                for tap in self.taps.values()
                if isinstance(tap, TapDensity) and isinstance(tap.extractor, InputStatistics)
            ),
            default=0,
        )

    def tap_scores(self, levels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw scores per tap at each tap's own resolution (calibration and measurement)."""
        return {
            name: tap.score(levels[name]) for name, tap in self.taps.items() if isinstance(tap, TapDensity)
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> FeatureDensity:
        """Rebuild the head from its saved buffers (names and shapes say which taps and sizes)."""
        taps: dict[str, TapDensity] = {}
        names = sorted({key.split(".")[1] for key in state if key.startswith("taps.")})
        for name in names:
            prefix = f"taps.{name}."
            missing = [b for b in _BUFFERS if prefix + b not in state]
            if missing:
                raise ValueError(f"confidence statistics: tap {name} lacks {', '.join(missing)}")
            channels = int(state[prefix + "whiten_weight"].shape[0])
            components = int(state[prefix + "centre_weight"].shape[0])
            extractor = None
            if name == INPUT_TAP:
                key = prefix + "extractor.contexts"
                if key not in state:
                    # Saved before the neighbourhoods were a buffer: the statistics they were fitted with.
                    state = {**state, key: torch.tensor(LEGACY_CONTEXTS, dtype=torch.int64)}
                contexts = tuple((int(d), int(r), int(c)) for d, r, c in state[key].tolist())
                extractor = InputStatistics(contexts)
            taps[name] = TapDensity(channels, components, int(state[prefix + "stride"]), extractor)
        head = cls(taps)
        head.load_state_dict(dict(state), strict=True)
        return head.eval()


class ConfidentUNet3d(nn.Module):
    """The sCT network with its confidence as a second output channel: ``[N, 2, D, H, W]`` fp32 = (HU / hu_scale,
    confidence 0..255). One pass: the head reads the features the HU computation already made."""

    def __init__(self, unet: LightUNet3d, density: FeatureDensity) -> None:
        super().__init__()
        self.unet = unet
        self.density = density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, levels = self.unet.forward_levels(x)
        levels[INPUT_TAP] = x
        confidence = self.density(levels, out.shape[2:])
        # fp32 out: in 16-bit formats the confidence's steps near 255 would be coarser than one unit.
        return torch.cat((out.float(), confidence), dim=1)


def tap_levels(config: UNetConfig) -> dict[str, tuple[int, int]]:
    """``{tap: (channels, stride)}`` a head may read for this network: its levels and the input statistics."""
    return {**level_names(config), INPUT_TAP: (INPUT_CHANNELS, INPUT_STRIDE)}


def head_levels_wrong(head: FeatureDensity, config: UNetConfig) -> dict[str, tuple[int, int]]:
    """Levels the head reads with another (channels, stride) than this network has; the input tap is checked
    against its own statistics' channels (older calibrations used fewer neighbourhoods)."""
    expected = tap_levels(config)
    wrong: dict[str, tuple[int, int]] = {}
    for name, shape in head.levels().items():
        want = expected.get(name)
        tap = head.taps[name]
        extractor = tap.extractor if isinstance(tap, TapDensity) else None
        if name == INPUT_TAP and want is not None and isinstance(extractor, InputStatistics):
            want = (extractor.channels, want[1])
        if want != shape:
            wrong[name] = shape
    return wrong


def fit_tap(
    samples: npt.NDArray[np.float32],
    components: int,
    stride: int,
    seed: int,
    *,
    name: str = "",
    contexts: tuple[Context, ...] = CONTEXTS,
) -> tuple[TapDensity, F64]:
    """Fit one tap on feature samples ``[n, channels]`` from normal calibration data; returns the tap (slope 1,
    median 1 until calibration sets them) and the samples' raw scores."""
    x = np.asarray(samples, dtype=np.float64)
    n, channels = x.shape
    if n < 10 * components:
        raise ValueError(
            f"tap fit: {n} samples for {components} components; expected at least {10 * components}"
        )
    mean = x.mean(axis=0)
    whiten = _inverse_sqrt(np.cov(x - mean, rowvar=False))
    z = (x - mean) @ whiten.T
    rng = np.random.default_rng(seed)
    _, assigned = kmeans2(z, components, minit="++", seed=rng, iter=20)
    # Tied within-component covariance, measured in the original feature space, then whitening by it.
    means = np.stack(
        [x[assigned == k].mean(axis=0) if np.any(assigned == k) else mean for k in range(components)]
    )
    within = np.cov(x - means[assigned], rowvar=False)
    whiten = _inverse_sqrt(within)
    z = (x - mean) @ whiten.T
    m = (means - mean) @ whiten.T
    tap = TapDensity(channels, components, stride, InputStatistics(contexts) if name == INPUT_TAP else None)
    with torch.no_grad():
        tap.whiten_weight.copy_(torch.from_numpy(whiten).float()[:, :, None, None, None])
        tap.whiten_bias.copy_(torch.from_numpy(-(whiten @ mean)).float())
        tap.centre_weight.copy_(torch.from_numpy(-2.0 * m).float()[:, :, None, None, None])
        tap.centre_bias.copy_(torch.from_numpy((m * m).sum(axis=1)).float())
    return tap, _nearest_chunked(z, m) / channels


def set_mapping(tap: TapDensity, median_score: float, slope: float) -> None:
    """Confidence 255 at ``median_score``, falling by ``slope`` per unit of ln(score)."""
    if not (median_score > 0 and math.isfinite(slope) and slope > 0):
        raise ValueError(f"tap mapping: median {median_score}, slope {slope}; expected positive values")
    with torch.no_grad():
        tap.log_median.fill_(math.log(median_score))
        tap.slope.fill_(slope)


def _inverse_sqrt(cov: F64) -> F64:
    cov = (cov + cov.T) / 2
    ridge = COVARIANCE_RIDGE * float(np.trace(cov)) / cov.shape[0]
    values, vectors = np.linalg.eigh(cov + ridge * np.eye(cov.shape[0]))
    return np.asarray((vectors / np.sqrt(values)) @ vectors.T)


def _nearest_chunked(z: F64, m: F64, chunk: int = 20000) -> F64:
    out = np.empty(z.shape[0])
    for start in range(0, z.shape[0], chunk):
        block = z[start : start + chunk]
        d = (block * block).sum(1)[:, None] - 2 * block @ m.T + (m * m).sum(1)[None]
        out[start : start + chunk] = d.min(axis=1)
    return np.maximum(out, 0.0)
