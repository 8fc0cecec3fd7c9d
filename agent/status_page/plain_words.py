"""Each failed rule in the words a technologist uses at the console, with what to change there.

A verdict's :class:`~agent.records.Reason` names a DICOM keyword and two strings ("EchoTime2: found 4.8 ms,
required 4.2 ± 0.2 ms"): exact, but written for engineers. Beside the scanner, the person who must act reads
"TE 2 is 4.8 ms; the protocol needs 4.2 ms (± 0.2)" and "Set TE 2 to 4.2 ms (± 0.2)". The action is built from
the protocol's own rule (its value, tolerance, bounds and tokens), never from numbers written here, so a site
protocol with other values is explained with its values. An attribute this module does not know still gets a
sentence with the found and required values.

Completeness and consistency reasons come from the final checks (images lost on the way, slices that disagree):
nothing on the console is wrong, so their action is to send the series again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from agent.records import Reason
from agent.validation.protocols import (
    AbsentRule,
    CountRule,
    NumberRule,
    OrientationRule,
    Rule,
    TextRule,
    TokenRule,
    VectorRule,
    echo_index,
    format_number,
)
from agent.vocabulary import Category


@dataclass(frozen=True, slots=True)
class PlainReason:
    """One reason as the page shows it: what is wrong (with the value found and the value required) and what
    to change at the console."""

    headline: str
    action: str


#: Console names of the attributes rules read (the words on a scanner's protocol card), by DICOM keyword.
CONSOLE_NAMES: Final[Mapping[str, str]] = {
    "MRAcquisitionType": "acquisition type",
    "ScanningSequence": "sequence type",
    "SequenceVariant": "sequence variant",
    "InversionTime": "inversion time (TI)",
    "ImageType": "image type",
    "EchoCount": "number of echoes",
    "RepetitionTime": "TR",
    "FlipAngle": "flip angle",
    "PixelBandwidth": "bandwidth",
    "MagneticFieldStrength": "field strength",
    "PixelSpacing": "in-plane pixel size",
    "SpacingBetweenSlices": "slice spacing",
    "FieldOfView": "field of view",
    "Orientation": "slice orientation",
    "SliceCount": "number of slices",
    "SlicesPerEcho": "images per echo",
    "ImagePositionPatient": "slice positions",
}

#: What the ScanningSequence and SequenceVariant tokens mean (DICOM PS3.3 C.8.3.1), as a console names them.
TOKEN_WORDS: Final[Mapping[str, str]] = {
    "GR": "gradient echo",
    "SE": "spin echo",
    "IR": "inversion recovery",
    "EP": "echo planar",
    "RM": "research mode",
    "SP": "RF spoiled",
    "MP": "magnetisation prepared",
    "SK": "segmented k-space",
    "MTC": "magnetisation transfer",
    "SS": "steady state",
    "TRSS": "time-reversed steady state",
    "OSP": "oversampling phase",
    "NONE": "no variant",
    "DERIVED": "derived",
    "REFORMAT": "reformatted",
    "W": "water",
    "F": "fat",
    "IP": "in-phase",
    "OP": "opposed-phase",
    "WATER": "water",
    "FAT": "fat",
    "IN_PHASE": "in-phase",
    "OUT_PHASE": "opposed-phase",
}

_DEGREE_UNITS: Final = frozenset({"deg", "°"})
_RESEND: Final = "Send the series again from the console"
#: A reason that says nothing: for requirements read from the rule alone.
_NO_REASON: Final = Reason("", "", "", "", "")


def console_name(attribute: str) -> str:
    """``EchoTime2`` -> "TE 2"; known keywords -> their console name; anything else as it is."""
    number = echo_index(attribute)
    if number is not None:
        return f"TE {number}"
    return CONSOLE_NAMES.get(attribute, attribute)


def explain(reason: Reason, rule: Rule | None) -> PlainReason:
    """``reason`` in plain words; ``rule`` is the protocol's rule on ``reason.attribute`` (None when the reason
    comes from the final checks or the protocol is not loaded)."""
    name = console_name(reason.attribute)
    if reason.category == Category.COMPLETENESS:
        return PlainReason(
            f"Images missing: {_found(reason)}; the series needs {reason.required}",
            f"{_RESEND} (images were lost on the way; nothing in the protocol needs to change)",
        )
    if reason.category == Category.CONSISTENCY or rule is None:
        return PlainReason(
            f"{_capital(name)}: {_found(reason)}; required {reason.required}",
            f"{_RESEND}; if it happens again, check {_the(name)} in the protocol",
        )
    found = _found(reason)
    joiner = ":" if isinstance(rule, CountRule) or found.startswith("no ") else " is"
    headline = f"{_capital(name)}{joiner} {found}; the protocol needs {_requirement(rule, reason)}"
    return PlainReason(headline, _action(rule, _the(name)))


def _the(name: str) -> str:
    """ "the flip angle", but "TE 2" and "TR" (console abbreviations take no article)."""
    return name if name[:2].isupper() else f"the {name}"


def _found(reason: Reason) -> str:
    return _units(reason.found)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _units(text: str) -> str:
    """Degrees as the console writes them: "12 deg" -> "12°"."""
    return re.sub(r"(\d) deg\b", r"\1°", text)


def _unit(unit: str) -> str:
    return "°" if unit in _DEGREE_UNITS else f" {unit}" if unit else ""


def _tolerance(tolerance: float, unit: str) -> str:
    return f"± {format_number(tolerance)}{_unit(unit).strip() if unit in _DEGREE_UNITS else ''}"


def _requirement(rule: Rule, reason: Reason) -> str:
    if isinstance(rule, NumberRule):
        if rule.value is not None and rule.tolerance is not None:
            return f"{format_number(rule.value)}{_unit(rule.unit)} ({_tolerance(rule.tolerance, rule.unit)})"
        return f"{_bounds(rule)}{_unit(rule.unit)}"
    if isinstance(rule, VectorRule):
        return _vector_requirement(rule)
    if isinstance(rule, AbsentRule):
        return "none (no inversion preparation)"
    if isinstance(rule, CountRule) and rule.equals is not None:
        return str(rule.equals)
    return _units(reason.required)


def _bounds(rule: NumberRule) -> str:
    """ "more than 500 and at most 640": a rule's bounds in words."""
    lower = (
        f"more than {format_number(rule.greater_than)}"
        if rule.greater_than is not None
        else f"at least {format_number(rule.minimum)}"
        if rule.minimum is not None
        else ""
    )
    upper = (
        f"less than {format_number(rule.less_than)}"
        if rule.less_than is not None
        else f"at most {format_number(rule.maximum)}"
        if rule.maximum is not None
        else ""
    )
    return " and ".join(part for part in (lower, upper) if part)


def _vector_requirement(rule: VectorRule) -> str:
    values = " × ".join(format_number(v) for v in rule.value)
    if len(set(rule.tolerance)) == 1:
        tolerance = f"± {format_number(rule.tolerance[0])}"
    else:
        tolerance = "± " + " × ".join(format_number(t) for t in rule.tolerance)
    return f"{values} {rule.unit} ({tolerance})"


def _number_action(rule: NumberRule, name: str) -> str:
    return f"Set {name} to {_requirement(rule, _NO_REASON)}"


def _tokens(tokens: tuple[str, ...], *, codes: bool = True) -> str:
    """Tokens in words, each word once: "gradient echo (GR)"; without codes "derived, water, fat"."""
    if not codes:
        return ", ".join(dict.fromkeys(TOKEN_WORDS.get(t, t) for t in tokens))
    return " / ".join(f"{TOKEN_WORDS[t]} ({t})" if t in TOKEN_WORDS else t for t in tokens)


def _token_action(rule: TokenRule, name: str) -> str:
    if rule.attribute == "ImageType":
        kinds = "the acquired magnitude images" if rule.magnitude else "the acquired images"
        unwanted = f" (not {_tokens(rule.excludes, codes=False)} images)" if rule.excludes else ""
        return f"Send {kinds} of each echo{unwanted}: switch off phase, Dixon and reformatted outputs"
    parts = []
    if rule.includes:
        parts.append(f"{_tokens(rule.includes)} as {name}")
    if rule.excludes:
        parts.append(f"without {_tokens(rule.excludes)}")
    return f"Use {' '.join(parts)}"


def _action(rule: Rule, name: str) -> str:
    text: str
    if isinstance(rule, NumberRule):
        text = _number_action(rule, name)
        if rule.attribute == "MagneticFieldStrength":
            text = f"Scan on a {_requirement(rule, _NO_REASON)} magnet: the protocol is for that field strength only"
    elif isinstance(rule, TextRule):
        text = f"Set {name} to {rule.equals}"
    elif isinstance(rule, AbsentRule):
        text = "Switch off the inversion (preparation) pulse: the protocol needs none"
    elif isinstance(rule, CountRule):
        text = _count_action(rule, name)
    elif isinstance(rule, VectorRule):
        text = _vector_action(rule, name)
    elif isinstance(rule, OrientationRule):
        text = _orientation_action(rule)
    else:
        text = _token_action(rule, name)
    return text


def _count_action(rule: CountRule, name: str) -> str:
    if rule.equals is not None:
        return f"Set {name} to {rule.equals}"
    return f"Set {name} to {rule.requirement()}"


def _vector_action(rule: VectorRule, name: str) -> str:
    how = ""
    if rule.attribute == "PixelSpacing":
        how = " (FOV and matrix)"
    elif rule.attribute == "FieldOfView" and len(rule.value) == 3:
        how = " (in-plane FOV, then the slab: slices × slice spacing)"
    return f"Set {name}{how} to {_vector_requirement(rule)}"


def _orientation_action(rule: OrientationRule) -> str:
    tilt = (
        f", tilted at most {format_number(rule.max_oblique_deg)}°" if rule.max_oblique_deg is not None else ""
    )
    return f"Plan {rule.equals} slices{tilt}"
