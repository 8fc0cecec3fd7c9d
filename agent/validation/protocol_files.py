"""Reading sequence protocol files: one TOML file per protocol, parsed once at start-up into frozen rules.

This module is the file format's only reader (the format is documented in ``sequence_protocols/README.md``).
Parsing is strict on purpose: an unknown attribute, an unknown key, a wrong type or a unit other than the
attribute's own would otherwise be ignored silently and a rule the author meant to enforce would never run.
Every such mistake raises :class:`~agent.validation.protocols.ProtocolError` naming the file and the key, and
stops start-up.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sequence_protocols
from agent.validation.protocols import (
    ATTRIBUTES,
    MAX_OBLIQUITY_DEG,
    AbsentRule,
    AttributeSpec,
    CountRule,
    NumberRule,
    OrientationRule,
    ProtocolError,
    Rule,
    SequenceProtocol,
    TextRule,
    TokenRule,
    VectorRule,
    attribute_spec,
)
from agent.vocabulary import RuleKind
from sct_core.geometry import Orientation

#: The shipped ``sequence_protocols/`` folder: top level in the repository, installed with the package.
SHIPPED_PROTOCOLS_DIR = sequence_protocols.FOLDER
PROTOCOL_SUFFIX = ".toml"
#: Protocol ids appear in metrics labels, log lines and the wire header, so they are kept to a safe alphabet.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: ImageType is the one token attribute that may also ask for magnitude images (``magnitude = true``).
_MAGNITUDE_ATTRIBUTE = "ImageType"


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
    will trip over later, so it stops start-up now (sequence_protocols/README.md).
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
