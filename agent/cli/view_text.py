"""An acquisition view as a technologist or IT person reads it: a few labelled lines, units always shown.

Used by ``sct-agent check`` (and anything else that shows a view to a person); the wire and the JSON output
carry the view's fields instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from agent.records import AcquisitionView
from agent.validation.protocols import format_number
from agent.vocabulary import EndedBy

#: The patient axis a slice normal runs along, by index of its largest component (DICOM LPS).
_PLANES = ("sagittal", "coronal", "axial")


def orientation_text(cosines: Sequence[float] | None) -> str:
    """ "sagittal", or "sagittal, 4.2° oblique": the principal plane and the tilt of the normal from its axis."""
    if cosines is None or len(cosines) != 6:
        return "not stated"
    r, c = cosines[:3], cosines[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    length = math.sqrt(sum(n * n for n in normal))
    if length < 1e-6:
        return "degenerate direction cosines"
    magnitudes = [abs(n) / length for n in normal]
    axis = magnitudes.index(max(magnitudes))
    tilt = math.degrees(math.acos(min(1.0, magnitudes[axis])))
    return _PLANES[axis] if tilt < 0.05 else f"{_PLANES[axis]}, {tilt:.1f}° oblique"


def _ms(value: float | None) -> str:
    return "not stated" if value is None else f"{format_number(value)} ms"


def _mm(value: float | None) -> str:
    return "not stated" if value is None else f"{format_number(value)} mm"


def sequence_line(view: AcquisitionView) -> str:
    parts = [view.mr_acquisition_type or "2D/3D not stated", view.sequence_family or "sequence not stated"]
    qualifiers = []
    if "SP" in view.sequence_variant:
        qualifiers.append("RF-spoiled")
    elif view.sequence_variant:
        qualifiers.append("not spoiled")
    if "MP" in view.sequence_variant or "IR" in view.scanning_sequence or view.inversion_time_ms:
        qualifiers.append("magnetisation-prepared")
    tokens = "\\".join(view.scanning_sequence) or "-"
    variant = "\\".join(view.sequence_variant) or "-"
    text = " ".join(parts)
    if qualifiers:
        text += ", " + ", ".join(qualifiers)
    text += f" ({tokens} / {variant}"
    text += f", {view.sequence_name})" if view.sequence_name else ")"
    return text


def echo_line(view: AcquisitionView) -> str:
    announced = "" if view.expected_echoes is None else f" ({view.expected_echoes} announced)"
    if not view.echo_times_ms:
        return "none" + announced
    per_echo = "" if view.expected_slices is None else f" of {view.expected_slices}"
    echoes = ", ".join(f"TE {format_number(te)} ms: {count}{per_echo} slices" for te, count in view.echoes)
    return f"{len(view.echo_times_ms)}{announced}: {echoes}"


def describe_view(view: AcquisitionView) -> list[str]:
    """Labelled lines, without the header line (the caller names the acquisition)."""
    field = view.magnetic_field_strength_t
    lines = [
        f"scanner    {view.manufacturer or 'manufacturer not stated'} {view.model_name}".rstrip()
        + (f", software {view.software_versions}" if view.software_versions else "")
        + (f", {format_number(field)} T" if field is not None else ", field strength not stated"),
        f"sequence   {sequence_line(view)}",
        f"timing     TR {_ms(view.repetition_time_ms)}, flip angle "
        + ("not stated" if view.flip_angle_deg is None else f"{format_number(view.flip_angle_deg)}°")
        + (f", TI {_ms(view.inversion_time_ms)}" if view.inversion_time_ms else ", no inversion"),
        f"echoes     {echo_line(view)}",
    ]
    images = view.image_kind + " images"
    if view.image_flags:
        images += f" ({', '.join(view.image_flags)})"
    if view.other_images:
        images += "; also " + ", ".join(
            f"{count} {kind} images (not used)" for kind, count in view.other_images
        )
    lines.append(f"images     {images}")
    bandwidth = (
        "not stated" if view.pixel_bandwidth_hz is None else f"{format_number(view.pixel_bandwidth_hz)} Hz/px"
    )
    if view.water_fat_shift_px is not None:
        bandwidth += f" (fat shift {format_number(view.water_fat_shift_px)} px)"
    lines.append(f"bandwidth  {bandwidth}")
    spacing = view.pixel_spacing_mm
    in_plane = (
        "not stated" if spacing is None else f"{format_number(spacing[0])} × {format_number(spacing[1])} mm"
    )
    lines.append(
        f"voxel      {in_plane} in plane, slices {_mm(view.slice_spacing_mm)} apart "
        f"(thickness {_mm(view.slice_thickness_mm)}); matrix {view.rows} × {view.columns}; "
        f"{orientation_text(view.image_orientation)}"
    )
    present = max(view.slices_per_echo, default=0)
    if view.complete and view.ended_by == EndedBy.COUNT:
        state = "complete: every announced image is present"
    elif view.complete:
        state = "ended; the headers announce no image count, so completeness rests on the slice positions"
    elif view.ended_by:
        expected = "?" if view.expected_slices is None else str(view.expected_slices)
        state = f"INCOMPLETE: {present} of {expected} slices per echo present"
    else:
        state = "still arriving"
    lines.append(f"state      {state}")
    for text in view.sequence_evidence:
        lines.append(f"note       {text}")
    return lines
