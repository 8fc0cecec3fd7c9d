"""Input normalisation of the sCT network: one intensity scale per volume, known before the volume is complete.

MR magnitudes have no absolute unit; each scanner scales them differently. The model divides both echoes by one
common scale so that their ratio (which carries fat fraction and T2*) survives. The scale is a high percentile of
the *leading slices* of the volume rather than of the whole volume, because the agent starts inferring slabs while
the scanner is still exporting: the first slab already needs the scale, and stitched slabs must equal a
whole-volume pass, so both must use the same scale. Training uses the same rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

#: The only normalisation method this code implements; a manifest naming another is refused.
METHOD = "leading-slices-percentile"


@dataclass(frozen=True, slots=True)
class Normalisation:
    """``x = magnitude / scale`` with ``scale`` = ``percentile`` of all echoes over the first ``leading_slices``."""

    percentile: float = 99.0
    leading_slices: int = 32
    #: A scale below this (a blank or nearly blank volume) is refused instead of amplifying noise.
    min_scale: float = 1.0
    method: str = METHOD

    def __post_init__(self) -> None:
        if self.method != METHOD:
            raise ValueError(f"normalisation.method: found {self.method!r}, supported {METHOD!r}")
        if not 50.0 <= self.percentile <= 100.0:
            raise ValueError(f"normalisation.percentile: found {self.percentile}, expected 50-100")
        if self.leading_slices < 1:
            raise ValueError(f"normalisation.leading_slices: found {self.leading_slices}, expected >= 1")
        if not (math.isfinite(self.min_scale) and self.min_scale > 0):
            raise ValueError(f"normalisation.min_scale: found {self.min_scale}, expected > 0")

    def scale(self, echoes: npt.NDArray[Any]) -> float:
        """Scale from ``echoes[echo, slice, row, col]``; only the leading slices are read."""
        if echoes.ndim != 4:
            raise ValueError(f"echoes must be [echo, slice, row, col]; found shape {echoes.shape}")
        lead = np.asarray(echoes[:, : self.leading_slices], dtype=np.float32)
        value = float(np.percentile(lead, self.percentile))
        if not (math.isfinite(value) and value >= self.min_scale):
            raise ValueError(
                f"input intensity scale: {self.percentile:g}th percentile of the first "
                f"{min(self.leading_slices, echoes.shape[1])} slices is {value:g}, expected >= {self.min_scale:g} "
                "(blank or empty image?)"
            )
        return value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        known = {"percentile", "leading_slices", "min_scale", "method"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"normalisation: unknown keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**data)
