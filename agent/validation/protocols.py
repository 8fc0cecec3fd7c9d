"""Sequence protocols: one TOML file per protocol, parsed once at start-up into frozen rules.

A protocol states what an acquisition must look like for the model to be trusted on it (DESIGN.md §3). The
file format is documented in ``sequence_protocols/README.md``; this module is its only reader. Parsing is strict
on purpose: an unknown attribute, an unknown key, a wrong type or a unit other than the attribute's own would
otherwise be ignored silently and a rule the author meant to enforce would never run. Every such mistake raises
:class:`ProtocolError` naming the file and the key, and stops start-up.

Rules read the vendor-normalised :class:`~agent.records.AcquisitionView`, never raw DICOM, so one protocol serves
classic and Enhanced objects of every vendor. The attributes a rule may name are listed in :data:`ATTRIBUTES`
(plus ``EchoTime<n>``, one per echo in order of echo time); each has one rule kind, one unit and one metrics
category.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sequence_protocols
from agent.vocabulary import Category, RuleKind
from sct_core.errors import SctError
from sct_core.geometry import Orientation

#: The shipped ``sequence_protocols/`` folder: top level in the repository, installed with the package.
SHIPPED_PROTOCOLS_DIR = sequence_protocols.FOLDER
PROTOCOL_SUFFIX = ".toml"

#: Protocol ids appear in metrics labels, log lines and the wire header, so they are kept to a safe alphabet.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
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

#: ImageType is the one token attribute that may also ask for magnitude images (``magnitude = true``).
_MAGNITUDE_ATTRIBUTE = "ImageType"


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


# --------------------------------------------------------------------------------------------------- loading

_TOP_LEVEL_KEYS = ("id", "version", "description", "rules")


def load_protocol(path: Path | str) -> SequenceProtocol:
    """Parse one protocol file; any problem raises :class:`ProtocolError` naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ProtocolError(path, "(file)", f"cannot be read ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise ProtocolError(path, "(file)", f"is not UTF-8 text ({error.reason})") from error
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ProtocolError(path, "(TOML syntax)", str(error)) from error
    return _parse_protocol(path, data)


def load_protocols(folder: Path | str, active: tuple[str, ...] = ()) -> tuple[SequenceProtocol, ...]:
    """Every ``*.toml`` protocol in ``folder`` (sorted by id), or only the ``active`` ids in that order.

    All files are parsed even when only some are active: a malformed file in the folder is a mistake someone
    will trip over later, so it stops start-up now (DESIGN.md §3).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ProtocolError(folder, "(folder)", "not found; expected a folder of *.toml protocol files")
    protocols = {p.id: p for p in (load_protocol(f) for f in sorted(folder.glob(f"*{PROTOCOL_SUFFIX}")))}
    if not protocols:
        raise ProtocolError(folder, "(folder)", "found no *.toml protocol files; expected at least one")
    if not active:
        return tuple(protocols.values())
    selected: list[SequenceProtocol] = []
    for index, protocol_id in enumerate(active):
        key = f"active[{index}]"
        if protocol_id in active[:index]:
            raise ProtocolError(folder, key, f"protocol id {protocol_id!r} is listed twice")
        if protocol_id not in protocols:
            raise ProtocolError(
                folder,
                key,
                f"found no protocol {protocol_id!r} ({protocol_id}{PROTOCOL_SUFFIX}) in {folder}; "
                f"expected one of {', '.join(sorted(protocols))}",
            )
        selected.append(protocols[protocol_id])
    return tuple(selected)


def _parse_protocol(path: Path, data: dict[str, Any]) -> SequenceProtocol:
    _check_keys(path, "", data, _TOP_LEVEL_KEYS)
    for key in _TOP_LEVEL_KEYS:
        if key not in data:
            raise ProtocolError(path, key, "missing; every protocol needs id, version, description and rules")
    protocol_id = _text(path, "id", data["id"])
    if protocol_id != path.stem:
        raise ProtocolError(
            path,
            "id",
            f"found {protocol_id!r}; expected the file name without {PROTOCOL_SUFFIX}, {path.stem!r}",
        )
    if not _ID_PATTERN.match(protocol_id):
        raise ProtocolError(
            path, "id", f"found {protocol_id!r}; expected letters, digits, '_', '.' or '-' only"
        )
    version = _text(path, "version", data["version"])
    description = _text(path, "description", data["description"])
    rules_table = data["rules"]
    if not isinstance(rules_table, dict):
        raise ProtocolError(path, "rules", f"found {_type_name(rules_table)}; expected a table of rules")
    if not rules_table:
        raise ProtocolError(path, "rules", "found no rules; expected at least one [rules.<Attribute>] table")
    rules = tuple(_parse_rule(path, attribute, table) for attribute, table in rules_table.items())
    return SequenceProtocol(id=protocol_id, version=version, description=description, path=path, rules=rules)


def _parse_rule(path: Path, attribute: str, table: Any) -> Rule:
    key = f"rules.{attribute}"
    spec = attribute_spec(attribute)
    if spec is None:
        raise ProtocolError(
            path,
            key,
            f"unknown attribute {attribute!r}; expected one of {', '.join(ATTRIBUTES)} or EchoTime<n>",
        )
    if not isinstance(table, dict):
        raise ProtocolError(path, key, f"found {_type_name(table)}; expected a table of rule keys")
    return _PARSERS[spec.kind](path, key, attribute, spec, table)


def _parse_text(path: Path, key: str, attribute: str, spec: AttributeSpec, table: dict[str, Any]) -> TextRule:
    _check_keys(path, key, table, ("equals",))
    return TextRule(attribute, _text(path, f"{key}.equals", _required(path, key, table, "equals")))


def _parse_absent(
    path: Path, key: str, attribute: str, spec: AttributeSpec, table: dict[str, Any]
) -> AbsentRule:
    _check_keys(path, key, table, ("absent",))
    if _boolean(path, f"{key}.absent", _required(path, key, table, "absent")) is not True:
        raise ProtocolError(path, f"{key}.absent", "found false; expected true (or leave the rule out)")
    return AbsentRule(attribute)


def _parse_tokens(
    path: Path, key: str, attribute: str, spec: AttributeSpec, table: dict[str, Any]
) -> TokenRule:
    allowed = (
        ("includes", "excludes", "magnitude")
        if attribute == _MAGNITUDE_ATTRIBUTE
        else ("includes", "excludes")
    )
    _check_keys(path, key, table, allowed)
    includes = _tokens(path, f"{key}.includes", table.get("includes", []))
    excludes = _tokens(path, f"{key}.excludes", table.get("excludes", []))
    magnitude = _boolean(path, f"{key}.magnitude", table["magnitude"]) if "magnitude" in table else None
    if not includes and not excludes and magnitude is None:
        raise ProtocolError(path, key, f"found no condition; expected at least one of {', '.join(allowed)}")
    both = sorted(set(includes) & set(excludes))
    if both:
        raise ProtocolError(path, f"{key}.excludes", f"found {', '.join(both)} in includes and excludes")
    return TokenRule(attribute, includes, excludes, magnitude)


_NUMBER_BOUNDS = ("min", "max", "greater_than", "less_than")


def _parse_number(
    path: Path, key: str, attribute: str, spec: AttributeSpec, table: dict[str, Any]
) -> NumberRule:
    _check_keys(path, key, table, ("value", "tolerance", *_NUMBER_BOUNDS, "unit"))
    _check_unit(path, key, spec, _required(path, key, table, "unit"))
    numbers = {name: _number(path, f"{key}.{name}", table[name]) for name in table if name != "unit"}
    has_value = "value" in numbers or "tolerance" in numbers
    bounds = [name for name in _NUMBER_BOUNDS if name in numbers]
    if has_value and bounds:
        raise ProtocolError(
            path, f"{key}.{bounds[0]}", "found together with value/tolerance; expected one form or the other"
        )
    if has_value:
        for name in ("value", "tolerance"):
            if name not in numbers:
                raise ProtocolError(path, f"{key}.{name}", "missing; value and tolerance go together")
        if numbers["tolerance"] < 0:
            raise ProtocolError(
                path, f"{key}.tolerance", f"found {numbers['tolerance']}; expected a number >= 0"
            )
        return NumberRule(attribute, spec.unit, value=numbers["value"], tolerance=numbers["tolerance"])
    if not bounds:
        raise ProtocolError(
            path, key, "found no condition; expected value + tolerance, or min/max/greater_than/less_than"
        )
    for inclusive, exclusive in (("min", "greater_than"), ("max", "less_than")):
        if inclusive in numbers and exclusive in numbers:
            raise ProtocolError(
                path, f"{key}.{exclusive}", f"found together with {inclusive}; expected one lower/upper bound"
            )
    lower = numbers.get("min", numbers.get("greater_than"))
    upper = numbers.get("max", numbers.get("less_than"))
    if lower is not None and upper is not None and lower >= upper:
        raise ProtocolError(
            path, key, f"found lower bound {lower} >= upper bound {upper}; expected lower < upper"
        )
    return NumberRule(
        attribute,
        spec.unit,
        minimum=numbers.get("min"),
        maximum=numbers.get("max"),
        greater_than=numbers.get("greater_than"),
        less_than=numbers.get("less_than"),
    )


def _parse_count(
    path: Path, key: str, attribute: str, spec: AttributeSpec, table: dict[str, Any]
) -> CountRule:
    _check_keys(path, key, table, ("equals", "min", "max"))
    counts = {name: _count(path, f"{key}.{name}", value) for name, value in table.items()}
    if "equals" in counts and len(counts) > 1:
        raise ProtocolError(
            path, f"{key}.equals", "found together with min/max; expected one form or the other"
        )
    if not counts:
        raise ProtocolError(path, key, "found no condition; expected equals, or min and/or max")
    if "min" in counts and "max" in counts and counts["min"] > counts["max"]:
        raise ProtocolError(
            path, key, f"found min {counts['min']} > max {counts['max']}; expected min <= max"
        )
    return CountRule(
        attribute,
        spec.unit,
        spec.unit_singular,
        equals=counts.get("equals"),
        minimum=counts.get("min"),
        maximum=counts.get("max"),
    )


def _parse_vector(
    path: Path, key: str, attribute: str, spec: AttributeSpec, table: dict[str, Any]
) -> VectorRule:
    _check_keys(path, key, table, ("value", "tolerance", "unit"))
    _check_unit(path, key, spec, _required(path, key, table, "unit"))
    value = _vector(path, f"{key}.value", _required(path, key, table, "value"), spec.length)
    raw_tolerance = _required(path, key, table, "tolerance")
    if isinstance(raw_tolerance, list):
        tolerance = _vector(path, f"{key}.tolerance", raw_tolerance, spec.length)
    else:
        tolerance = (_number(path, f"{key}.tolerance", raw_tolerance),) * spec.length
    if any(t < 0 for t in tolerance):
        raise ProtocolError(path, f"{key}.tolerance", f"found {list(tolerance)}; expected numbers >= 0")
    return VectorRule(attribute, spec.unit, value, tolerance)


def _parse_orientation(
    path: Path, key: str, attribute: str, spec: AttributeSpec, table: dict[str, Any]
) -> OrientationRule:
    _check_keys(path, key, table, ("equals", "max_oblique_deg"))
    name = _text(path, f"{key}.equals", _required(path, key, table, "equals"))
    choices = ", ".join(o.value for o in Orientation)
    try:
        orientation = Orientation(name.lower())
    except ValueError:
        raise ProtocolError(path, f"{key}.equals", f"found {name!r}; expected one of {choices}") from None
    max_oblique: float | None = None
    if "max_oblique_deg" in table:
        max_oblique = _number(path, f"{key}.max_oblique_deg", table["max_oblique_deg"])
        if not 0 <= max_oblique <= MAX_OBLIQUITY_DEG:
            raise ProtocolError(
                path,
                f"{key}.max_oblique_deg",
                f"found {max_oblique}; expected 0 to {MAX_OBLIQUITY_DEG:g} degrees",
            )
    return OrientationRule(attribute, orientation, max_oblique)


_Parser = Callable[[Path, str, str, AttributeSpec, dict[str, Any]], Rule]

#: One parser per rule kind; each checks its own keys, types and units.
_PARSERS: Mapping[RuleKind, _Parser] = {
    RuleKind.TEXT: _parse_text,
    RuleKind.TOKENS: _parse_tokens,
    RuleKind.ABSENT: _parse_absent,
    RuleKind.NUMBER: _parse_number,
    RuleKind.COUNT: _parse_count,
    RuleKind.VECTOR: _parse_vector,
    RuleKind.ORIENTATION: _parse_orientation,
}


# ------------------------------------------------------------------------------------------ typed accessors


def _type_name(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def _check_keys(path: Path, prefix: str, table: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for name in table:
        if name not in allowed:
            raise ProtocolError(
                path,
                f"{prefix}.{name}" if prefix else name,
                f"unknown key; expected one of {', '.join(allowed)}",
            )


def _required(path: Path, key: str, table: Mapping[str, Any], name: str) -> Any:
    if name not in table:
        raise ProtocolError(path, f"{key}.{name}", "missing")
    return table[name]


def _text(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError(path, key, f"found {_type_name(value)} ({value!r}); expected a string")
    if not value.strip():
        raise ProtocolError(path, key, "found an empty string; expected text")
    return value.strip()


def _boolean(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(path, key, f"found {_type_name(value)} ({value!r}); expected true or false")
    return value


def _number(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(path, key, f"found {_type_name(value)} ({value!r}); expected a number")
    if not math.isfinite(value):
        raise ProtocolError(path, key, f"found {value!r}; expected a finite number")
    return float(value)


def _count(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(path, key, f"found {_type_name(value)} ({value!r}); expected an integer")
    if value < 0:
        raise ProtocolError(path, key, f"found {value}; expected an integer >= 0")
    return value


def _vector(path: Path, key: str, value: Any, length: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise ProtocolError(path, key, f"found {value!r}; expected an array of {length} numbers")
    return tuple(_number(path, f"{key}[{i}]", v) for i, v in enumerate(value))


def _tokens(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ProtocolError(path, key, f"found {_type_name(value)} ({value!r}); expected an array of strings")
    return tuple(_text(path, f"{key}[{i}]", v).upper() for i, v in enumerate(value))


def _check_unit(path: Path, key: str, spec: AttributeSpec, value: Any) -> None:
    unit = _text(path, f"{key}.unit", value)
    if unit != spec.unit:
        raise ProtocolError(
            path,
            f"{key}.unit",
            f"found {unit!r}; expected {spec.unit!r} (the unit the attribute is stated in)",
        )
