"""The sCT network's level features over a whole volume, slab by slab as the engine computes them (calibration).

Calibration must see the features the engine's head sees: the same normalisation, the same slab windows (halo,
edge repeats, in-plane padding), fp32 eager. Only each window's core is kept, at each level's own resolution,
so a volume's features are its stitched slabs' features.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engines.confidence.density import tap_levels
from engines.confidence.input_features import INPUT_TAP, InputStatistics
from engines.inference.engine import network_input
from engines.inference.slabs import SlabPlan
from engines.model.manifest import ModelManifest
from engines.model.unet import LightUNet3d

F32 = npt.NDArray[np.float32]


def volume_levels(
    manifest: ModelManifest, unet: LightUNet3d, echoes: npt.NDArray[Any], levels: Iterable[str]
) -> dict[str, F32]:
    """``{level: [channels, ceil(S/stride), rows_padded/stride, cols_padded/stride]}`` for a volume
    ``[echo, S, rows, cols]``: each slab window's core, stitched along the slice axis."""
    wanted = tuple(levels)
    strides = tap_levels(manifest.architecture)
    network = any(name != INPUT_TAP for name in wanted)
    plan = SlabPlan.for_volume(echoes.shape[1], manifest.slab.depth, manifest.slab.halo)
    scale = manifest.normalisation.scale(echoes)
    parts: dict[str, list[F32]] = {name: [] for name in wanted}
    for window in plan.windows:
        x = torch.from_numpy(network_input(manifest, echoes, plan.slice_indices(window), scale))[None]
        with torch.inference_mode():
            features = unet.forward_levels(x)[1] if network else {}
            if INPUT_TAP in wanted:
                features[INPUT_TAP] = InputStatistics()(x)
        core = window.core_stop - window.core_start
        for name in wanted:
            stride = strides[name][1]
            start = plan.halo // stride
            parts[name].append(features[name][0, :, start : start + -(-core // stride)].numpy())
    return {name: np.concatenate(chunks, axis=1) for name, chunks in parts.items()}
