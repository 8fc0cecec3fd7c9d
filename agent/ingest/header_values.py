"""Header values as the agent uses them: checked numbers, strings and UIDs, or a :class:`HeaderError` naming them.

A value that is absent, malformed or outside the range any console writes is a corrupt header, not an unusual
protocol: the file is refused here with the attribute, the value found and what was expected, before it can
reach a verdict as if it were a setting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from agent.file_labels import file_label
from agent.ingest.raw_header import FastHeader
from sct_core.errors import SctError


class HeaderError(SctError, ValueError):
    """A file the agent cannot use, with the attribute, the value found and what was expected.

    The message names the file by its label (:func:`agent.file_labels.file_label`), never by its name, which a
    console may have made of the patient's; ``path`` is the file itself, for a caller that may show it (the
    ``check`` command, run by the technologist on files they chose)."""

    found: str

    def __init__(self, path: Path, attribute: str, found: str, expected: str) -> None:
        self.path = path
        super().__init__(
            f"{file_label(path)}: {attribute}: found {found}; expected {expected}",
            attribute=attribute,
            found=found,
            expected=expected,
        )


#: ImagePositionPatient coordinates beyond this (mm: 100 m) are corrupt, and would overflow the grid arithmetic.
MAX_POSITION_MM = 100_000.0


#: Plausible ranges of the acquisition parameters (inclusive bounds, in the units the view uses). A value
#: outside is a corrupt header, not an unusual protocol, and the file is refused with the range named (a
#: negative TR or a 10^9 ms echo time must not reach a verdict as if it were a setting).
PLAUSIBLE_RANGES: dict[str, tuple[float, float, str]] = {
    "RepetitionTime": (0.1, 100_000.0, "ms"),
    "EchoTime": (0.0, 10_000.0, "ms"),
    "InversionTime": (0.0, 100_000.0, "ms"),
    "FlipAngle": (0.0, 360.0, "deg"),
    "PixelBandwidth": (1.0, 1_000_000.0, "Hz/px"),
    "MagneticFieldStrength": (0.01, 20.0, "T"),
    "ImagingFrequency": (0.1, 1_000.0, "MHz"),
    "SliceThickness": (0.0, 1_000.0, "mm"),
    "SpacingBetweenSlices": (-1_000.0, 1_000.0, "mm"),
}


def first_item(ds: Dataset, keyword: str) -> Dataset | None:
    value = ds.get(keyword)
    if value:
        item: Dataset = value[0]
        return item
    return None


def tokens(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items: Iterable[Any] = value.split("\\") if isinstance(value, str) else value
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def joined(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value.strip()
    return "\\".join(str(v).strip() for v in value)


def optional_int(value: Any) -> int | None:
    """A count from a header whose absence or corruption only loses information (never fails the file)."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return number


def optional_float(value: Any) -> float | None:
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def plausible(path: Path, keyword: str, value: Any, *, limits: str | None = None) -> float | None:
    """A number within :data:`PLAUSIBLE_RANGES` (by ``limits``, else ``keyword``), or None when absent."""
    number = float_value(path, keyword, value)
    if number is None:
        return None
    low, high, unit = PLAUSIBLE_RANGES[limits or keyword]
    if not low <= number <= high:
        raise HeaderError(path, keyword, f"{number:g} {unit}", f"a value from {low:g} to {high:g} {unit}")
    return number


def text_value(value: Any) -> str | None:
    return None if value in (None, "") else str(value).strip().upper()


def uid_value(path: Path, ds: Dataset | FastHeader, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        raise HeaderError(path, keyword, "(absent)", "a UID")
    return value


def float_value(path: Path, keyword: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise HeaderError(path, keyword, repr(value), "a number") from None
    if not math.isfinite(number):
        raise HeaderError(path, keyword, repr(value), "a finite number")
    return number


def int_value(path: Path, keyword: str, value: Any, *, required: bool = False) -> int | None:
    if value is None or value == "":
        if required:
            raise HeaderError(path, keyword, "(absent)", "an integer")
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HeaderError(path, keyword, repr(value), "an integer") from None


def float_values(path: Path, keyword: str, value: Any, count: int) -> tuple[float, ...]:
    if value is None or value == "":
        raise HeaderError(path, keyword, "(absent)", f"{count} numbers")
    if isinstance(value, str):
        value = value.split("\\")
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise HeaderError(path, keyword, repr(value), f"{count} numbers") from None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise HeaderError(path, keyword, str(list(numbers)), f"{count} finite numbers")
    if keyword.endswith("ImagePositionPatient") and any(abs(n) > MAX_POSITION_MM for n in numbers):
        raise HeaderError(
            path, keyword, str(list(numbers)), f"{count} coordinates within ±{MAX_POSITION_MM:g} mm"
        )
    return numbers
