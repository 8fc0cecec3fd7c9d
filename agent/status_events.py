"""The status events stages publish, built in one place so that every stage gives a kind the same body.

The status topic is what a technologist's screen and IT's tools read (``sct-agent listen`` prints it;
docs/protocol.md specifies each body). Stages build :class:`~agent.records.StatusEvent` records here and hand
them to the publisher, which only encodes them: no stage needs the wire format to speak on it.
"""

from __future__ import annotations

from typing import Any

from agent.file_labels import redact
from agent.records import AcquisitionView, FlagReport, SctVolume, StatusEvent, UntrustedRegion, Verdict
from agent.vocabulary import EndedBy, StatusKind

#: Why a flagged region is not trusted, in words a technologist and a surgeon read the same way: the model's
#: confidence says the input there is unlike the data it was calibrated on (an implant, a lesion, motion).
UNTRUSTED_WHY = "outside the conditions the model was validated on"
#: Regions named one by one in the status message; beyond this the message summarises (count, volume, slices)
#: and names the largest, because a line a technologist reads at the console must stay a line. Every region is
#: still in the body's ``regions`` list for machines.
REGIONS_LISTED = 3


def verdict_event(verdict: Verdict) -> StatusEvent:
    """The status event for a verdict, with every reason spelled out (what ``sct-agent listen`` prints)."""
    return StatusEvent(
        kind=StatusKind.VERDICT,
        acquisition_id=verdict.acquisition_id,
        body={
            "protocol_id": verdict.protocol_id,
            "protocol_version": verdict.protocol_version,
            "outcome": verdict.outcome.value,
            "final": verdict.final,
            "reasons": [
                {
                    "protocol_id": r.protocol_id,
                    "attribute": r.attribute,
                    "found": r.found,
                    "required": r.required,
                    "category": r.category,
                    "text": r.text(),
                }
                for r in verdict.reasons
            ],
            "pending": list(verdict.pending),
        },
        at=verdict.decided_at,
    )


def series_fields(view: AcquisitionView) -> dict[str, Any]:
    """Which console series an event is about, as the technologist reads it on the console: the lowest
    SeriesNumber (null when no image stated one; an export split by echo has several) and the SeriesDescription
    of the first image. A description is a protocol label typed at the console, not patient data, but it is free
    text, so it goes through :func:`~agent.file_labels.redact` like every other status text."""
    return {
        "series_number": min(view.series_numbers) if view.series_numbers else None,
        "series_description": redact(view.series_description),
    }


def received_event(view: AcquisitionView, at: float) -> StatusEvent:
    """How many images of an acquisition have arrived, of how many (schema 1.3): what a progress bar of the
    slices received needs, sent while images arrive and once more when the acquisition ends (``ended``)."""
    received = sum(view.slices_per_echo)
    expected = (
        view.expected_slices * view.expected_echoes
        if view.expected_slices is not None and view.expected_echoes is not None
        else None
    )
    return StatusEvent(
        kind=StatusKind.RECEIVED,
        acquisition_id=view.acquisition_id,
        body={
            **series_fields(view),
            "echo_times_ms": list(view.echo_times_ms),
            "slices_per_echo": list(view.slices_per_echo),
            "expected_slices": view.expected_slices,
            "expected_echoes": view.expected_echoes,
            "images_received": received,
            "images_expected": expected,
            "ended": view.ended_by is not EndedBy.OPEN,
            "ended_by": str(view.ended_by),
            "first_image_at": view.first_image_at,
            "last_image_at": view.last_image_at,
        },
        at=at,
    )


def progress_event(acquisition_id: str, *, slabs_done: int, slab_count: int, at: float) -> StatusEvent:
    """The status event for inference progress: ``slabs_done`` of ``slab_count`` slabs published."""
    return StatusEvent(
        kind=StatusKind.PROGRESS,
        acquisition_id=acquisition_id,
        body={"slabs_done": slabs_done, "slab_count": slab_count},
        at=at,
    )


def error_event(acquisition_id: str | None, *, stage: str, message: str, at: float) -> StatusEvent:
    """The status event for an error in a stage; ``acquisition_id`` names the series it cost, if one.
    ``message`` must not quote DICOM values that identify people nor name a file (use
    :func:`agent.file_labels.file_label`); paths under the export folder and instance UIDs are redacted here as
    a safety net."""
    return StatusEvent(
        kind=StatusKind.ERROR,
        acquisition_id=acquisition_id,
        body={"stage": stage, "message": redact(message)},
        at=at,
    )


def refused_event(
    acquisition_id: str, *, folder: str, free_bytes: int, min_free_bytes: int, at: float
) -> StatusEvent:
    """A new acquisition not taken because ``folder``'s filesystem has less than ``min_free_bytes`` free.

    Its files stay in the export folder and it is taken as soon as there is room again, so the body says what to
    free and where, not that anything was lost."""
    return StatusEvent(
        kind=StatusKind.REFUSED,
        acquisition_id=acquisition_id,
        body={
            "reason": "disk_full",
            "folder": folder,
            "free_bytes": free_bytes,
            "min_free_bytes": min_free_bytes,
            "message": (
                f"not taken: {folder} has {free_bytes / 1e6:.1f} MB free, less than the {min_free_bytes / 1e6:.1f} MB "
                "the agent keeps free (retention.min_free_mb); the series stays in the export folder and is "
                "processed as soon as there is room"
            ),
        },
        at=at,
    )


def watch_event(*, available: bool, folder: str, message: str, at: float) -> StatusEvent:
    """The status event for the export folder becoming unavailable, or being watched again. ``folder`` is the
    configured path (a site setting, never derived from a patient's data)."""
    return StatusEvent(
        kind=StatusKind.WATCH,
        acquisition_id=None,
        body={"available": available, "folder": folder, "message": message},
        at=at,
    )


def slice_words(start: int, stop: int) -> str:
    """``[start, stop)`` 0-based as people number the sCT series' images (1-based, inclusive): "slices 41-53"."""
    return f"slice {start + 1}" if stop - start == 1 else f"slices {start + 1}-{stop}"


def region_words(region: UntrustedRegion, count: int) -> str:
    """One region in plain words: "sCT not trusted in slices 41-53 (2.8 mL, region 1 of 2): outside the ..."."""
    return (
        f"sCT not trusted in {slice_words(region.slice_start, region.slice_stop)} ({region.volume_ml:.1f} mL, "
        f"region {region.index} of {count}): {UNTRUSTED_WHY}"
    )


def flagged_words(flagged: FlagReport | None, model: str) -> str:
    """What the confidence check found on a volume, for the status message and the page's card."""
    if flagged is None:
        return f"sCT not checked for regions to distrust: the model {model} has no confidence output"
    if not flagged.regions:
        return (
            f"sCT checked: no region below the confidence threshold ({flagged.method}, threshold "
            f"{flagged.threshold} of 255)"
        )
    return regions_summary(flagged, REGIONS_LISTED)


def regions_summary(flagged: FlagReport, listed: int) -> str:
    """The flagged regions in words, each one while there are at most ``listed``; otherwise one summary ("sCT not
    trusted in 11 regions, 24.3 mL in all, slices 12-40 and 55-80: ...") followed by the ``listed`` largest."""
    regions = flagged.regions
    if len(regions) <= listed:
        return "; ".join(region_words(r, flagged.count) for r in regions)
    spans = merged_spans([(r.slice_start, r.slice_stop) for r in regions])
    where = spans_words(spans)
    largest = sorted(regions, key=lambda r: (-r.volume_ml, r.index))[:listed]
    named = "; ".join(
        f"{slice_words(r.slice_start, r.slice_stop)} ({r.volume_ml:.1f} mL, region {r.index} of {flagged.count})"
        for r in largest
    )
    return (
        f"sCT not trusted in {flagged.count} regions, {flagged.volume_ml:.1f} mL in all, {where}: {UNTRUSTED_WHY}; "
        f"largest: {named}"
    )


def spans_words(spans: list[tuple[int, int]]) -> str:
    """Several ``[start, stop)`` ranges as people number slices: "slices 2-4, 9 and 12-20"."""
    if len(spans) == 1:
        return slice_words(*spans[0])
    numbers = [f"{start + 1}" if stop - start == 1 else f"{start + 1}-{stop}" for start, stop in spans]
    return f"slices {', '.join(numbers[:-1])} and {numbers[-1]}"


def merged_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges joined where they overlap or touch, in slice order."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def flagged_event(volume: SctVolume, at: float) -> StatusEvent:
    """The regions of a finished volume not to trust (schema 1.4), sent once per published volume.

    ``flagged`` is the number of regions, 0 stated explicitly when the volume was checked and none was found, so
    that a receiver can tell "checked, nothing" from "not checked" (``checked`` false, ``flagged`` null: the
    model has no confidence output). Ranges are 0-based voxel indices of the volume, ``[start, stop)``.
    """
    flagged = volume.flagged
    model = f"{volume.model_id} {volume.model_version}"
    body: dict[str, Any] = {
        "checked": flagged is not None,
        "flagged": None if flagged is None else flagged.count,
        "volume_ml": None if flagged is None else round(flagged.volume_ml, 3),
        "method": None if flagged is None else flagged.method,
        "threshold": None if flagged is None else flagged.threshold,
        "min_region_mm3": None if flagged is None else flagged.min_region_mm3,
        "slice_count": volume.geometry.shape[0],
        "regions": [] if flagged is None else [region_body(r, flagged.count) for r in flagged.regions],
        "message": flagged_words(flagged, model),
    }
    return StatusEvent(kind=StatusKind.FLAGGED, acquisition_id=volume.acquisition_id, body=body, at=at)


def region_body(region: UntrustedRegion, count: int) -> dict[str, Any]:
    """One region of the ``flagged`` status: what the confidence volume's header says of it, and in words."""
    return {**region.as_json(), "message": region_words(region, count)}
