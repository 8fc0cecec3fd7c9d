"""The console series on the status topic (schema 1.3): SeriesNumber and SeriesDescription from the headers, in
verdicts and in ``received`` counts, through the real assembler and validator stage on simulated exports.

The validator stage runs on a clock the test advances, so which updates send a ``received`` message is decided
by the interval rule, not by how fast this machine is.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from agent_support import TEST_PROTOCOL_ID, write_test_protocol

from agent.cli.listen import describe_status
from agent.file_labels import UID_PLACEHOLDER
from agent.ingest.assembler import Assembler
from agent.publish.wire import SCHEMA, StatusMessage, decode, encode
from agent.records import AcquisitionUpdate, ArrivedFile, StatusEvent
from agent.status_events import received_event, series_fields
from agent.validation.protocol_files import load_protocol
from agent.validation.validator import RECEIVED_INTERVAL_S, ValidatorStage
from agent.vocabulary import ArrivalSource, StatusKind, UpdateKind
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.scanner.export import (
    PHILIPS_SERIES_NUMBER,
    SIEMENS_SERIES_NUMBER,
    ExportOptions,
    OutputFormat,
    SimulationRequest,
    export_case,
)
from engines.scanner.mr_classic import siemens_protocol_name
from engines.scanner.mr_enhanced import philips_protocol_name

FOV_MM = (60.0, 60.0, 24.0)
SEED = 900401


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    request = SimulationRequest(seed=SEED, settings=(), echoes=None, fov_mm=FOV_MM, supersample=1)
    return generate_case(SEED, request.acquisition(), supersample=1)


def assemble(folder: Path) -> list[AcquisitionUpdate]:
    """Every file of ``folder`` through the real assembler, one at a time as the agent's stage feeds it."""
    updates: list[AcquisitionUpdate] = []
    assembler = Assembler(updates.append, quiet_period_s=float("inf"))
    for path in sorted(folder.rglob("*.dcm")):
        assembler.add_file(ArrivedFile(path, path.stat().st_size, 0, time.time(), ArrivalSource.EVENT))
        assembler.flush()
    assembler.end_all()
    return updates


class SteppedClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def validate(
    updates: list[AcquisitionUpdate], tmp_path: Path, clock: SteppedClock, step_s: float
) -> list[StatusEvent]:
    protocol = load_protocol(write_test_protocol(tmp_path / "protocols", FOV_MM) / f"{TEST_PROTOCOL_ID}.toml")
    published: list[StatusEvent] = []
    stage = ValidatorStage(
        [protocol], {protocol.id}, forward=lambda _: None, publish=published.append, clock=clock
    )
    for update in updates:
        stage.handle(update)
        clock.now += step_s
    return published


@pytest.mark.parametrize(
    ("output_format", "series_number", "name"),
    [
        (OutputFormat.CLASSIC, SIEMENS_SERIES_NUMBER, siemens_protocol_name),
        (OutputFormat.ENHANCED, PHILIPS_SERIES_NUMBER, philips_protocol_name),
    ],
)
def test_series_number_and_description_are_read_from_classic_and_enhanced_exports(
    case: PhantomCase, tmp_path: Path, output_format: OutputFormat, series_number: int, name: object
) -> None:
    export_case(case, ExportOptions(out_dir=tmp_path / "export", format=output_format))
    updates = assemble(tmp_path / "export")
    description = name(case.acquisition)  # type: ignore[operator]
    assert description  # the simulator names its series as a console does

    for update in updates:
        assert update.view.series_numbers == (series_number,)
        assert update.view.series_description == description

    published = validate(updates, tmp_path, SteppedClock(), RECEIVED_INTERVAL_S)
    verdicts = [e for e in published if e.kind == StatusKind.VERDICT]
    assert verdicts and all(
        (v.body["series_number"], v.body["series_description"]) == (series_number, description)
        for v in verdicts
    )
    last = [e for e in published if e.kind == StatusKind.RECEIVED][-1]
    assert (last.body["series_number"], last.body["series_description"]) == (series_number, description)


def test_received_counts_grow_are_throttled_and_end_with_the_acquisition(
    case: PhantomCase, tmp_path: Path
) -> None:
    export_case(case, ExportOptions(out_dir=tmp_path / "export"))
    updates = assemble(tmp_path / "export")
    slices, echoes = case.geometry.shape[0], len(case.acquisition.echo_times_ms)
    image_updates = [u for u in updates if u.kind is UpdateKind.IMAGES]
    assert len(image_updates) == slices * echoes - 1  # one per file; the last file completes the acquisition

    # Four updates per interval (binary fractions: no rounding): the first, every fourth, then the final one.
    clock = SteppedClock()
    published = validate(updates, tmp_path, clock, RECEIVED_INTERVAL_S / 4)
    received = [e for e in published if e.kind == StatusKind.RECEIVED]
    counts = [e.body["images_received"] for e in received]
    assert counts[0] == 1
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert len(received) == len(range(0, len(image_updates), 4)) + 1
    final = received[-1]
    assert final.body["ended"] is True and final.body["ended_by"] == "count"
    assert final.body["images_received"] == final.body["images_expected"] == slices * echoes
    assert final.body["slices_per_echo"] == [slices] * echoes
    assert (final.body["expected_slices"], final.body["expected_echoes"]) == (slices, echoes)
    assert len(final.body["echo_times_ms"]) == echoes
    assert all(e.body["ended"] is False and e.body["ended_by"] == "" for e in received[:-1])
    assert final.body["first_image_at"] <= final.body["last_image_at"]
    # Each acquisition's first received precedes its first verdict: a screen knows the series before judging it.
    assert published[0].kind == StatusKind.RECEIVED


def test_a_count_held_back_goes_out_when_the_stage_is_idle(case: PhantomCase, tmp_path: Path) -> None:
    export_case(case, ExportOptions(out_dir=tmp_path / "export"))
    updates = [u for u in assemble(tmp_path / "export") if u.kind is UpdateKind.IMAGES][:3]
    protocol = load_protocol(write_test_protocol(tmp_path / "protocols", FOV_MM) / f"{TEST_PROTOCOL_ID}.toml")
    published: list[StatusEvent] = []
    clock = SteppedClock()
    stage = ValidatorStage(
        [protocol], {protocol.id}, forward=lambda _: None, publish=published.append, clock=clock
    )

    def received() -> list[int]:
        return [e.body["images_received"] for e in published if e.kind == StatusKind.RECEIVED]

    for update in updates:
        stage.handle(update)
    assert received() == [1]
    stage.idle()
    assert received() == [1]  # the interval has not passed
    clock.now += RECEIVED_INTERVAL_S
    stage.idle()
    assert received() == [1, 3]  # the newest count held back, once
    clock.now += RECEIVED_INTERVAL_S
    stage.idle()
    assert received() == [1, 3]


def test_series_description_goes_through_redact(case: PhantomCase, tmp_path: Path) -> None:
    export_case(case, ExportOptions(out_dir=tmp_path / "export"))
    view = assemble(tmp_path / "export")[-1].view
    typed = replace(view, series_description="dual echo 1.3.6.1.4.1.99999.31337.7", series_numbers=(7, 5))
    fields = series_fields(typed)
    assert fields == {"series_number": 5, "series_description": f"dual echo {UID_PLACEHOLDER}"}
    assert received_event(typed, 0.0).body["series_description"] == f"dual echo {UID_PLACEHOLDER}"
    none = replace(view, series_description="", series_numbers=())
    assert series_fields(none) == {"series_number": None, "series_description": ""}


def test_received_on_the_wire_and_in_listen(case: PhantomCase, tmp_path: Path) -> None:
    export_case(case, ExportOptions(out_dir=tmp_path / "export"))
    updates = assemble(tmp_path / "export")
    published = validate(updates, tmp_path, SteppedClock(), RECEIVED_INTERVAL_S)
    messages = [decode([bytes(f) for f in encode(e, n, "p", 0.0)]) for n, e in enumerate(published, 1)]
    assert all(isinstance(m, StatusMessage) and m.schema == SCHEMA == "sct-edge/1.4" for m in messages)
    name = siemens_protocol_name(case.acquisition)
    slices, echoes = case.geometry.shape[0], len(case.acquisition.echo_times_ms)
    lines = [describe_status(m) for m in messages if isinstance(m, StatusMessage)]
    first_id = published[0].acquisition_id
    assert (
        lines[0] == f"received {first_id} series {SIEMENS_SERIES_NUMBER} {name!r}: 1/{slices * echoes} images"
    )
    assert (
        f"received {first_id} series 5 {name!r}: {slices * echoes}/{slices * echoes} images, ended (count)"
        in lines
    )
    final_verdict = next(line for line in reversed(lines) if line.startswith("verdict"))
    assert final_verdict.startswith(f"verdict {first_id} series 5 {name!r}: ")
    assert f"(final, protocol {TEST_PROTOCOL_ID}" in final_verdict
