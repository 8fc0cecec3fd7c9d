"""Light 3D U-Net mapping dual-echo GRE magnitudes to Hounsfield units.

Choices, each for the edge box rather than for a leaderboard:

- BatchNorm, not InstanceNorm: in eval mode it is a per-channel affine that TensorRT and oneDNN fold into the
  convolution, and it does not make a voxel's output depend on the rest of the slab (InstanceNorm would, which
  breaks slab stitching); InstanceNorm also measured 2x slower on our CPU.
- Transposed-convolution upsampling: as fast as trilinear + 1x1 on oneDNN and exported cleanly to ONNX/TensorRT.
- Three 2x poolings, so every spatial size must be a multiple of :data:`DOWNSAMPLING_FACTOR`; slab planning
  relies on that to keep the pooling grid of a slab aligned with that of the whole volume.
- The output is HU / :data:`HU_SCALE` so that the last layer works on numbers of order one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Output unit: the network predicts HU divided by this.
HU_SCALE = 1000.0


@dataclass(frozen=True, slots=True)
class UNetConfig:
    """Architecture hyper-parameters; recorded in the manifest so a checkpoint rebuilds its own network."""

    in_channels: int = 2
    out_channels: int = 1
    #: Feature channels per resolution level, finest first.
    channels: tuple[int, ...] = (16, 32, 96, 192)
    #: The coarsest ``planar_levels`` levels convolve in-plane only (1x3x3). They keep the wide in-plane context
    #: that tells dark cortical bone from dark air, while the receptive field along the slice axis stays small
    #: (at most 19 slices either side instead of 46), which is what lets a halo be short and stitching exact.
    planar_levels: int = 2

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"in/out channels must be >= 1; found {self.in_channels}/{self.out_channels}")
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels needs >= 2 positive levels; found {self.channels}")
        if not 0 <= self.planar_levels < len(self.channels):
            raise ValueError(
                f"planar_levels: found {self.planar_levels}, expected 0..{len(self.channels) - 1}"
            )

    def kernel(self, level: int) -> tuple[int, int, int]:
        """Convolution kernel at ``level`` (0 = finest)."""
        return (1, 3, 3) if level >= len(self.channels) - self.planar_levels else (3, 3, 3)

    @property
    def downsampling_factor(self) -> int:
        """Spatial sizes must be multiples of this (2 per pooling)."""
        return int(2 ** (len(self.channels) - 1))


def _double_conv(c_in: int, c_out: int, kernel: tuple[int, int, int]) -> nn.Sequential:
    padding = (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel, padding=padding, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv3d(c_out, c_out, kernel, padding=padding, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class LightUNet3d(nn.Module):
    """Encoder-decoder with skip connections; input ``[N, echoes, D, H, W]``, output ``[N, 1, D, H, W]``."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        chans = config.channels
        self.encoders = nn.ModuleList()
        c_prev = config.in_channels
        for level, c in enumerate(chans):
            self.encoders.append(_double_conv(c_prev, c, config.kernel(level)))
            c_prev = c
        self.pool = nn.MaxPool3d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(len(chans) - 2, -1, -1):
            c_coarse, c_fine = chans[level + 1], chans[level]
            self.ups.append(nn.ConvTranspose3d(c_coarse, c_fine, 2, stride=2))
            self.decoders.append(_double_conv(2 * c_fine, c_fine, config.kernel(level)))
        self.head = nn.Conv3d(chans[0], config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x)[0]

    def forward_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The output and the features of every level, named as :func:`level_names` lists them.

        The confidence (engines/confidence) measures how typical these features are, inside the same pass.
        """
        levels: dict[str, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            if i:
                x = self.pool(x)
            x = encoder(x)
            levels[f"enc{i}"] = x
            skips.append(x)
        skips.pop()
        for level, up, decoder in zip(
            range(len(self.encoders) - 2, -1, -1), self.ups, self.decoders, strict=True
        ):
            x = up(x)
            x = decoder(torch.cat((x, skips.pop()), dim=1))
            levels[f"dec{level}"] = x
        out: torch.Tensor = self.head(x)
        return out, levels


def level_names(config: UNetConfig) -> dict[str, tuple[int, int]]:
    """Feature levels :meth:`LightUNet3d.forward_levels` returns: name -> (channels, stride). ``enc<k>`` is the
    encoder at level k (stride 2**k; the last one is the bottleneck), ``dec<k>`` the decoder back at level k."""
    names = {f"enc{k}": (c, 2**k) for k, c in enumerate(config.channels)}
    names.update({f"dec{k}": (config.channels[k], 2**k) for k in range(len(config.channels) - 2, -1, -1)})
    return names


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters, as quoted in the manifest and docs."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
