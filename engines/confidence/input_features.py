"""Input-domain features: multi-scale local statistics of the normalised echoes, computed inside the network pass.

Why, beside the network's own features: an implant's signal void, or a calcification, is dark on both echoes, as
air, bowel gas and cortical bone are; the sCT network's deep features map such a void to the features of air or
gas (it predicts air inside the vertebra), so their density does not find it unusual (docs/model.md, Confidence:
measured). What is unusual is the *pattern* of the echoes around it: a void of that size, with the susceptibility
pile-up at its rim, where normal anatomy has none. These features describe that pattern at three scales, so the
same density model (``density.py``) can score it.

Per voxel of a 4x4x4 grid (stride 4, as the network's third level), from ``log(echo + floor)`` of both echoes and
their log ratio (three channels): the mean and standard deviation over the 4³ block, and over 3³ and 5³ blocks of
block means (12 and 20 voxels, 9-18 mm) the mean and standard deviation of the block means: 3 x 6 = 18 channels.
Only pooling and elementwise arithmetic: every backend compiles them with the network; the receptive field
(20 voxels) is far inside the slab halo, so stitching stays exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn

#: Name of the input tap among the levels the confidence head reads.
INPUT_TAP = "input"
#: Grid stride of the statistics (voxels per block edge).
STRIDE = 4
#: Context sizes in blocks (3 blocks = 12 voxels, 5 blocks = 20 voxels).
CONTEXTS = (3, 5)
#: Added before the logarithm: normalised echoes are about 0..1.2 (the 99th percentile is 1); 0.02 is below tissue
#: and above the noise floor of air, so voids stay finite and noise does not dominate.
LOG_FLOOR = 0.02
CHANNELS = 3 * 2 * (1 + len(CONTEXTS))


class InputStatistics(nn.Module):
    """``[N, 2, D, H, W]`` normalised echoes -> ``[N, 18, D/4, H/4, W/4]`` statistics (fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logs = torch.log(x.float().clamp_min(0.0) + LOG_FLOOR)
        base = torch.cat((logs, logs[:, 1:2] - logs[:, 0:1]), dim=1)
        mean = F.avg_pool3d(base, STRIDE)
        square = F.avg_pool3d(base * base, STRIDE)
        parts = [mean, _std(mean, square)]
        for size in CONTEXTS:
            context = _context_mean(mean, size)
            context_square = _context_mean(mean * mean, size)
            parts += [context, _std(context, context_square)]
        return torch.cat(parts, dim=1)


def _context_mean(blocks: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a ``size``³ neighbourhood of blocks, over the blocks that exist (edges: fewer), at every block.

    The same numbers as ``avg_pool3d(padding=size // 2, count_include_pad=False)``, written as two pools of
    zero-padded tensors so that a window narrower than the neighbourhood (a small field of view: 4 blocks across)
    is computed too instead of refused."""
    pad = (size // 2,) * 6
    total = F.avg_pool3d(F.pad(blocks, pad), size, stride=1)
    count = F.avg_pool3d(F.pad(torch.ones_like(blocks[:, :1]), pad), size, stride=1)
    return total / count


def _std(mean: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
    return (square - mean * mean).clamp_min(1e-8).sqrt()
