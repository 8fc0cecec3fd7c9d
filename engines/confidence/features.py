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
from engines.confidence.input_features import CONTEXTS, INPUT_TAP, Context, InputStatistics
from engines.inference.engine import network_input, to_hu
from engines.inference.slabs import SlabPlan
from engines.model.manifest import ModelManifest
from engines.model.unet import LightUNet3d

F32 = npt.NDArray[np.float32]


def volume_levels(
    manifest: ModelManifest,
    unet: LightUNet3d,
    echoes: npt.NDArray[Any],
    levels: Iterable[str],
    *,
    hu_out: F32 | None = None,
    contexts: tuple[Context, ...] = CONTEXTS,
) -> dict[str, F32]:
    """``{level: [channels, ceil(S/stride), rows_padded/stride, cols_padded/stride]}`` for a volume
    ``[echo, S, rows, cols]``: each slab window's core, stitched along the slice axis. With ``hu_out``
    (``[S, rows, cols]`` float32) the sCT of the same pass is written into it, in HU. ``contexts``: the input
    statistics' neighbourhoods."""
    wanted = tuple(levels)
    strides = tap_levels(manifest.architecture)
    statistics = InputStatistics(contexts)
    network = hu_out is not None or any(name != INPUT_TAP for name in wanted)
    plan = SlabPlan.for_volume(echoes.shape[1], manifest.slab.depth, manifest.slab.halo)
    scale = manifest.normalisation.scale(echoes)
    rows, cols = echoes.shape[-2:]
    parts: dict[str, list[F32]] = {name: [] for name in wanted}
    for window in plan.windows:
        x = torch.from_numpy(network_input(manifest, echoes, plan.slice_indices(window), scale))[None]
        core = window.core_stop - window.core_start
        with torch.inference_mode():
            raw, features = unet.forward_levels(x) if network else (None, {})
            if INPUT_TAP in wanted:
                features[INPUT_TAP] = statistics(x)
        if hu_out is not None and raw is not None:
            hu_out[window.core_start : window.core_stop] = to_hu(
                manifest, raw[0, 0, plan.halo : plan.halo + core, :rows, :cols].float().numpy()
            )
        for name in wanted:
            stride = strides[name][1]
            start = plan.halo // stride
            parts[name].append(features[name][0, :, start : start + -(-core // stride)].numpy())
    return {name: np.concatenate(chunks, axis=1) for name, chunks in parts.items()}


def block_fraction(mask: npt.NDArray[np.bool_], stride: int, shape: tuple[int, ...]) -> F32:
    """Share of each ``stride``³ block's voxels set in ``mask`` (``[S, rows, cols]``), on the grid of a level of
    ``shape`` (``[ceil(S/stride), rows_padded/stride, cols_padded/stride]``, as ``volume_levels`` returns);
    padding counts as unset."""
    depth, height, width = (n * stride for n in shape)
    padded = np.zeros((depth, height, width), dtype=np.float32)
    s, r, c = (min(a, b) for a, b in zip(mask.shape, (depth, height, width), strict=True))
    padded[:s, :r, :c] = mask[:s, :r, :c]
    blocks = padded.reshape(shape[0], stride, shape[1], stride, shape[2], stride)
    return np.asarray(blocks.mean(axis=(1, 3, 5)), dtype=np.float32)
