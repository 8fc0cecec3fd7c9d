"""What a sequence protocol is: the attributes a rule may name, the rule kinds, and the frozen protocol itself.

A protocol states what an acquisition must look like for the model to be trusted on it. The
file format is documented in ``sequence_protocols/README.md``; :mod:`agent.validation.protocol_files` reads it
into the frozen rules defined here, and :mod:`agent.validation.rules` judges an acquisition by them.

Rules read the vendor-normalised :class:`~agent.records.AcquisitionView`, never raw DICOM, so one protocol serves
classic and Enhanced objects of every vendor. The attributes a rule may name are listed in :data:`ATTRIBUTES`
(plus ``EchoTime<n>``, one per echo in order of echo time); each has one rule kind, one unit and one metrics
category.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.vocabulary import Category, RuleKind
from sct_core.errors import SctError
from sct_core.geometry import Orientation

#: ``EchoTime1`` .. ``EchoTime99``: the n-th echo in order of increasing echo time.
_ECHO_TIME_PATTERN = re.compile(r"^EchoTime([1-9][0-9]?)$")

#: Float comparisons at a tolerance's edge (4.2 + 0.2 is 4.4000000000000004) must not reject a value typed
#: exactly at the edge; this relative slack absorbs binary rounding and nothing a scanner could write.
COMPARISON_SLACK = 1e-9

#: Obliquity is an angle from a principal axis, so it cannot exceed 90 degrees.
MAX_OBLIQUITY_DEG = 90.0


class ProtocolError(SctError, ValueError):
    """A protocol file that cannot be used; ``path`` and ``key`` say where, the message says what was expected."""

    def __init__(self, path: Path, key: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        # Problems are written "found X; expected Y" (or ", expected"): keep the two values as fields too.
        parts = re.match(r"found (?P<found>.*?)[;,] expected (?P<expected>.*)$", problem)
        super().__init__(
            f"{path}: {key}: {problem}",
            attribute=key,
            found=parts["found"] if parts else None,
            expected=parts["expected"] if parts else problem,
        )


@dataclass(frozen=True, slots=True)
class AttributeSpec:
    """What a rule on one attribute compares, in which unit, and under which category its failures count."""

    kind: RuleKind
    category: Category
    #: The unit the view states the value in; a rule must name the same unit (no silent conversions).
    unit: str = ""
    #: Singular noun for counts ("echo"); ``unit`` holds the plural ("echoes").
    unit_singular: str = ""
    #: Number of components of a vector attribute.
    length: int = 1


#: Every attribute a rule may name, except ``EchoTime<n>`` (see :func:`attribute_spec`).
ATTRIBUTES: Mapping[str, AttributeSpec] = {
    "MRAcquisitionType": AttributeSpec(RuleKind.TEXT, Category.SEQUENCE),
    "ScanningSequence": AttributeSpec(RuleKind.TOKENS, Category.SEQUENCE),
    "SequenceVariant": AttributeSpec(RuleKind.TOKENS, Category.SEQUENCE),
    "InversionTime": AttributeSpec(RuleKind.ABSENT, Category.SEQUENCE),
    "ImageType": AttributeSpec(RuleKind.TOKENS, Category.IMAGE),
    "EchoCount": AttributeSpec(RuleKind.COUNT, Category.ECHOES, unit="echoes", unit_singular="echo"),
    "RepetitionTime": AttributeSpec(RuleKind.NUMBER, Category.TIMING, unit="ms"),
    "FlipAngle": AttributeSpec(RuleKind.NUMBER, Category.SEQUENCE, unit="deg"),
    "PixelBandwidth": AttributeSpec(RuleKind.NUMBER, Category.BANDWIDTH, unit="Hz/px"),
    "MagneticFieldStrength": AttributeSpec(RuleKind.NUMBER, Category.FIELD, unit="T"),
    "PixelSpacing": AttributeSpec(RuleKind.VECTOR, Category.GEOMETRY, unit="mm", length=2),
    "SpacingBetweenSlices": AttributeSpec(RuleKind.NUMBER, Category.GEOMETRY, unit="mm"),
    "FieldOfView": AttributeSpec(RuleKind.VECTOR, Category.GEOMETRY, unit="mm", length=3),
    "Orientation": AttributeSpec(RuleKind.ORIENTATION, Category.GEOMETRY),
    "SliceCount": AttributeSpec(RuleKind.COUNT, Category.GEOMETRY, unit="slices", unit_singular="slice"),
}

_ECHO_TIME_SPEC = AttributeSpec(RuleKind.NUMBER, Category.TIMING, unit="ms")


def attribute_spec(attribute: str) -> AttributeSpec | None:
    """The spec of a rule attribute, or None if rules may not name it."""
    if _ECHO_TIME_PATTERN.match(attribute):
        return _ECHO_TIME_SPEC
    return ATTRIBUTES.get(attribute)


def echo_index(attribute: str) -> int | None:
    """1-based echo number of an ``EchoTime<n>`` attribute, else None."""
    match = _ECHO_TIME_PATTERN.match(attribute)
    return int(match.group(1)) if match else None


def format_number(value: float) -> str:
    """A number as a technologist reads it: at most three decimals, no trailing zeros (4.2, 500, 0.74)."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _with_unit(text: str, unit: str) -> str:
    return f"{text} {unit}" if unit else text


def _slack(reference: float) -> float:
    return COMPARISON_SLACK * max(1.0, abs(reference))


# ----------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class TextRule:
    """The attribute must equal a string exactly (MRAcquisitionType = "3D")."""

    attribute: str
    equals: str

    def admits(self, found: str) -> bool:
        return found == self.equals

    def requirement(self) -> str:
        return self.equals


@dataclass(frozen=True, slots=True)
class TokenRule:
    """Every ``includes`` token present, no ``excludes`` token present; ImageType may also require magnitude."""

    attribute: str
    includes: tuple[str, ...]
    excludes: tuple[str, ...]
    #: ImageType only: True = the images must be magnitude images; None = not checked.
    magnitude: bool | None = None

    def admits_tokens(self, tokens: tuple[str, ...]) -> bool:
        present = set(tokens)
        return set(self.includes) <= present and not (set(self.excludes) & present)

    def requirement(self) -> str:
        parts: list[str] = []
        if self.magnitude is not None:
            parts.append("magnitude" if self.magnitude else "not magnitude")
        if self.includes:
            parts.append("\\".join(self.includes))
        text = ", ".join(parts)
        if self.excludes:
            text = (
                f"{text} without {'/'.join(self.excludes)}" if text else f"without {'/'.join(self.excludes)}"
            )
        return text


@dataclass(frozen=True, slots=True)
class AbsentRule:
    """The attribute must not be stated (InversionTime: the sequence is not inversion-prepared)."""

    attribute: str

    def requirement(self) -> str:
        return "absent (no inversion preparation)" if self.attribute == "InversionTime" else "absent"


@dataclass(frozen=True, slots=True)
class NumberRule:
    """A number within ``value ± tolerance``, or within bounds (``min``/``max`` inclusive, the others exclusive)."""

    attribute: str
    unit: str
    value: float | None = None
    tolerance: float | None = None
    minimum: float | None = None
    maximum: float | None = None
    greater_than: float | None = None
    less_than: float | None = None

    def admits(self, found: float) -> bool:
        if self.value is not None and self.tolerance is not None:
            return abs(found - self.value) <= self.tolerance + _slack(self.value)
        if self.minimum is not None and found < self.minimum - _slack(self.minimum):
            return False
        if self.maximum is not None and found > self.maximum + _slack(self.maximum):
            return False
        if self.greater_than is not None and not found > self.greater_than:
            return False
        return not (self.less_than is not None and not found < self.less_than)

    @property
    def target(self) -> float:
        """The value the rule aims at: used to tell which echo an early-arriving echo time most likely is."""
        if self.value is not None:
            return self.value
        lower = self.minimum if self.minimum is not None else self.greater_than
        upper = self.maximum if self.maximum is not None else self.less_than
        if lower is not None and upper is not None:
            return (lower + upper) / 2.0
        bound = lower if lower is not None else upper
        return bound if bound is not None else 0.0

    def requirement(self) -> str:
        if self.value is not None and self.tolerance is not None:
            return _with_unit(f"{format_number(self.value)} ± {format_number(self.tolerance)}", self.unit)
        parts = [
            f"{symbol} {format_number(bound)}"
            for symbol, bound in (
                (">", self.greater_than),
                ("≥", self.minimum),
                ("<", self.less_than),
                ("≤", self.maximum),
            )
            if bound is not None
        ]
        return _with_unit(" and ".join(parts), self.unit)


@dataclass(frozen=True, slots=True)
class CountRule:
    """An integer count: exactly ``equals``, or within inclusive ``min``/``max``."""

    attribute: str
    unit: str
    unit_singular: str
    equals: int | None = None
    minimum: int | None = None
    maximum: int | None = None

    def admits(self, found: int) -> bool:
        if self.equals is not None:
            return found == self.equals
        if self.minimum is not None and found < self.minimum:
            return False
        return not (self.maximum is not None and found > self.maximum)

    def describe(self, count: int) -> str:
        """``count`` with its noun: "1 echo", "2 echoes"."""
        return f"{count} {self.unit_singular if count == 1 else self.unit}"

    def requirement(self) -> str:
        if self.equals is not None:
            return self.describe(self.equals)
        parts = [
            f"{symbol} {bound}"
            for symbol, bound in (("≥", self.minimum), ("≤", self.maximum))
            if bound is not None
        ]
        return f"{' and '.join(parts)} {self.unit}"


@dataclass(frozen=True, slots=True)
class VectorRule:
    """Each component within its own tolerance (PixelSpacing, FieldOfView)."""

    attribute: str
    unit: str
    value: tuple[float, ...]
    tolerance: tuple[float, ...]

    def admits(self, found: tuple[float, ...]) -> bool:
        return len(found) == len(self.value) and all(
            abs(f - v) <= t + _slack(v) for f, v, t in zip(found, self.value, self.tolerance, strict=True)
        )

    def requirement(self) -> str:
        if len(set(self.tolerance)) == 1:
            values = " × ".join(format_number(v) for v in self.value)
            return _with_unit(f"{values} ± {format_number(self.tolerance[0])}", self.unit)
        parts = (
            f"{format_number(v)} ± {format_number(t)}"
            for v, t in zip(self.value, self.tolerance, strict=True)
        )
        return _with_unit(" × ".join(parts), self.unit)


@dataclass(frozen=True, slots=True)
class OrientationRule:
    """The principal slice orientation, and how far the slice normal may tilt from its axis."""

    attribute: str
    equals: Orientation
    max_oblique_deg: float | None = None

    def requirement(self) -> str:
        if self.max_oblique_deg is None:
            return str(self.equals)
        return f"{self.equals}, ≤ {format_number(self.max_oblique_deg)}° oblique"


Rule = TextRule | TokenRule | AbsentRule | NumberRule | CountRule | VectorRule | OrientationRule


@dataclass(frozen=True, slots=True)
class SequenceProtocol:
    """One parsed protocol file; ``rules`` keep the order of the file so reasons read in the author's order."""

    id: str
    version: str
    description: str
    path: Path
    rules: tuple[Rule, ...]

    def rule(self, attribute: str) -> Rule | None:
        """The rule on ``attribute``, if the protocol has one."""
        for rule in self.rules:
            if rule.attribute == attribute:
                return rule
        return None
