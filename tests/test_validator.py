"""The validator against the shipped seed protocol: one deviation at a time, provisional and final verdicts.

Views are built by hand (the assembler's job is tested elsewhere) from the seed geometry: sagittal,
0.74 mm pixels, 338 x 338, 100 slices 0.9 mm apart. Each deviation asserts the exact outcome, the attribute
named and the numbers a technologist would read in ``found`` and ``required``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent.records import AcquisitionView, Verdict
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR, load_protocol
from agent.validation.protocols import ATTRIBUTES, SequenceProtocol
from agent.validation.rules import SUPPORTED_ATTRIBUTES, evaluate, format_verdict
from agent.validation.slice_grid_checks import GRID_TOLERANCE_MM, MAX_LISTED_POSITIONS
from agent.vocabulary import EndedBy, Outcome
from sct_core.geometry import Orientation, VolumeGeometry

SEED_ID = "bonemri_lumbar_1p5t"
SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SLICES = 100
SPACING_MM = 0.9
FIRST_POSITION_MM = -44.55


def grid(
    count: int = SLICES, spacing: float = SPACING_MM, start: float = FIRST_POSITION_MM
) -> tuple[float, ...]:
    """Slice positions p0 + k * spacing."""
    return tuple(start + k * spacing for k in range(count))


def seed_view(
    *,
    echo_times_ms: tuple[float, ...] = (2.1, 4.2),
    positions_mm: tuple[tuple[float, ...], ...] | None = None,
    expected_echoes: int | None = 2,
    expected_slices: int | None = SLICES,
    complete: bool = True,
    ended_by: EndedBy = EndedBy.COUNT,
) -> AcquisitionView:
    """A view of the seed acquisition; by default complete and passing every rule of the seed protocol."""
    if positions_mm is None:
        positions_mm = tuple(grid() for _ in echo_times_ms)
    return AcquisitionView(
        acquisition_id="acq-0001",
        sop_class="MR Image Storage",
        manufacturer="SIEMENS",
        model_name="Avanto_fit",
        magnetic_field_strength_t=1.5,
        mr_acquisition_type="3D",
        scanning_sequence=("GR",),
        sequence_variant=("SP",),
        sequence_name="*fl3d2",
        inversion_time_ms=None,
        image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM"),
        magnitude=True,
        repetition_time_ms=7.0,
        flip_angle_deg=10.0,
        pixel_bandwidth_hz=540.0,
        echo_times_ms=echo_times_ms,
        expected_echoes=expected_echoes,
        pixel_spacing_mm=(0.74, 0.74),
        slice_spacing_mm=SPACING_MM,
        slice_thickness_mm=SPACING_MM,
        rows=338,
        columns=338,
        image_orientation=SAGITTAL_IOP,
        expected_slices=expected_slices,
        slices_per_echo=tuple(len(p) for p in positions_mm),
        positions_mm=positions_mm,
        inconsistencies=(),
        grid=None,
        complete=complete,
        ended_by=ended_by,
        first_image_at=1000.0,
        last_image_at=1010.0,
    )


def arriving_view(echo_times_ms: tuple[float, ...], slices: int = 1) -> AcquisitionView:
    """An open acquisition: the first ``slices`` images of each echo in ``echo_times_ms`` have arrived."""
    return seed_view(
        echo_times_ms=echo_times_ms,
        positions_mm=tuple(grid(slices) for _ in echo_times_ms),
        complete=False,
        ended_by=EndedBy.OPEN,
    )


def quiet_view(
    positions_mm: tuple[tuple[float, ...], ...],
    *,
    expected_echoes: int | None = 2,
    expected_slices: int | None = SLICES,
) -> AcquisitionView:
    """An acquisition the quiet-period timer ended with the given positions per echo (TE 2.1, 4.2 ms)."""
    return seed_view(
        echo_times_ms=(2.1, 4.2)[: len(positions_mm)],
        positions_mm=positions_mm,
        expected_echoes=expected_echoes,
        expected_slices=expected_slices,
        complete=False,
        ended_by=EndedBy.QUIET,
    )


@pytest.fixture(scope="module")
def seed() -> SequenceProtocol:
    return load_protocol(SHIPPED_PROTOCOLS_DIR / f"{SEED_ID}.toml")


def only_reason(verdict: Verdict, attribute: str) -> tuple[str, str, str]:
    """(found, required, category) of the one reason on ``attribute``."""
    matches = [r for r in verdict.reasons if r.attribute == attribute]
    assert len(matches) == 1, verdict.reasons
    assert matches[0].protocol_id == SEED_ID
    return matches[0].found, matches[0].required, matches[0].category


# ------------------------------------------------------------------------------------------------ passing


@pytest.mark.parametrize("final", [False, True])
def test_the_seed_acquisition_passes(seed: SequenceProtocol, final: bool) -> None:
    verdict = evaluate(seed, seed_view(), final=final, now=5.0)
    assert verdict == Verdict(
        acquisition_id="acq-0001",
        protocol_id=SEED_ID,
        protocol_version=seed.version,
        outcome=Outcome.PASS,
        final=final,
        reasons=(),
        pending=(),
        decided_at=5.0,
    )


@pytest.mark.parametrize(
    "view",
    [
        # GE writes InversionTime 0 for sequences without inversion.
        pytest.param(replace(seed_view(), inversion_time_ms=0.0), id="GE inversion time 0"),
        # Philips Enhanced: no M token; magnitude comes from ComplexImageComponent.
        pytest.param(
            replace(seed_view(), image_type=("ORIGINAL", "PRIMARY", "T1", "NONE")), id="Philips Enhanced"
        ),
        pytest.param(replace(seed_view(), pixel_bandwidth_hz=640.0), id="bandwidth 640 inclusive"),
        pytest.param(replace(seed_view(), magnetic_field_strength_t=1.494), id="1.494 T"),
        pytest.param(replace(seed_view(), flip_angle_deg=12.0), id="flip 12 inclusive"),
        pytest.param(
            replace(seed_view(), image_type=("ORIGINAL", "PRIMARY", "M"), magnitude=None),
            id="magnitude from the M token",
        ),
    ],
)
def test_vendor_conventions_and_edges_pass(seed: SequenceProtocol, view: AcquisitionView) -> None:
    verdict = evaluate(seed, view, final=True)
    assert (verdict.outcome, verdict.reasons) == (Outcome.PASS, ())


def test_echo_time_at_the_edge_of_its_tolerance_passes(seed: SequenceProtocol) -> None:
    # 4.2 + 0.2 is 4.4000000000000004 in binary: the edge typed exactly must not be rejected.
    assert evaluate(seed, seed_view(echo_times_ms=(2.1, 4.4)), final=True).outcome is Outcome.PASS
    assert evaluate(seed, seed_view(echo_times_ms=(2.1, 4.41)), final=True).outcome is Outcome.REJECT


def test_obliquity_is_measured_as_the_phantom_tilts_the_slab(seed: SequenceProtocol) -> None:
    def tilted(degrees: float) -> AcquisitionView:
        geometry = VolumeGeometry.from_fov(
            center=(0.0, 0.0, 0.0),
            fov_mm=(250.0, 250.0, 90.0),
            voxel_mm=(0.74, 0.74, 0.9),
            orientation=Orientation.SAGITTAL,
            oblique_deg=degrees,
        )
        iop = geometry.image_orientation_patient
        return replace(seed_view(), image_orientation=(iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]))

    assert evaluate(seed, tilted(6.0), final=False).outcome is Outcome.PASS
    verdict = evaluate(seed, tilted(12.0), final=False)
    assert verdict.outcome is Outcome.REJECT
    assert only_reason(verdict, "Orientation") == (
        "sagittal, 12.0° oblique",
        "sagittal, ≤ 8° oblique",
        "geometry",
    )


# ---------------------------------------------------------------------------------- one deviation at a time

DEVIATIONS: list[tuple[str, AcquisitionView, str, str, str, str]] = [
    ("TE2 4.8 ms", seed_view(echo_times_ms=(2.1, 4.8)), "EchoTime2", "4.8 ms", "4.2 ± 0.2 ms", "timing"),
    ("TE1 2.4 ms", seed_view(echo_times_ms=(2.4, 4.2)), "EchoTime1", "2.4 ms", "2.1 ± 0.15 ms", "timing"),
    ("2D", replace(seed_view(), mr_acquisition_type="2D"), "MRAcquisitionType", "2D", "3D", "sequence"),
    ("TR 8", replace(seed_view(), repetition_time_ms=8.0), "RepetitionTime", "8 ms", "7 ± 0.5 ms", "timing"),
    ("flip 15", replace(seed_view(), flip_angle_deg=15.0), "FlipAngle", "15 deg", "10 ± 2 deg", "sequence"),
    (
        "bandwidth 300",
        replace(seed_view(), pixel_bandwidth_hz=300.0),
        "PixelBandwidth",
        "300 Hz/px",
        "> 500 and ≤ 640 Hz/px",
        "bandwidth",
    ),
    (
        "bandwidth exactly 500",
        replace(seed_view(), pixel_bandwidth_hz=500.0),
        "PixelBandwidth",
        "500 Hz/px",
        "> 500 and ≤ 640 Hz/px",
        "bandwidth",
    ),
    (
        "bandwidth 700",
        replace(seed_view(), pixel_bandwidth_hz=700.0),
        "PixelBandwidth",
        "700 Hz/px",
        "> 500 and ≤ 640 Hz/px",
        "bandwidth",
    ),
    (
        "3 T",
        replace(seed_view(), magnetic_field_strength_t=3.0),
        "MagneticFieldStrength",
        "3 T",
        "1.5 ± 0.1 T",
        "field",
    ),
    (
        "not spoiled",
        replace(seed_view(), sequence_variant=("SS",)),
        "SequenceVariant",
        "SS",
        "SP without MP",
        "sequence",
    ),
    (
        "spin echo",
        replace(seed_view(), scanning_sequence=("SE",)),
        "ScanningSequence",
        "SE",
        "GR without IR",
        "sequence",
    ),
    (
        "phase image",
        replace(seed_view(), image_type=("ORIGINAL", "PRIMARY", "P", "ND"), magnitude=False),
        "ImageType",
        "ORIGINAL\\PRIMARY\\P\\ND (not magnitude)",
        "magnitude without DERIVED/W/F/IP/OP/WATER/FAT/IN_PHASE/OUT_PHASE",
        "image",
    ),
    (
        "phase token despite a magnitude flag",
        replace(seed_view(), image_type=("ORIGINAL", "PRIMARY", "P", "ND")),
        "ImageType",
        "ORIGINAL\\PRIMARY\\P\\ND (not magnitude)",
        "magnitude without DERIVED/W/F/IP/OP/WATER/FAT/IN_PHASE/OUT_PHASE",
        "image",
    ),
    (
        "Dixon water image",
        replace(seed_view(), image_type=("DERIVED", "PRIMARY", "DIXON", "WATER")),
        "ImageType",
        "DERIVED\\PRIMARY\\DIXON\\WATER",
        "magnitude without DERIVED/W/F/IP/OP/WATER/FAT/IN_PHASE/OUT_PHASE",
        "image",
    ),
    (
        "axial",
        replace(seed_view(), image_orientation=AXIAL_IOP),
        "Orientation",
        "axial (90.0° from sagittal)",
        "sagittal, ≤ 8° oblique",
        "geometry",
    ),
    (
        "pixel spacing 0.8",
        replace(seed_view(), pixel_spacing_mm=(0.8, 0.8), rows=312, columns=312),
        "PixelSpacing",
        "0.8 × 0.8 mm",
        "0.74 × 0.74 ± 0.02 mm",
        "geometry",
    ),
    (
        "slice spacing 1.0 mm",
        replace(seed_view(positions_mm=(grid(spacing=1.0), grid(spacing=1.0))), slice_spacing_mm=1.0),
        "SpacingBetweenSlices",
        "1 mm",
        "0.9 ± 0.05 mm",
        "geometry",
    ),
    (
        "FOV 222 mm",
        replace(seed_view(), rows=300),
        "FieldOfView",
        "222 × 250.12 × 90 mm",
        "250 ± 12.5 × 250 ± 12.5 × 90 ± 10 mm",
        "geometry",
    ),
    (
        "slab 63 mm",
        seed_view(positions_mm=(grid(70), grid(70)), expected_slices=70),
        "FieldOfView",
        "250.12 × 250.12 × 63 mm",
        "250 ± 12.5 × 250 ± 12.5 × 90 ± 10 mm",
        "geometry",
    ),
]


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize(
    ("view", "attribute", "found", "required", "category"),
    [pytest.param(*case[1:], id=case[0]) for case in DEVIATIONS],
)
def test_one_deviation_rejects_naming_attribute_found_and_required(
    seed: SequenceProtocol,
    view: AcquisitionView,
    attribute: str,
    found: str,
    required: str,
    category: str,
    final: bool,
) -> None:
    verdict = evaluate(seed, view, final=final)
    assert verdict.outcome is Outcome.REJECT
    assert [r.attribute for r in verdict.reasons] == [attribute]
    assert only_reason(verdict, attribute) == (found, required, category)
    assert verdict.pending == ()


def test_ir_prepared_is_rejected_on_the_sequence_and_the_inversion_time(seed: SequenceProtocol) -> None:
    view = replace(seed_view(), scanning_sequence=("GR", "IR"), inversion_time_ms=450.0)
    verdict = evaluate(seed, view, final=False)
    assert verdict.outcome is Outcome.REJECT
    assert [r.attribute for r in verdict.reasons] == ["ScanningSequence", "InversionTime"]
    assert only_reason(verdict, "ScanningSequence") == ("GR\\IR", "GR without IR", "sequence")
    assert only_reason(verdict, "InversionTime") == (
        "450 ms",
        "absent (no inversion preparation)",
        "sequence",
    )


def test_a_one_echo_scan_is_rejected_from_its_first_image(seed: SequenceProtocol) -> None:
    view = replace(arriving_view((2.1,)), expected_echoes=1)
    verdict = evaluate(seed, view, final=False)
    assert verdict.outcome is Outcome.REJECT
    assert only_reason(verdict, "EchoCount") == ("1 echo", "2 echoes", "echoes")
    # The headers announce one echo: the second cannot come, so it fails now instead of waiting.
    assert only_reason(verdict, "EchoTime2") == ("no second echo (1 announced)", "4.2 ± 0.2 ms", "timing")
    assert "EchoTime2" not in verdict.pending


# ------------------------------------------------------------------------------------ provisional, pending


def test_first_image_of_echo_one_passes_with_echo_two_pending(seed: SequenceProtocol) -> None:
    verdict = evaluate(seed, arriving_view((2.1,)), final=False)
    assert verdict.outcome is Outcome.PASS
    assert verdict.reasons == ()
    assert verdict.pending == ("EchoTime2",)


def test_second_echo_arriving_first_is_not_taken_for_echo_one(seed: SequenceProtocol) -> None:
    verdict = evaluate(seed, arriving_view((4.2,)), final=False)
    assert verdict.outcome is Outcome.PASS
    assert verdict.pending == ("EchoTime1",)


def test_a_wrong_second_echo_arriving_first_is_rejected_at_once(seed: SequenceProtocol) -> None:
    verdict = evaluate(seed, arriving_view((4.8,)), final=False)
    assert verdict.outcome is Outcome.REJECT
    assert only_reason(verdict, "EchoTime2") == ("4.8 ms", "4.2 ± 0.2 ms", "timing")
    assert verdict.pending == ("EchoTime1",)


def test_unstated_counts_leave_their_rules_pending(seed: SequenceProtocol) -> None:
    view = replace(arriving_view((2.1,)), expected_echoes=None, expected_slices=None)
    verdict = evaluate(seed, view, final=False)
    assert verdict.outcome is Outcome.PASS
    assert verdict.pending == ("EchoCount", "EchoTime2", "FieldOfView")


def test_a_second_echo_completes_the_provisional_verdict(seed: SequenceProtocol) -> None:
    verdict = evaluate(seed, arriving_view((2.1, 4.2)), final=False)
    assert (verdict.outcome, verdict.reasons, verdict.pending) == (Outcome.PASS, (), ())


def test_unstated_magnitude_waits_then_rejects_at_the_end(seed: SequenceProtocol) -> None:
    # GE: ImageType ORIGINAL\PRIMARY\OTHER; without the private complex-component code nobody can tell.
    view = replace(seed_view(), image_type=("ORIGINAL", "PRIMARY", "OTHER"), magnitude=None)
    provisional = evaluate(seed, view, final=False)
    assert (provisional.outcome, provisional.pending) == (Outcome.PASS, ("ImageType",))
    final = evaluate(seed, view, final=True)
    assert final.outcome is Outcome.REJECT
    assert final.pending == ()
    found, _, category = only_reason(final, "ImageType")
    assert (found, category) == ("ORIGINAL\\PRIMARY\\OTHER (magnitude or not is not stated)", "image")


def test_a_final_verdict_on_an_open_acquisition_is_refused(seed: SequenceProtocol) -> None:
    with pytest.raises(ValueError, match=r"view\.ended_by is ''; expected one of count, quiet"):
        evaluate(seed, arriving_view((2.1,)), final=True)


def test_decided_at_is_now_unless_given(seed: SequenceProtocol) -> None:
    before = time.time()
    verdict = evaluate(seed, seed_view(), final=False)
    assert before <= verdict.decided_at <= time.time()
    assert evaluate(seed, seed_view(), final=False, now=42.5).decided_at == 42.5


# ------------------------------------------------------------------------------------------- completeness


def test_missing_slices_make_the_final_verdict_incomplete_and_are_located(seed: SequenceProtocol) -> None:
    full = grid()
    lost = full[:40] + full[43:]
    verdict = evaluate(seed, quiet_view((full, lost)), final=True)
    assert verdict.outcome is Outcome.INCOMPLETE
    assert verdict.pending == ()
    found, required, category = only_reason(verdict, "SlicesPerEcho")
    assert found == "97 of 100 images at TE 4.2 ms (3 missing, at -8.55, -7.65, -6.75 mm)"
    assert (required, category) == ("100 images per echo", "completeness")


def test_slices_missing_from_both_echoes_at_the_end_are_counted(seed: SequenceProtocol) -> None:
    short = grid(96)
    verdict = evaluate(seed, quiet_view((short, short)), final=True)
    assert verdict.outcome is Outcome.INCOMPLETE
    found = [r.found for r in verdict.reasons if r.attribute == "SlicesPerEcho"]
    assert found == [
        "96 of 100 images at TE 2.1 ms (4 missing, 4 beyond the ends of the slab received)",
        "96 of 100 images at TE 4.2 ms (4 missing, 4 beyond the ends of the slab received)",
    ]


def test_many_missing_slices_are_counted_not_listed(seed: SequenceProtocol) -> None:
    full = grid()
    lost = full[:20] + full[20 + MAX_LISTED_POSITIONS + 1 :]
    verdict = evaluate(seed, quiet_view((full, lost)), final=True)
    found, _, _ = only_reason(verdict, "SlicesPerEcho")
    assert found == "94 of 100 images at TE 4.2 ms (6 missing, 6 of them inside the slab)"


def test_unequal_echoes_without_a_stated_count_are_incomplete(seed: SequenceProtocol) -> None:
    verdict = evaluate(seed, quiet_view((grid(), grid(98)), expected_slices=None), final=True)
    assert verdict.outcome is Outcome.INCOMPLETE
    found, _, _ = only_reason(verdict, "SlicesPerEcho")
    assert found == "98 of 100 images at TE 4.2 ms (2 missing, at 43.65, 44.55 mm)"


def test_an_acquisition_without_stated_counts_passes_when_quiet_and_uniform(seed: SequenceProtocol) -> None:
    view = quiet_view((grid(), grid()), expected_slices=None, expected_echoes=None)
    verdict = evaluate(seed, view, final=True)
    assert (verdict.outcome, verdict.reasons, verdict.pending) == (Outcome.PASS, (), ())


def test_a_second_echo_that_never_arrived_is_incomplete_not_pending(seed: SequenceProtocol) -> None:
    verdict = evaluate(seed, quiet_view((grid(),)), final=True)
    assert verdict.outcome is Outcome.INCOMPLETE
    assert verdict.pending == ()
    assert only_reason(verdict, "EchoTime2") == ("no second echo", "4.2 ± 0.2 ms", "completeness")
    assert only_reason(verdict, "EchoCount") == (
        "images at 1 of 2 echo times (2.1 ms)",
        "2 echoes, as the headers announce",
        "completeness",
    )


def test_a_single_echo_without_a_stated_count_is_rejected_at_the_end(seed: SequenceProtocol) -> None:
    verdict = evaluate(seed, quiet_view((grid(),), expected_echoes=None), final=True)
    assert verdict.outcome is Outcome.REJECT
    assert only_reason(verdict, "EchoCount") == ("1 echo", "2 echoes", "echoes")
    assert only_reason(verdict, "EchoTime2") == ("no second echo", "4.2 ± 0.2 ms", "timing")


def test_a_protocol_failure_outranks_missing_images(seed: SequenceProtocol) -> None:
    full = grid()
    view = replace(quiet_view((full, full[:50])), echo_times_ms=(2.1, 4.8))
    verdict = evaluate(seed, view, final=True)
    assert verdict.outcome is Outcome.REJECT
    assert {r.category for r in verdict.reasons} == {"timing", "completeness"}


# -------------------------------------------------------------------------------------------- consistency


def test_a_duplicate_position_rejects(seed: SequenceProtocol) -> None:
    full = grid()
    doubled = tuple(sorted((*full, full[10] + GRID_TOLERANCE_MM / 2)))
    verdict = evaluate(seed, seed_view(positions_mm=(doubled, full)), final=True)
    assert verdict.outcome is Outcome.REJECT
    found, required, category = only_reason(verdict, "ImagePositionPatient")
    assert found == "a second image at -35.54 mm at TE 2.1 ms"
    assert (required, category) == ("one image per slice position", "consistency")


def test_non_uniform_spacing_rejects(seed: SequenceProtocol) -> None:
    full = grid()
    uneven = full[:50] + tuple(p + 0.45 for p in full[50:])
    verdict = evaluate(seed, seed_view(positions_mm=(uneven, uneven)), final=True)
    assert verdict.outcome is Outcome.REJECT
    steps = [r for r in verdict.reasons if r.attribute == "SpacingBetweenSlices"]
    assert [r.found for r in steps] == [
        "steps of 1.35 mm from -0.45 to 0.9 mm at TE 2.1 ms",
        "steps of 1.35 mm from -0.45 to 0.9 mm at TE 4.2 ms",
    ]
    assert {(r.required, r.category) for r in steps} == {("uniform steps of 0.9 ± 0.02 mm", "consistency")}
    # Same positions in both echoes: no cross-echo mismatch, and nothing reported missing.
    assert {r.attribute for r in verdict.reasons} == {"SpacingBetweenSlices"}


def test_echo_positions_off_the_first_echo_reject(seed: SequenceProtocol) -> None:
    verdict = evaluate(
        seed, seed_view(positions_mm=(grid(), grid(start=FIRST_POSITION_MM + 0.45))), final=True
    )
    assert verdict.outcome is Outcome.REJECT
    found, required, category = only_reason(verdict, "ImagePositionPatient")
    assert found.startswith("TE 4.2 ms slices at -44.1, -43.2, -42.3, -41.4, -40.5 mm (100 in all)")
    assert found.endswith("not at the TE 2.1 ms positions")
    assert (required, category) == ("the same slice positions in every echo", "consistency")
    assert [r.attribute for r in verdict.reasons] == ["ImagePositionPatient"]


def test_echoes_shifted_by_a_whole_slice_reject(seed: SequenceProtocol) -> None:
    shifted = grid(start=FIRST_POSITION_MM + SPACING_MM)
    verdict = evaluate(seed, seed_view(positions_mm=(grid(), shifted)), final=True)
    assert verdict.outcome is Outcome.REJECT
    found, required, category = only_reason(verdict, "ImagePositionPatient")
    assert found == (
        "101 slice positions 0.9 mm apart across the echoes "
        "(TE 2.1 ms from -44.55 to 44.55 mm; TE 4.2 ms from -43.65 to 45.45 mm)"
    )
    assert (required, category) == ("the same 100 slice positions in every echo", "consistency")


def test_an_extra_echo_rejects(seed: SequenceProtocol) -> None:
    view = seed_view(echo_times_ms=(2.1, 4.2, 6.3))
    verdict = evaluate(seed, view, final=True)
    assert verdict.outcome is Outcome.REJECT
    assert only_reason(verdict, "EchoCount") == (
        "3 echo times (2.1 ms, 4.2 ms, 6.3 ms)",
        "2 echoes, as the headers announce",
        "consistency",
    )


def test_recorded_inconsistencies_reject_the_final_verdict_only(seed: SequenceProtocol) -> None:
    text = (
        "ImageOrientationPatient: (0, 1, 0, 0, 0, -1) in the first image, (1, 0, 0, 0, 1, 0) in a later one"
    )
    view = replace(seed_view(), inconsistencies=(text, "something odd"))
    assert evaluate(seed, view, final=False).outcome is Outcome.PASS
    verdict = evaluate(seed, view, final=True)
    assert verdict.outcome is Outcome.REJECT
    assert only_reason(verdict, "ImageOrientationPatient") == (
        "(0, 1, 0, 0, 0, -1) in the first image, (1, 0, 0, 0, 1, 0) in a later one",
        "the same value in every image",
        "consistency",
    )
    assert only_reason(verdict, "Images")[0] == "something odd"


def test_single_slice_echoes_compare_counts_without_a_grid(seed: SequenceProtocol) -> None:
    view = replace(
        quiet_view(((FIRST_POSITION_MM,), (FIRST_POSITION_MM + 0.3,)), expected_slices=2),
        slice_spacing_mm=None,
    )
    verdict = evaluate(seed, view, final=True)
    assert verdict.outcome is Outcome.REJECT
    assert [r.found for r in verdict.reasons if r.attribute == "SlicesPerEcho"] == [
        "1 of 2 images at TE 2.1 ms (1 missing)",
        "1 of 2 images at TE 4.2 ms (1 missing)",
    ]
    found, _, category = only_reason(verdict, "ImagePositionPatient")
    assert (found, category) == (
        "TE 4.2 ms slices at -44.25 mm, not at the TE 2.1 ms positions",
        "consistency",
    )


# --------------------------------------------------------------------------------------- other attributes


def test_every_attribute_a_protocol_may_name_can_be_evaluated(tmp_path: Path) -> None:
    assert set(ATTRIBUTES) <= SUPPORTED_ATTRIBUTES
    path = tmp_path / "slices.toml"
    path.write_text(
        'id = "slices"\nversion = "1"\ndescription = "slice count only"\n'
        "[rules.SliceCount]\nmin = 120\n"
        '[rules.EchoTime3]\nmin = 5.0\nunit = "ms"\n',
        encoding="utf-8",
    )
    protocol = load_protocol(path)
    verdict = evaluate(protocol, seed_view(echo_times_ms=(2.1, 4.2, 6.3), expected_slices=100), final=False)
    assert verdict.outcome is Outcome.REJECT
    assert [(r.attribute, r.found, r.required, r.category) for r in verdict.reasons] == [
        ("SliceCount", "100 slices", "≥ 120 slices", "geometry")
    ]


# ------------------------------------------------------------------------------------------------ format


def test_format_verdict_reads_as_text(seed: SequenceProtocol) -> None:
    view = replace(arriving_view((4.8,)), pixel_bandwidth_hz=300.0)
    text = format_verdict(evaluate(seed, view, final=False))
    assert text.splitlines() == [
        f"REJECT (provisional) against protocol {SEED_ID} version {seed.version}, acquisition acq-0001",
        "  - EchoTime2: found 4.8 ms; required 4.2 ± 0.2 ms [timing]",
        "  - PixelBandwidth: found 300 Hz/px; required > 500 and ≤ 640 Hz/px [bandwidth]",
        "  waiting for: EchoTime1",
    ]
    passing = format_verdict(evaluate(seed, seed_view(), final=True))
    assert passing.splitlines()[1:] == ["  every rule passed"]
    assert passing.startswith("PASS (final)")
