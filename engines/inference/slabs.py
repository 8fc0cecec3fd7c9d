"""Slabs along the slice axis with a halo, laid out so that stitched slabs reproduce a whole-volume pass.

Conventions (docs/model.md, "Slabs"):

- Slab ``k`` produces output slices ``[k*depth, (k+1)*depth)`` (the last one clipped to the volume) and is
  computed from input slices ``[k*depth - halo, (k+1)*depth + halo)``.
- Input slices outside the volume repeat the nearest edge slice; in-plane the image is padded at the far edge
  to a multiple of the network's downsampling factor the same way.
- The *whole-volume reference* is one pass over the volume padded by the same rule to
  ``[-halo, n_slabs*depth + halo)``. Every slab window is then an exact sub-window of that padded volume,
  starting on a multiple of the downsampling factor, so pooling grids line up and the only difference between
  stitched and whole is the context cut off beyond each halo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class SlabWindow:
    index: int
    #: Output slices of the volume this slab produces.
    core_start: int
    core_stop: int
    #: Real slices its input reads (halo included, clipped to the volume): the streamer waits for these.
    needed_start: int
    needed_stop: int

    @property
    def needed_slices(self) -> range:
        return range(self.needed_start, self.needed_stop)


@dataclass(frozen=True, slots=True)
class SlabPlan:
    n_slices: int
    depth: int
    halo: int
    windows: tuple[SlabWindow, ...]

    @classmethod
    def for_volume(cls, n_slices: int, depth: int, halo: int) -> SlabPlan:
        if n_slices < 1:
            raise ValueError(f"number of slices: found {n_slices}, expected >= 1")
        if depth < 1 or halo < 0:
            raise ValueError(f"slab depth/halo: found {depth}/{halo}, expected >= 1 / >= 0")
        count = math.ceil(n_slices / depth)
        windows = tuple(
            SlabWindow(
                index=k,
                core_start=k * depth,
                core_stop=min((k + 1) * depth, n_slices),
                needed_start=max(k * depth - halo, 0),
                needed_stop=min((k + 1) * depth + halo, n_slices),
            )
            for k in range(count)
        )
        return cls(n_slices=n_slices, depth=depth, halo=halo, windows=windows)

    @property
    def window_depth(self) -> int:
        return self.depth + 2 * self.halo

    @property
    def padded_slices(self) -> int:
        """Length of the whole-volume reference input."""
        return len(self.windows) * self.depth + 2 * self.halo

    def slice_indices(self, window: SlabWindow) -> npt.NDArray[np.intp]:
        """Volume slice feeding each of the window's ``window_depth`` input positions (edge repeated)."""
        positions = np.arange(window.core_start - self.halo, window.core_start + self.depth + self.halo)
        return np.clip(positions, 0, self.n_slices - 1)

    def reference_indices(self) -> npt.NDArray[np.intp]:
        positions = np.arange(-self.halo, len(self.windows) * self.depth + self.halo)
        return np.clip(positions, 0, self.n_slices - 1)


def padded_in_plane(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_in_plane(x: npt.NDArray[np.float32], multiple: int) -> npt.NDArray[np.float32]:
    """Edge-pad the last two axes at their far ends up to a multiple of ``multiple``."""
    rows, cols = x.shape[-2:]
    pad_r, pad_c = padded_in_plane(rows, multiple) - rows, padded_in_plane(cols, multiple) - cols
    if not (pad_r or pad_c):
        return x
    widths = [(0, 0)] * (x.ndim - 2) + [(0, pad_r), (0, pad_c)]
    return np.pad(x, widths, mode="edge")
