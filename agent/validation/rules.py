"""Check one acquisition against one sequence protocol: a provisional verdict from the first images, a final one
once the acquisition has ended (sequence_protocols/README.md, What a verdict contains).

A provisional verdict must be right from the first image, because a technologist acts on it while the patient is
still on the table: a rule is judged only when the view states its input, and everything else waits in
``pending`` (the second echo's time before the second echo arrived). Echo times are placed on the protocol's
echoes by best fit, not by arrival order, so an export that sends the second echo first is not rejected for a
"wrong" first echo time.

The final verdict adds what only the whole acquisition shows: every echo complete, the same slice positions in
every echo, uniform steps, no duplicates, and the assembler's list of attributes that changed between images
(:mod:`agent.validation.slice_grid_checks`). Missing images make a verdict INCOMPLETE (the scanner or the network lost something; resending may fix it);
anything else that fails makes it REJECT (the protocol on the console is wrong).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.records import AcquisitionView, Reason, Verdict
from agent.validation.protocols import (
    AbsentRule,
    CountRule,
    NumberRule,
    OrientationRule,
    Rule,
    SequenceProtocol,
    TextRule,
    TokenRule,
    VectorRule,
    attribute_spec,
    echo_index,
    format_number,
)
from agent.validation.slice_grid_checks import distinct_positions, final_checks
from agent.vocabulary import Category, EndedBy, ImageKind, Outcome
from sct_core.geometry import Orientation

#: ``view.ended_by`` values of an acquisition that has ended: its own counts, or the quiet-period timer.
FINAL_ENDINGS = frozenset({EndedBy.COUNT, EndedBy.QUIET})


#: ImageType tokens (classic value 3, Enhanced value 4, ComplexImageComponent) of images that are not
#: magnitude images, and of magnitude images.
NON_MAGNITUDE_TOKENS = frozenset({"P", "PHASE", "PHASE MAP", "R", "REAL", "I", "IMAGINARY", "MIXED"})
MAGNITUDE_TOKENS = frozenset({"M", "MAGNITUDE"})

#: A slice normal shorter than this comes from degenerate direction cosines, not from any real orientation.
_MIN_NORMAL_LENGTH = 1e-6
#: Principal orientations by the patient axis their normal runs along: x (left-right), y (A-P), z (S-I).
_AXIS_ORIENTATIONS = (Orientation.SAGITTAL, Orientation.CORONAL, Orientation.AXIAL)
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")

_TEXT_INPUTS: Mapping[str, Callable[[AcquisitionView], str | None]] = {
    "MRAcquisitionType": lambda v: v.mr_acquisition_type,
}
_TOKEN_INPUTS: Mapping[str, Callable[[AcquisitionView], tuple[str, ...]]] = {
    "ScanningSequence": lambda v: v.scanning_sequence,
    "SequenceVariant": lambda v: v.sequence_variant,
    # The exported tokens and the vendor-normalised flags (W -> WATER, MPR -> REFORMAT, ...), so a rule can
    # name either.
    "ImageType": lambda v: tuple(dict.fromkeys(v.image_type + v.image_flags)),
}
_ABSENT_INPUTS: Mapping[str, Callable[[AcquisitionView], float | None]] = {
    # GE writes InversionTime 0 for sequences without an inversion pulse: 0 (or less) counts as absent.
    "InversionTime": lambda v: (
        v.inversion_time_ms if v.inversion_time_ms and v.inversion_time_ms > 0 else None
    ),
}
_NUMBER_INPUTS: Mapping[str, Callable[[AcquisitionView], float | None]] = {
    "RepetitionTime": lambda v: v.repetition_time_ms,
    "FlipAngle": lambda v: v.flip_angle_deg,
    "PixelBandwidth": lambda v: v.pixel_bandwidth_hz,
    "MagneticFieldStrength": lambda v: v.magnetic_field_strength_t,
    "SpacingBetweenSlices": lambda v: v.slice_spacing_mm,
}
#: Attributes the validator can read; every attribute :mod:`agent.validation.protocols` accepts must be among them.
SUPPORTED_ATTRIBUTES = frozenset(
    {*_TEXT_INPUTS, *_TOKEN_INPUTS, *_ABSENT_INPUTS, *_NUMBER_INPUTS}
    | {"EchoCount", "SliceCount", "PixelSpacing", "FieldOfView", "Orientation"}
)


@dataclass(frozen=True, slots=True)
class _Unknown:
    """A rule whose input the view does not state (yet); ``found`` is what a final verdict says instead."""

    found: str
    #: True when the input is missing because expected images never arrived, not because a header lacks it.
    missing_images: bool = False


@dataclass(frozen=True, slots=True)
class _Context:
    """What every rule check may read: the view plus the values derived from it once per verdict."""

    protocol: SequenceProtocol
    view: AcquisitionView
    #: Echo number (1-based, in order of echo time) -> echo time, ms, for the echoes that can be placed.
    echo_times: Mapping[int, float]
    echo_count: int | None
    slice_count: int | None


_Result = Reason | _Unknown | None


def evaluate(
    protocol: SequenceProtocol, view: AcquisitionView, *, final: bool, now: float | None = None
) -> Verdict:
    """The verdict of ``protocol`` on ``view``: provisional while images arrive, final once it has ended.

    ``final`` requires ``view.ended_by`` to be "count" or "quiet": a final verdict on an open acquisition would
    call missing images that are still on their way a failure.
    """
    if final and view.ended_by not in FINAL_ENDINGS:
        raise ValueError(
            f"evaluate(final=True): view.ended_by is {str(view.ended_by)!r}; expected one of "
            f"{', '.join(sorted(FINAL_ENDINGS))} (the acquisition must have ended)"
        )
    context = _Context(
        protocol=protocol,
        view=view,
        echo_times=_place_echo_times(protocol, view, final=final),
        echo_count=view.expected_echoes
        if view.expected_echoes is not None
        else _final_echo_count(view, final),
        slice_count=view.expected_slices
        if view.expected_slices is not None
        else _final_slice_count(view, final),
    )
    reasons: list[Reason] = []
    pending: list[str] = []
    for rule in protocol.rules:
        result = _check(rule, context)
        if isinstance(result, Reason):
            reasons.append(result)
        elif isinstance(result, _Unknown):
            if final:
                category = Category.COMPLETENESS if result.missing_images else _category(rule.attribute)
                reasons.append(_reason(context, rule, result.found, category=category))
            else:
                pending.append(rule.attribute)
    if final:
        reasons.extend(final_checks(protocol.id, view))
    return Verdict(
        acquisition_id=view.acquisition_id,
        protocol_id=protocol.id,
        protocol_version=protocol.version,
        outcome=_outcome(reasons),
        final=final,
        reasons=tuple(reasons),
        pending=tuple(pending),
        decided_at=time.time() if now is None else now,
    )


def format_verdict(verdict: Verdict) -> str:
    """A few lines a technologist can read at the console: outcome, protocol, each reason, what is pending."""
    stage = "final" if verdict.final else "provisional"
    lines = [
        f"{verdict.outcome.value.upper()} ({stage}) against protocol {verdict.protocol_id} "
        f"version {verdict.protocol_version}, acquisition {verdict.acquisition_id}"
    ]
    lines.extend(
        f"  - {r.attribute}: found {r.found}; required {r.required} [{r.category}]" for r in verdict.reasons
    )
    if verdict.pending:
        lines.append(f"  waiting for: {', '.join(verdict.pending)}")
    if not verdict.reasons and not verdict.pending:
        lines.append("  every rule passed")
    return "\n".join(lines)


def _outcome(reasons: Sequence[Reason]) -> Outcome:
    if any(r.category != Category.COMPLETENESS for r in reasons):
        return Outcome.REJECT
    return Outcome.INCOMPLETE if reasons else Outcome.PASS


def _category(attribute: str) -> Category:
    spec = attribute_spec(attribute)
    return spec.category if spec is not None else Category.CONSISTENCY


def _reason(context: _Context, rule: Rule, found: str, *, category: Category | None = None) -> Reason:
    return Reason(
        protocol_id=context.protocol.id,
        attribute=rule.attribute,
        found=found,
        required=rule.requirement(),
        category=category or _category(rule.attribute),
    )


def _with_unit(value: float, unit: str) -> str:
    return f"{format_number(value)} {unit}" if unit else format_number(value)


# ------------------------------------------------------------------------------------------- derived inputs


def _final_echo_count(view: AcquisitionView, final: bool) -> int | None:
    """Without a stated echo count, the echo times seen are the count, but only once nothing more can come."""
    return len(view.echo_times_ms) if final else None


def _final_slice_count(view: AcquisitionView, final: bool) -> int | None:
    """Without a stated slice count, the fullest echo's distinct positions are the count once it has ended."""
    if not final or not view.positions_mm:
        return None
    return max(len(distinct_positions(sorted(p))[0]) for p in view.positions_mm)


def _place_echo_times(protocol: SequenceProtocol, view: AcquisitionView, *, final: bool) -> dict[int, float]:
    """Echo number -> echo time for the echoes seen.

    Once every echo is present (or, with no stated count, nothing more can come) the n-th shortest echo time is
    echo n. Otherwise an echo time may belong to any echo: exports do not always send echo 1 first, and an
    acquisition can end with an echo lost. Each seen time is then placed, keeping the order of echo times, where
    the fewest rules fail and it lies closest to the rule's target; a rule is reported failing before every
    echo is in only if no placement satisfies it.
    """
    seen = sorted(view.echo_times_ms)
    expected = view.expected_echoes
    if (expected is None and final) or (expected is not None and len(seen) >= expected):
        return {number: te for number, te in enumerate(seen, start=1)}
    rules: dict[int, NumberRule] = {}
    for rule in protocol.rules:
        number = echo_index(rule.attribute)
        if number is not None and isinstance(rule, NumberRule):
            rules[number] = rule
    slots = expected if expected is not None else max([len(seen), *rules])
    return _best_placement(seen, slots, rules)


def _best_placement(seen: Sequence[float], slots: int, rules: Mapping[int, NumberRule]) -> dict[int, float]:
    """Order-preserving placement of ``seen`` echo times on echoes 1..``slots`` (dynamic programming)."""

    def fit(te: float, slot: int) -> tuple[int, float]:
        rule = rules.get(slot)
        if rule is None:
            return (0, 0.0)
        return (0 if rule.admits(te) else 1, abs(te - rule.target))

    worst = (len(seen) + 1, math.inf)
    # best[i][j]: (failed rules, total distance) placing seen[:i] on echoes 1..j; took[i][j]: seen[i-1] is echo j.
    best = [[(0, 0.0) if i == 0 else worst for _ in range(slots + 1)] for i in range(len(seen) + 1)]
    took = [[False] * (slots + 1) for _ in range(len(seen) + 1)]
    for i in range(1, len(seen) + 1):
        for j in range(i, slots + 1):
            previous = best[i - 1][j - 1]
            failed, distance = fit(seen[i - 1], j)
            use = (previous[0] + failed, previous[1] + distance)
            skip = best[i][j - 1]
            # Strictly better only: on a tie the earlier echo wins, so echo 1 is assumed before echo 3.
            if use < skip:
                best[i][j], took[i][j] = use, True
            else:
                best[i][j] = skip
    placed: dict[int, float] = {}
    i, j = len(seen), slots
    while i > 0:
        if took[i][j]:
            placed[j] = seen[i - 1]
            i -= 1
        j -= 1
    return placed


# ----------------------------------------------------------------------------------------------- rule checks


def _check(rule: Rule, context: _Context) -> _Result:
    result: _Result
    if isinstance(rule, TextRule):
        result = _check_text(rule, context)
    elif isinstance(rule, TokenRule):
        result = _check_tokens(rule, context)
    elif isinstance(rule, AbsentRule):
        value = _ABSENT_INPUTS[rule.attribute](context.view)
        result = None if value is None else _reason(context, rule, _with_unit(value, "ms"))
    elif isinstance(rule, NumberRule):
        result = _check_number(rule, context)
    elif isinstance(rule, CountRule):
        result = _check_count(rule, context)
    elif isinstance(rule, VectorRule):
        result = _check_vector(rule, context)
    else:
        result = _check_orientation(rule, context)
    return result


def _check_text(rule: TextRule, context: _Context) -> _Result:
    text = _TEXT_INPUTS[rule.attribute](context.view)
    if not text:
        return _Unknown("not stated")
    return None if rule.admits(text) else _reason(context, rule, text)


def _check_count(rule: CountRule, context: _Context) -> _Result:
    count = context.echo_count if rule.attribute == "EchoCount" else context.slice_count
    if count is None:
        return _Unknown("not stated")
    return None if rule.admits(count) else _reason(context, rule, rule.describe(count))


def _check_vector(rule: VectorRule, context: _Context) -> _Result:
    vector = _vector_input(rule.attribute, context)
    if vector is None:
        return _Unknown("not stated")
    found = " × ".join(format_number(v) for v in vector)
    return None if rule.admits(vector) else _reason(context, rule, f"{found} {rule.unit}")


def _check_number(rule: NumberRule, context: _Context) -> _Result:
    number = echo_index(rule.attribute)
    if number is None:
        value = _NUMBER_INPUTS[rule.attribute](context.view)
        if value is None:
            return _Unknown("not stated")
    else:
        value = context.echo_times.get(number)
        if value is None:
            ordinal = _ORDINALS[number - 1] if number <= len(_ORDINALS) else f"number {number}"
            expected = context.view.expected_echoes
            if expected is not None and number > expected:
                # The headers announce fewer echoes: waiting cannot help, so this fails now.
                return _reason(context, rule, f"no {ordinal} echo ({expected} announced)")
            return _Unknown(f"no {ordinal} echo", missing_images=expected is not None)
    return None if rule.admits(value) else _reason(context, rule, _with_unit(value, rule.unit))


def _check_tokens(rule: TokenRule, context: _Context) -> _Result:
    tokens = _TOKEN_INPUTS[rule.attribute](context.view)
    # None = cannot tell yet; the two halves of the rule are judged separately and a failure wins.
    tokens_ok = rule.admits_tokens(tokens) if tokens else None
    magnitude_ok: bool | None = True
    magnitude: bool | None = None
    if rule.magnitude is not None:
        magnitude = _is_magnitude(context.view)
        magnitude_ok = None if magnitude is None else magnitude == rule.magnitude
    if tokens_ok is False or magnitude_ok is False:
        found = "\\".join(tokens) if tokens else "no tokens"
        if magnitude_ok is False:
            found += " (magnitude)" if magnitude else " (not magnitude)"
        return _reason(context, rule, found)
    if tokens_ok is None or magnitude_ok is None:
        joined = "\\".join(tokens)
        return _Unknown(f"{joined} (magnitude or not is not stated)" if tokens else "not stated")
    return None


def _is_magnitude(view: AcquisitionView) -> bool | None:
    """Whether the images are magnitude images: a phase/real/imaginary token wins over everything, then the
    assembler's vendor-normalised answer (ComplexImageComponent, GE's private code), then an M token."""
    if view.magnitude is None and view.image_kind != ImageKind.MAGNITUDE:
        # Only images of another kind (or of no stated kind) so far: the magnitude images of the echoes may
        # still be on their way (a Philips export can send a slice's phase image first).
        return None
    tokens = set(view.image_type)
    if tokens & NON_MAGNITUDE_TOKENS:
        return False
    if view.magnitude is not None:
        return view.magnitude
    return True if tokens & MAGNITUDE_TOKENS else None


def _vector_input(attribute: str, context: _Context) -> tuple[float, ...] | None:
    view = context.view
    if attribute == "PixelSpacing":
        return view.pixel_spacing_mm
    # FieldOfView: rows x row spacing, columns x column spacing, slices x slice spacing.
    if (
        view.rows is None
        or view.columns is None
        or view.pixel_spacing_mm is None
        or view.slice_spacing_mm is None
        or context.slice_count is None
    ):
        return None
    return (
        view.rows * view.pixel_spacing_mm[0],
        view.columns * view.pixel_spacing_mm[1],
        context.slice_count * view.slice_spacing_mm,
    )


def _check_orientation(rule: OrientationRule, context: _Context) -> _Result:
    """Principal orientation from the slice normal (row x column cosines) and its angle from the required axis."""
    cosines = context.view.image_orientation
    if cosines is None:
        return _Unknown("not stated")
    r, c = cosines[:3], cosines[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    length = math.sqrt(sum(n * n for n in normal))
    if length < _MIN_NORMAL_LENGTH:
        text = "\\".join(format_number(x) for x in cosines)
        return _reason(context, rule, f"degenerate ImageOrientationPatient {text}")
    magnitudes = [abs(n) / length for n in normal]
    principal = _AXIS_ORIENTATIONS[magnitudes.index(max(magnitudes))]
    required_axis = _AXIS_ORIENTATIONS.index(rule.equals)
    angle = math.degrees(math.acos(min(1.0, magnitudes[required_axis])))
    within = rule.max_oblique_deg is None or angle <= rule.max_oblique_deg + 1e-9
    if principal == rule.equals and within:
        return None
    if principal == rule.equals:
        found = f"{principal}, {angle:.1f}° oblique"
    else:
        found = f"{principal} ({angle:.1f}° from {rule.equals})"
    return _reason(context, rule, found)
