"""What a model's manifest says about its confidence output: the method, the calibrated threshold, the region rule.

The confidence is a second line of defence inside the validated protocol (refusal of other protocols stays the
first): a voxel whose input looks unlike anything the model was calibrated on gets a low confidence, and connected
regions of such voxels are flagged to the surgeon. The numbers here are measured by packaging on normal validation
phantoms, never chosen by hand, and the manifest carries the record of that calibration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sct_core.errors import SctError

#: Confidence is stored and published as one unsigned byte per voxel: 255 = as typical as the calibration data,
#: 0 = far outside it. One byte keeps the confidence volume a quarter of the sCT's size on the wire.
CONFIDENCE_MAX = 255


class ConfidenceSpecError(SctError, ValueError):
    """The manifest's ``confidence`` section names a value this code cannot use."""

    def __init__(self, message: str, *, attribute: str, found: object, expected: str) -> None:
        super().__init__(message, attribute=attribute, found=found, expected=expected)


@dataclass(frozen=True, slots=True)
class ConfidenceSpec:
    """The manifest's ``confidence`` section.

    ``threshold``: voxels with confidence strictly below it are not trusted. ``min_region_mm3``: connected
    untrusted regions smaller than this are not flagged (isolated voxels are noise, not a finding; the calibration
    measures how small a real finding can be). ``calibration`` is the measured record (data, false-flag rate,
    figures), kept verbatim so the manifest says where the numbers came from.
    """

    method: str
    threshold: int
    min_region_mm3: float
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.method:
            raise ConfidenceSpecError(
                "confidence.method is empty",
                attribute="confidence.method",
                found=self.method,
                expected="a name",
            )
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, int)
            or not (0 < self.threshold <= CONFIDENCE_MAX)
        ):
            raise ConfidenceSpecError(
                f"confidence.threshold: found {self.threshold!r}, expected an integer in 1..{CONFIDENCE_MAX}",
                attribute="confidence.threshold",
                found=self.threshold,
                expected=f"integer 1..{CONFIDENCE_MAX}",
            )
        if not (isinstance(self.min_region_mm3, int | float) and math.isfinite(self.min_region_mm3)) or (
            self.min_region_mm3 < 0
        ):
            raise ConfidenceSpecError(
                f"confidence.min_region_mm3: found {self.min_region_mm3!r}, expected a finite value >= 0",
                attribute="confidence.min_region_mm3",
                found=self.min_region_mm3,
                expected="finite mm³ >= 0",
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfidenceSpec:
        missing = [k for k in ("method", "threshold", "min_region_mm3") if k not in data]
        if missing:
            raise ConfidenceSpecError(
                f"confidence: missing {', '.join(missing)}",
                attribute=f"confidence.{missing[0]}",
                found=None,
                expected="present",
            )
        return cls(
            method=str(data["method"]),
            threshold=data["threshold"],
            min_region_mm3=data["min_region_mm3"],
            calibration=dict(data.get("calibration", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "min_region_mm3": self.min_region_mm3,
            "calibration": dict(self.calibration),
        }
