"""What only a whole acquisition shows, checked for its final verdict: completeness and consistency.

Every echo complete, the same slice positions in every echo, uniform steps between slices, no duplicate
positions, no gaps, and no attribute that changed between images (the assembler lists those). Missing images make
a verdict INCOMPLETE (the scanner or the network lost something; resending may fix it); a grid that is wrong
makes it REJECT. :func:`agent.validation.rules.evaluate` calls :func:`final_checks` once the acquisition ended.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence

from agent.records import AcquisitionView, Reason
from agent.validation.protocols import format_number
from agent.vocabulary import Category

#: Two slice positions closer than this are the same position, and a step between neighbouring slices may
#: differ from the slice spacing by this much. Consoles write ImagePositionPatient with a few decimals and
#: the slice normal from rounded direction cosines, which moves positions by well under 0.01 mm; a real gap
#: or overlap moves them by a good fraction of a slice (0.9 mm).
GRID_TOLERANCE_MM = 0.02
#: Missing slice positions are listed one by one up to this many; beyond it only the count helps anyone.
MAX_LISTED_POSITIONS = 5


def final_checks(protocol_id: str, view: AcquisitionView) -> list[Reason]:
    """What only the ended acquisition shows: missing echoes and images, position grid, recorded inconsistencies."""
    reasons: list[Reason] = []
    seen, expected = len(view.echo_times_ms), view.expected_echoes
    times = ", ".join(f"{format_number(te)} ms" for te in view.echo_times_ms)
    if expected is not None and seen < expected:
        reasons.append(
            Reason(
                protocol_id,
                "EchoCount",
                found=f"images at {seen} of {expected} echo times ({times or 'none'})",
                required=f"{expected} echoes, as the headers announce",
                category=Category.COMPLETENESS,
            )
        )
    elif expected is not None and seen > expected:
        reasons.append(
            Reason(
                protocol_id,
                "EchoCount",
                found=f"{seen} echo times ({times})",
                required=f"{expected} echoes, as the headers announce",
                category=Category.CONSISTENCY,
            )
        )
    reasons.extend(_slice_checks(protocol_id, view))
    reasons.extend(_inconsistency(protocol_id, text) for text in view.inconsistencies)
    return reasons


def _inconsistency(protocol_id: str, text: str) -> Reason:
    """The assembler writes "Attribute: what differed"; the attribute becomes the reason's attribute."""
    head, separator, rest = text.partition(":")
    attribute, found = (
        (head.strip(), rest.strip()) if separator and head.strip().isidentifier() else ("Images", text)
    )
    return Reason(
        protocol_id,
        attribute,
        found=found,
        required="the same value in every image",
        category=Category.CONSISTENCY,
    )


def distinct_positions(positions: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted positions split into distinct ones and repeats (within :data:`GRID_TOLERANCE_MM`)."""
    distinct: list[float] = []
    repeats: list[float] = []
    for p in positions:
        if distinct and p - distinct[-1] <= GRID_TOLERANCE_MM:
            repeats.append(p)
        else:
            distinct.append(p)
    return distinct, repeats


def _mm_list(positions: Sequence[float]) -> str:
    return ", ".join(format_number(p) for p in positions) + " mm"


def _first(items: Sequence[float]) -> str:
    """The first few positions, with the total when there are more."""
    more = f" ({len(items)} in all)" if len(items) > MAX_LISTED_POSITIONS else ""
    return _mm_list(items[:MAX_LISTED_POSITIONS]) + more


#: One echo's slices: echo time (ms), distinct sorted positions (mm), and positions repeating one of them.
_Echo = tuple[float, list[float], list[float]]


def _slice_checks(protocol_id: str, view: AcquisitionView) -> list[Reason]:
    """Duplicates, steps that are not whole slice spacings, and every echo placed on one grid."""
    echoes: list[_Echo] = []
    for te, positions in zip(view.echo_times_ms, view.positions_mm, strict=False):
        distinct, repeats = distinct_positions(sorted(positions))
        echoes.append((te, distinct, repeats))
    if not echoes:
        return []
    reasons = [
        Reason(
            protocol_id,
            "ImagePositionPatient",
            found=f"a second image at {_first(repeats)} at TE {format_number(te)} ms",
            required="one image per slice position",
            category=Category.CONSISTENCY,
        )
        for te, _, repeats in echoes
        if repeats
    ]
    steps = [b - a for _, d, _ in echoes for a, b in itertools.pairwise(d)]
    stated = view.slice_spacing_mm
    spacing = stated if stated and stated > 0 else (statistics.median(steps) if steps else None)
    uneven = _uneven_steps(protocol_id, echoes, spacing) if spacing is not None else []
    if spacing is None or uneven:
        # No grid to place positions on (one slice per echo, or uneven steps): compare positions and counts.
        return reasons + uneven + _counts_and_matches(protocol_id, view, echoes)
    return reasons + _grid_checks(protocol_id, view, echoes, spacing)


def _uneven_steps(protocol_id: str, echoes: Sequence[_Echo], spacing: float) -> list[Reason]:
    """Steps between neighbouring positions that are not a whole number of slice spacings."""
    reasons: list[Reason] = []
    for te, distinct, _ in echoes:
        bad = [
            (a, b)
            for a, b in itertools.pairwise(distinct)
            if abs((b - a) - max(1, round((b - a) / spacing)) * spacing) > GRID_TOLERANCE_MM
        ]
        if not bad:
            continue
        shown = ", ".join(
            f"{format_number(b - a)} mm from {format_number(a)} to {format_number(b)} mm"
            for a, b in bad[:MAX_LISTED_POSITIONS]
        )
        more = f" ({len(bad)} in all)" if len(bad) > MAX_LISTED_POSITIONS else ""
        reasons.append(
            Reason(
                protocol_id,
                "SpacingBetweenSlices",
                found=f"steps of {shown} at TE {format_number(te)} ms{more}",
                required=f"uniform steps of {format_number(spacing)} ± {format_number(GRID_TOLERANCE_MM)} mm",
                category=Category.CONSISTENCY,
            )
        )
    return reasons


def _off_reference(protocol_id: str, te: float, off: Sequence[float], reference_te: float) -> Reason:
    return Reason(
        protocol_id,
        "ImagePositionPatient",
        found=f"TE {format_number(te)} ms slices at {_first(off)}, not at the TE {format_number(reference_te)} ms positions",
        required="the same slice positions in every echo",
        category=Category.CONSISTENCY,
    )


def _count_reason(protocol_id: str, te: float, present: int, expected: int, details: str) -> Reason:
    """An echo with fewer images than expected is incomplete; one with more is inconsistent."""
    return Reason(
        protocol_id,
        "SlicesPerEcho",
        found=f"{present} of {expected} images at TE {format_number(te)} ms ({details})",
        required=f"{expected} images per echo",
        category=Category.COMPLETENESS if present < expected else Category.CONSISTENCY,
    )


def _grid_checks(
    protocol_id: str, view: AcquisitionView, echoes: Sequence[_Echo], spacing: float
) -> list[Reason]:
    """Place every echo on the fullest echo's grid: positions off it, the span, and each echo's missing slices.

    Only called when every echo steps by whole slice spacings, so the fullest echo's first position anchors a
    grid that its own positions lie on.
    """
    reference_te, reference, _ = max(echoes, key=lambda e: len(e[1]))
    anchor = reference[0]
    steps = round((reference[-1] - anchor) / spacing)
    if steps > 0:
        # The grid follows the positions, not the header's rounded spacing, so that a stated 0.9 mm against a
        # true 0.9004 mm does not push the hundredth slice off the grid.
        spacing = (reference[-1] - anchor) / steps
    reasons: list[Reason] = []
    indices: list[tuple[float, set[int], bool]] = []
    for te, distinct, _ in echoes:
        on_grid: set[int] = set()
        off_grid: list[float] = []
        for p in distinct:
            k = round((p - anchor) / spacing)
            if abs(p - (anchor + k * spacing)) <= GRID_TOLERANCE_MM:
                on_grid.add(k)
            else:
                off_grid.append(p)
        if off_grid:
            reasons.append(_off_reference(protocol_id, te, off_grid, reference_te))
        indices.append((te, on_grid, not off_grid))
    union: set[int] = set().union(*(s for _, s, _ in indices))
    if not union:
        return reasons
    low, high = min(union), max(union)
    span = high - low + 1
    expected = view.expected_slices if view.expected_slices is not None else span
    if span > expected:
        ranges = "; ".join(
            f"TE {format_number(te)} ms from {format_number(anchor + min(s) * spacing)} to "
            f"{format_number(anchor + max(s) * spacing)} mm"
            for te, s, _ in indices
            if s
        )
        reasons.append(
            Reason(
                protocol_id,
                "ImagePositionPatient",
                found=f"{span} slice positions {format_number(spacing)} mm apart across the echoes ({ranges})",
                required=f"the same {expected} slice positions in every echo",
                category=Category.CONSISTENCY,
            )
        )
    for (te, distinct, _), (_, on_grid, placed) in zip(echoes, indices, strict=True):
        short = expected - len(distinct)
        if short > 0:
            # Gaps can be located only for an echo whose every position lies on the grid.
            gaps = [anchor + k * spacing for k in range(low, high + 1) if k not in on_grid] if placed else []
            reasons.append(
                _count_reason(protocol_id, te, len(distinct), expected, _missing_details(short, gaps))
            )
    return reasons


def _missing_details(short: int, gaps: Sequence[float]) -> str:
    """How many are missing and where: gaps inside the slab are listed if few; the rest lie beyond its ends."""
    details = f"{short} missing"
    if gaps and len(gaps) <= MAX_LISTED_POSITIONS:
        details += f", at {_mm_list(gaps)}"
    elif gaps:
        details += f", {len(gaps)} of them inside the slab"
    if short > len(gaps):
        details += f"{' and' if gaps else ','} {short - len(gaps)} beyond the ends of the slab received"
    return details


def _counts_and_matches(protocol_id: str, view: AcquisitionView, echoes: Sequence[_Echo]) -> list[Reason]:
    """Without a grid: every echo's positions must match the fullest echo's, and the counts must agree."""
    reference_te, reference, _ = max(echoes, key=lambda e: len(e[1]))
    expected = view.expected_slices if view.expected_slices is not None else len(reference)
    reasons: list[Reason] = []
    for te, distinct, _ in echoes:
        off = [p for p in distinct if not any(abs(p - q) <= GRID_TOLERANCE_MM for q in reference)]
        if off:
            reasons.append(_off_reference(protocol_id, te, off, reference_te))
        if len(distinct) < expected:
            reasons.append(
                _count_reason(protocol_id, te, len(distinct), expected, f"{expected - len(distinct)} missing")
            )
        elif len(distinct) > expected:
            reasons.append(
                _count_reason(
                    protocol_id, te, len(distinct), expected, f"{len(distinct) - expected} too many"
                )
            )
    return reasons
