"""Protocol files: the shipped seed protocol, the rule semantics, and every way a file can be malformed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR, load_protocol, load_protocols
from agent.validation.protocols import (
    CountRule,
    NumberRule,
    OrientationRule,
    ProtocolError,
    SequenceProtocol,
    TokenRule,
    VectorRule,
    format_number,
)
from engines.model.manifest import ModelManifest
from engines.phantom.acquisition import SEED_PROTOCOL
from sct_core.geometry import Orientation

SEED_ID = "bonemri_lumbar_1p5t"
HEADER = 'id = "proto"\nversion = "1.0"\ndescription = "a test protocol"\n'
TR_RULE = '[rules.RepetitionTime]\nvalue = 7.0\ntolerance = 0.5\nunit = "ms"\n'


def write(folder: Path, text: str, name: str = "proto") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def seed() -> SequenceProtocol:
    return load_protocol(SHIPPED_PROTOCOLS_DIR / f"{SEED_ID}.toml")


def number_rule(protocol: SequenceProtocol, attribute: str) -> NumberRule:
    rule = protocol.rule(attribute)
    assert isinstance(rule, NumberRule), rule
    return rule


# ------------------------------------------------------------------------------------------ shipped protocol


def test_shipped_folder_is_the_repository_folder() -> None:
    repository = Path(__file__).resolve().parent.parent
    assert repository / "sequence_protocols" == SHIPPED_PROTOCOLS_DIR
    assert (SHIPPED_PROTOCOLS_DIR / "README.md").is_file()


def test_the_seed_protocol_loads_with_its_rules(seed: SequenceProtocol) -> None:
    assert seed.id == SEED_ID
    assert seed.version == "1.0.0"
    assert "1.5 T" in seed.description
    assert seed.path == SHIPPED_PROTOCOLS_DIR / f"{SEED_ID}.toml"
    assert [(r.attribute, r.requirement()) for r in seed.rules] == [
        ("MRAcquisitionType", "3D"),
        ("ScanningSequence", "GR without IR"),
        ("SequenceVariant", "SP without MP"),
        ("InversionTime", "absent (no inversion preparation)"),
        ("EchoCount", "2 echoes"),
        ("EchoTime1", "2.1 ± 0.15 ms"),
        ("EchoTime2", "4.2 ± 0.2 ms"),
        ("RepetitionTime", "7 ± 0.5 ms"),
        ("FlipAngle", "10 ± 2 deg"),
        ("PixelBandwidth", "> 500 and ≤ 640 Hz/px"),
        ("MagneticFieldStrength", "1.5 ± 0.1 T"),
        ("PixelSpacing", "0.74 × 0.74 ± 0.02 mm"),
        ("SpacingBetweenSlices", "0.9 ± 0.05 mm"),
        ("FieldOfView", "250 ± 12.5 × 250 ± 12.5 × 90 ± 10 mm"),
        ("Orientation", "sagittal, ≤ 8° oblique"),
        ("ImageType", "magnitude without DERIVED/W/F/IP/OP/WATER/FAT/IN_PHASE/OUT_PHASE"),
    ]


def test_the_model_is_validated_on_the_seed_protocol(shipped_manifest: ModelManifest) -> None:
    shipped = {p.id for p in load_protocols(SHIPPED_PROTOCOLS_DIR)}
    assert SEED_ID in shipped_manifest.validated_protocols
    assert set(shipped_manifest.validated_protocols) <= shipped


def test_seed_tolerances_stay_inside_the_models_training_domain(
    seed: SequenceProtocol, shipped_manifest: ModelManifest
) -> None:
    """A series that passes must look like something the model was trained on (manifest training.recipe)."""
    recipe = shipped_manifest.training["recipe"]
    te1, te2 = shipped_manifest.echo_times_ms
    for attribute, nominal, jitter in (
        ("EchoTime1", te1, recipe["te1_jitter_ms"]),
        ("EchoTime2", te2, recipe["te2_jitter_ms"]),
        ("RepetitionTime", SEED_PROTOCOL.repetition_time_ms, recipe["tr_jitter_ms"]),
    ):
        rule = number_rule(seed, attribute)
        assert rule.value == nominal, attribute
        assert rule.tolerance is not None and rule.tolerance <= jitter, attribute
    low, high = recipe["flip_angle_range_deg"]
    flip = number_rule(seed, "FlipAngle")
    assert (
        not flip.admits(low - 0.01)
        and flip.admits(low)
        and flip.admits(high)
        and not flip.admits(high + 0.01)
    )
    bw_low, bw_high = recipe["pixel_bandwidth_range_hz"]
    bandwidth = number_rule(seed, "PixelBandwidth")
    assert bandwidth.greater_than is not None and bandwidth.greater_than >= bw_low
    assert bandwidth.maximum is not None and bandwidth.maximum <= bw_high
    assert bandwidth.admits(SEED_PROTOCOL.pixel_bandwidth_hz)
    orientation = seed.rule("Orientation")
    assert isinstance(orientation, OrientationRule)
    assert orientation.equals == Orientation(shipped_manifest.orientation)
    assert orientation.max_oblique_deg is not None
    assert orientation.max_oblique_deg <= max(abs(a) for a in recipe["oblique_range_deg"])
    slice_spacing, row_spacing, column_spacing = shipped_manifest.spacing_mm
    pixel = seed.rule("PixelSpacing")
    assert isinstance(pixel, VectorRule) and pixel.value == (row_spacing, column_spacing)
    assert number_rule(seed, "SpacingBetweenSlices").value == slice_spacing
    field = number_rule(seed, "MagneticFieldStrength")
    assert field.admits(SEED_PROTOCOL.field_strength_t) and not field.admits(3.0)


def test_load_protocols_selects_active_ids_in_order(tmp_path: Path) -> None:
    write(tmp_path, HEADER.replace('"proto"', '"a"') + TR_RULE, "a")
    write(tmp_path, HEADER.replace('"proto"', '"b"') + TR_RULE, "b")
    assert [p.id for p in load_protocols(tmp_path)] == ["a", "b"]
    assert [p.id for p in load_protocols(tmp_path, ("b", "a"))] == ["b", "a"]
    assert [p.id for p in load_protocols(SHIPPED_PROTOCOLS_DIR, (SEED_ID,))] == [SEED_ID]


# ------------------------------------------------------------------------------------------- rule semantics


def test_rule_forms_parse_into_their_rule_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER
        + '[rules.PixelBandwidth]\nmin = 400\nless_than = 800\nunit = "Hz/px"\n'
        + "[rules.EchoCount]\nmin = 2\nmax = 4\n"
        + '[rules.ScanningSequence]\nincludes = ["gr"]\n'
        + '[rules.FieldOfView]\nvalue = [250, 250, 90]\ntolerance = 10\nunit = "mm"\n'
        + '[rules.Orientation]\nequals = "Axial"\n',
    )
    protocol = load_protocol(path)
    assert protocol.rules == (
        NumberRule("PixelBandwidth", "Hz/px", minimum=400.0, less_than=800.0),
        CountRule("EchoCount", "echoes", "echo", minimum=2, maximum=4),
        TokenRule("ScanningSequence", ("GR",), ()),
        VectorRule("FieldOfView", "mm", (250.0, 250.0, 90.0), (10.0, 10.0, 10.0)),
        OrientationRule("Orientation", Orientation.AXIAL, None),
    )
    assert [r.requirement() for r in protocol.rules] == [
        "≥ 400 and < 800 Hz/px",
        "≥ 2 and ≤ 4 echoes",
        "GR",
        "250 × 250 × 90 ± 10 mm",
        "axial",
    ]


def test_bounds_are_inclusive_or_exclusive_as_named() -> None:
    rule = NumberRule("PixelBandwidth", "Hz/px", greater_than=500.0, maximum=640.0)
    assert [rule.admits(x) for x in (500.0, 500.01, 640.0, 640.01)] == [False, True, True, False]
    rule = NumberRule("PixelBandwidth", "Hz/px", minimum=500.0, less_than=640.0)
    assert [rule.admits(x) for x in (499.99, 500.0, 639.99, 640.0)] == [False, True, True, False]
    te = NumberRule("EchoTime2", "ms", value=4.2, tolerance=0.2)
    assert [te.admits(x) for x in (3.99, 4.0, 4.4, 4.41)] == [False, True, True, False]


@pytest.mark.parametrize(
    ("value", "text"), [(4.2, "4.2"), (500.0, "500"), (0.74, "0.74"), (250.12, "250.12"), (-0.0001, "0")]
)
def test_numbers_read_as_a_technologist_writes_them(value: float, text: str) -> None:
    assert format_number(value) == text


# ------------------------------------------------------------------------------------------- malformed files

MALFORMED: list[tuple[str, str, str, str]] = [
    ("TOML syntax", HEADER + "[rules.RepetitionTime\nvalue = 7\n", "(TOML syntax)", "Expected"),
    ("missing id", HEADER.replace('id = "proto"\n', "") + TR_RULE, "id", "missing"),
    ("missing version", HEADER.replace('version = "1.0"\n', "") + TR_RULE, "version", "missing"),
    (
        "missing description",
        HEADER.replace('description = "a test protocol"\n', "") + TR_RULE,
        "description",
        "missing",
    ),
    ("missing rules", HEADER, "rules", "missing"),
    ("id is not the file stem", HEADER.replace('"proto"', '"other"') + TR_RULE, "id", "'other'; expected"),
    ("version not a string", HEADER.replace('"1.0"', "1.0") + TR_RULE, "version", "found a number (1.0)"),
    ("empty description", HEADER.replace('"a test protocol"', '" "') + TR_RULE, "description", "empty"),
    ("unknown top-level key", HEADER + "field_strength = 1.5\n" + TR_RULE, "field_strength", "unknown key"),
    ("empty rules", HEADER + "[rules]\n", "rules", "found no rules"),
    ("unknown attribute", HEADER + "[rules.EchoTimes]\nequals = 2\n", "rules.EchoTimes", "unknown attribute"),
    (
        "EchoTime0",
        HEADER + '[rules.EchoTime0]\nvalue = 2\ntolerance = 1\nunit = "ms"\n',
        "rules.EchoTime0",
        "unknown",
    ),
    ("rule not a table", HEADER + 'rules.MRAcquisitionType = "3D"\n', "rules.MRAcquisitionType", "a string"),
    (
        "unknown rule key",
        HEADER + TR_RULE + "tolerence = 1\n",
        "rules.RepetitionTime.tolerence",
        "unknown key",
    ),
    (
        "number as string",
        HEADER + TR_RULE.replace("0.5", '"0.5"'),
        "rules.RepetitionTime.tolerance",
        "a string",
    ),
    ("boolean as number", HEADER + TR_RULE.replace("7.0", "true"), "rules.RepetitionTime.value", "a boolean"),
    (
        "wrong unit",
        HEADER + TR_RULE.replace('"ms"', '"s"'),
        "rules.RepetitionTime.unit",
        "found 's'; expected 'ms'",
    ),
    ("missing unit", HEADER + TR_RULE.replace('unit = "ms"\n', ""), "rules.RepetitionTime.unit", "missing"),
    (
        "value without tolerance",
        HEADER + TR_RULE.replace("tolerance = 0.5\n", ""),
        "rules.RepetitionTime.tolerance",
        "missing",
    ),
    ("negative tolerance", HEADER + TR_RULE.replace("0.5", "-0.5"), "rules.RepetitionTime.tolerance", ">= 0"),
    ("value and bounds", HEADER + TR_RULE + "min = 6\n", "rules.RepetitionTime.min", "one form or the other"),
    (
        "no condition",
        HEADER + '[rules.RepetitionTime]\nunit = "ms"\n',
        "rules.RepetitionTime",
        "found no condition",
    ),
    (
        "min and greater_than",
        HEADER + '[rules.PixelBandwidth]\nmin = 500\ngreater_than = 500\nunit = "Hz/px"\n',
        "rules.PixelBandwidth.greater_than",
        "one lower/upper bound",
    ),
    (
        "empty range",
        HEADER + '[rules.PixelBandwidth]\nmin = 700\nmax = 600\nunit = "Hz/px"\n',
        "rules.PixelBandwidth",
        "lower bound 700.0 >= upper bound 600.0",
    ),
    (
        "count as float",
        HEADER + "[rules.EchoCount]\nequals = 2.0\n",
        "rules.EchoCount.equals",
        "expected an integer",
    ),
    (
        "count equals and min",
        HEADER + "[rules.EchoCount]\nequals = 2\nmin = 1\n",
        "rules.EchoCount.equals",
        "one form",
    ),
    (
        "count min > max",
        HEADER + "[rules.SliceCount]\nmin = 9\nmax = 8\n",
        "rules.SliceCount",
        "min 9 > max 8",
    ),
    (
        "vector of the wrong length",
        HEADER + '[rules.PixelSpacing]\nvalue = [0.74]\ntolerance = 0.02\nunit = "mm"\n',
        "rules.PixelSpacing.value",
        "an array of 2 numbers",
    ),
    (
        "vector component not a number",
        HEADER + '[rules.PixelSpacing]\nvalue = [0.74, "x"]\ntolerance = 0.02\nunit = "mm"\n',
        "rules.PixelSpacing.value[1]",
        "expected a number",
    ),
    (
        "unknown orientation",
        HEADER + '[rules.Orientation]\nequals = "oblique"\n',
        "rules.Orientation.equals",
        "expected one of sagittal, coronal, axial",
    ),
    (
        "obliquity beyond 90",
        HEADER + '[rules.Orientation]\nequals = "sagittal"\nmax_oblique_deg = 120\n',
        "rules.Orientation.max_oblique_deg",
        "0 to 90",
    ),
    (
        "token in includes and excludes",
        HEADER + '[rules.ScanningSequence]\nincludes = ["GR"]\nexcludes = ["gr"]\n',
        "rules.ScanningSequence.excludes",
        "GR in includes and excludes",
    ),
    (
        "tokens not an array",
        HEADER + '[rules.ScanningSequence]\nincludes = "GR"\n',
        "rules.ScanningSequence.includes",
        "expected an array of strings",
    ),
    (
        "magnitude outside ImageType",
        HEADER + "[rules.ScanningSequence]\nmagnitude = true\n",
        "rules.ScanningSequence.magnitude",
        "unknown key",
    ),
    (
        "magnitude not a boolean",
        HEADER + '[rules.ImageType]\nmagnitude = "yes"\n',
        "rules.ImageType.magnitude",
        "true or false",
    ),
    (
        "absent = false",
        HEADER + "[rules.InversionTime]\nabsent = false\n",
        "rules.InversionTime.absent",
        "expected true",
    ),
    (
        "text equals a number",
        HEADER + "[rules.MRAcquisitionType]\nequals = 3\n",
        "rules.MRAcquisitionType.equals",
        "a string",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), [pytest.param(*c[1:], id=c[0]) for c in MALFORMED])
def test_a_malformed_file_names_the_file_and_the_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ProtocolError) as caught:
        load_protocol(path)
    assert (caught.value.path, caught.value.attribute) == (path, key)
    assert str(caught.value).startswith(f"{path}: {key}: ")
    assert problem in caught.value.problem


def test_an_unreadable_file_is_a_protocol_error(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(b'id = "latin"\ndescription = "\xe9"\n')
    with pytest.raises(ProtocolError, match="is not UTF-8 text") as caught:
        load_protocol(path)
    assert caught.value.path == path
    with pytest.raises(ProtocolError, match="cannot be read"):
        load_protocol(tmp_path / "absent.toml")


def test_an_active_id_without_a_file_names_the_id_and_the_folder(tmp_path: Path) -> None:
    write(tmp_path, HEADER + TR_RULE)
    with pytest.raises(ProtocolError) as caught:
        load_protocols(tmp_path, ("proto", "bonemri_lumbar_3t"))
    assert (caught.value.path, caught.value.attribute) == (tmp_path, "active[1]")
    assert "'bonemri_lumbar_3t'" in str(caught.value) and str(tmp_path) in str(caught.value)
    with pytest.raises(ProtocolError, match=r"active\[1\]: protocol id 'proto' is listed twice"):
        load_protocols(tmp_path, ("proto", "proto"))


def test_a_malformed_inactive_file_still_stops_start_up(tmp_path: Path) -> None:
    write(tmp_path, HEADER + TR_RULE)
    bad = write(tmp_path, HEADER.replace('"proto"', '"draft"') + "[rules.Bogus]\nequals = 1\n", "draft")
    with pytest.raises(ProtocolError) as caught:
        load_protocols(tmp_path, ("proto",))
    assert (caught.value.path, caught.value.attribute) == (bad, "rules.Bogus")


def test_a_folder_without_protocols_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match=r"found no \*\.toml protocol files"):
        load_protocols(tmp_path)
    with pytest.raises(ProtocolError, match="not found"):
        load_protocols(tmp_path / "missing")
