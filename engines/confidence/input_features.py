"""Input-domain features: multi-scale local statistics of the normalised echoes, computed inside the network pass.

Why, beside the network's own features: an implant's signal void, or a calcification, is dark on both echoes, as
air, bowel gas and cortical bone are; the sCT network's deep features map such a void to the features of air or
gas (it predicts air inside the vertebra), so their density does not find it unusual (docs/model.md, Confidence:
measured). What is unusual is the *pattern* of the echoes around it: a void of that size, with the susceptibility
pile-up at its rim, where normal anatomy has none. These features describe that pattern at three scales, so the
same density model (``density.py``) can score it.

Per voxel of a 4x4x4 grid (stride 4, as the network's third level), from ``log(echo + floor)`` of both echoes and
their log ratio (three channels): the mean and standard deviation over the 4³ block, and over neighbourhoods of
blocks (:data:`CONTEXTS`: 3³ and 5³ blocks, 12 and 20 voxels, 9-18 mm) the mean and standard deviation of the block
means: 3 x 2 x (1 + neighbourhoods) = 18 channels. Only pooling and elementwise arithmetic: every backend compiles
them with the network; the receptive field (20 voxels) is far inside the slab halo, so stitching stays exact.

The neighbourhoods are a buffer of the module (``contexts``, (slices, rows, columns) in blocks), saved with the
fitted statistics, so a calibration may use others (an anisotropic 5 x 9 x 9 one, wide in the sagittal plane
and no deeper across slices, was measured: docs/model.md, Confidence) and every statistics file still scores with
the neighbourhoods it was fitted with. Files written before the buffer existed used :data:`LEGACY_CONTEXTS`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn

#: Name of the input tap among the levels the confidence head reads.
INPUT_TAP = "input"
#: Grid stride of the statistics (voxels per block edge).
STRIDE = 4
#: A neighbourhood of blocks: (slices, rows, columns), odd sizes.
Context = tuple[int, int, int]
#: Neighbourhoods a new calibration fits, in blocks (3 blocks = 12 voxels, 5 = 20).
CONTEXTS: tuple[Context, ...] = ((3, 3, 3), (5, 5, 5))
#: Neighbourhoods of statistics saved without a ``contexts`` buffer (calibrations before 2026-12-05).
LEGACY_CONTEXTS: tuple[Context, ...] = ((3, 3, 3), (5, 5, 5))
#: Added before the logarithm: normalised echoes are about 0..1.2 (the 99th percentile is 1); 0.02 is below tissue
#: and above the noise floor of air, so voids stay finite and noise does not dominate.
LOG_FLOOR = 0.02


def channel_count(contexts: tuple[Context, ...]) -> int:
    """Statistics per block: mean and standard deviation of 3 log channels, in the block and each neighbourhood."""
    return 3 * 2 * (1 + len(contexts))


CHANNELS = channel_count(CONTEXTS)


def slice_reach(contexts: tuple[Context, ...]) -> int:
    """Slices on each side of an output voxel that its confidence reads: its block, the neighbour block the
    trilinear upsampling reads, and the deepest neighbourhood's half-depth in blocks. Slab stitching is exact only
    while this stays within the slab halo (5 blocks deep: 16, the shipped halo; 7 deep would need 20)."""
    return STRIDE * (max(c[0] for c in contexts) // 2 + 2)


class InputStatistics(nn.Module):
    """``[N, 2, D, H, W]`` normalised echoes -> ``[N, channels, D/4, H/4, W/4]`` statistics (fp32)."""

    contexts: torch.Tensor

    def __init__(self, contexts: tuple[Context, ...] = CONTEXTS) -> None:
        super().__init__()
        if not contexts or any(len(c) != 3 or min(c) < 1 or any(k % 2 == 0 for k in c) for c in contexts):
            raise ValueError(
                f"input statistics: contexts {contexts}; expected (slices, rows, columns), odd, >= 1"
            )
        self.sizes: tuple[Context, ...] = tuple((int(c[0]), int(c[1]), int(c[2])) for c in contexts)
        self.register_buffer("contexts", torch.tensor(self.sizes, dtype=torch.int64))
        self.channels = channel_count(self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logs = torch.log(x.float().clamp_min(0.0) + LOG_FLOOR)
        base = torch.cat((logs, logs[:, 1:2] - logs[:, 0:1]), dim=1)
        mean = F.avg_pool3d(base, STRIDE)
        square = F.avg_pool3d(base * base, STRIDE)
        parts = [mean, _std(mean, square)]
        for size in self.sizes:
            context = _context_mean(mean, size)
            context_square = _context_mean(mean * mean, size)
            parts += [context, _std(context, context_square)]
        return torch.cat(parts, dim=1)


def _context_mean(blocks: torch.Tensor, size: Context) -> torch.Tensor:
    """Mean over a ``size`` neighbourhood of blocks, over the blocks that exist (edges: fewer), at every block.

    The same numbers as ``avg_pool3d(padding=size // 2, count_include_pad=False)``, written as two pools of
    zero-padded tensors so that a window narrower than the neighbourhood (a small field of view: 4 blocks across)
    is computed too instead of refused."""
    depth, rows, cols = (k // 2 for k in size)
    pad = (cols, cols, rows, rows, depth, depth)
    total = F.avg_pool3d(F.pad(blocks, pad), size, stride=1)
    count = F.avg_pool3d(F.pad(torch.ones_like(blocks[:, :1]), pad), size, stride=1)
    return total / count


def _std(mean: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
    return (square - mean * mean).clamp_min(1e-8).sqrt()
