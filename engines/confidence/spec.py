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
    #: The method's fitted statistics: a file in the model folder and its sha256, checked like the weights
    #: before anything deserialises it. Empty for a method that needs none.
    statistics_file: str = ""
    statistics_sha256: str = ""

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
        if self.statistics_file and (
            len(self.statistics_sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.statistics_sha256)
        ):
            raise ConfidenceSpecError(
                f"confidence.statistics.sha256: found {self.statistics_sha256!r}, expected 64 lowercase hex digits",
                attribute="confidence.statistics.sha256",
                found=self.statistics_sha256,
                expected="64 lowercase hex digits",
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
        statistics = data.get("statistics") or {}
        if not isinstance(statistics, Mapping):
            raise ConfidenceSpecError(
                f"confidence.statistics: found {statistics!r}, expected an object with file and sha256",
                attribute="confidence.statistics",
                found=statistics,
                expected="an object",
            )
        return cls(
            method=str(data["method"]),
            threshold=data["threshold"],
            min_region_mm3=data["min_region_mm3"],
            calibration=dict(data.get("calibration", {})),
            statistics_file=str(statistics.get("file", "")),
            statistics_sha256=str(statistics.get("sha256", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "method": self.method,
            "threshold": self.threshold,
            "min_region_mm3": self.min_region_mm3,
        }
        if self.statistics_file:
            data["statistics"] = {
                "file": self.statistics_file,
                "sha256": self.statistics_sha256,
                "format": "torch-state-dict",
            }
        data["calibration"] = dict(self.calibration)
        return data
