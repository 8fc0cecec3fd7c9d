"""One canonical line per acquisition, at its end, whatever the path: reject, incomplete, not inferred,
published (with and without DICOM, events in either order), failed; bounded; and the stage thread that tells
the error hook which acquisition failed."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

import pytest

from agent.ops.acquisition_summary import MAX_OPEN, AcquisitionSummaries, AcquisitionSummary
from agent.records import Reason, Verdict
from agent.stage_thread import Stage, each
from agent.validation.validator import VerdictReport
from agent.vocabulary import AcquisitionEnd, EndedBy, Outcome

ECHO2 = Reason("lumbar", "EchoTime2", "4.8 ms", "4.2 ± 0.2 ms", "timing")


def report(
    acquisition_id: str,
    outcome: Outcome = Outcome.PASS,
    *,
    final: bool = True,
    infer: bool = True,
    reasons: tuple[Reason, ...] = (),
    first_s: float | None = None,
) -> VerdictReport:
    verdict = Verdict(acquisition_id, "lumbar", "1.0.0", outcome, final, reasons, (), 0.0)
    return VerdictReport(
        verdict=verdict,
        first_image_to_verdict_s=first_s,
        completion_delay_s=0.05 if final else None,
        ended_by=EndedBy.COUNT if final else EndedBy.OPEN,
        infer=infer,
        refusal="" if infer else "image kind: found phase, expected magnitude images",
        slices_per_echo=(40, 40),
        expected_slices=40,
    )


@dataclass
class Lines:
    summaries: list[AcquisitionSummary]

    def make(self, *, dicom: bool = True) -> AcquisitionSummaries:
        return AcquisitionSummaries(
            backend="torch-eager", precision="fp32", dicom_enabled=dicom, emit=self.summaries.append
        )

    @property
    def outcomes(self) -> list[tuple[str, AcquisitionEnd]]:
        return [(s.acquisition_id, s.outcome) for s in self.summaries]


@pytest.fixture
def lines() -> Lines:
    return Lines([])


def test_a_rejected_acquisition_ends_at_its_final_verdict_with_its_reasons(lines: Lines) -> None:
    summaries = lines.make()
    summaries.verdict(report("a", Outcome.REJECT, final=False, reasons=(ECHO2,), first_s=0.004))
    assert lines.summaries == []
    summaries.verdict(report("a", Outcome.REJECT, reasons=(ECHO2,)))
    (summary,) = lines.summaries
    assert summary.outcome is AcquisitionEnd.REJECTED and summary.reasons == (ECHO2,)
    assert summary.first_image_to_verdict_s == 0.004 and summary.dicom == "none" and summary.slabs == 0
    fields = summary.fields()
    assert fields["event"] == "acquisition_end" and fields["slices_per_echo"] == [40, 40]
    assert fields["reasons"] == [
        {"attribute": "EchoTime2", "found": "4.8 ms", "required": "4.2 ± 0.2 ms", "category": "timing"}
    ]
    json.dumps(fields)  # every field is JSON
    text = summary.text()
    assert text.startswith("acquisition_end acquisition_id=a outcome=rejected protocol_id=lumbar")
    assert 'reasons="EchoTime2: found 4.8 ms, required 4.2 ± 0.2 ms"' in text and "refusal" not in text
    assert summaries.open_count == 0


def test_incomplete_and_not_inferred_end_at_the_final_verdict(lines: Lines) -> None:
    summaries = lines.make()
    summaries.verdict(report("i", Outcome.INCOMPLETE))
    summaries.verdict(report("n", infer=False))
    assert lines.outcomes == [("i", AcquisitionEnd.INCOMPLETE), ("n", AcquisitionEnd.NOT_INFERRED)]
    assert lines.summaries[1].refusal.startswith("image kind: found phase")


@pytest.mark.parametrize("dicom_first", [False, True])
def test_a_published_acquisition_ends_once_volume_and_dicom_series_are_done(
    lines: Lines, dicom_first: bool
) -> None:
    summaries = lines.make()
    summaries.verdict(report("p", first_s=0.01))
    summaries.slab("p", 0.1, 2.0)
    summaries.slab("p", 0.2, 3.0)
    if dicom_first:
        summaries.dicom_written("p", ok=True)
        assert lines.summaries == []
        summaries.volume_sent("p", 5.5)
    else:
        summaries.volume_sent("p", 5.5)
        assert lines.summaries == [], "the line waits for the DICOM series"
        summaries.dicom_written("p", ok=True)
    (summary,) = lines.summaries
    assert (summary.outcome, summary.dicom, summary.slabs) == (AcquisitionEnd.PUBLISHED, "written", 2)
    assert (summary.slab_read_s, summary.slab_inference_s) == pytest.approx((0.3, 5.0))
    assert summary.last_image_to_volume_s == 5.5 and summary.backend == "torch-eager"
    summaries.dicom_written("p", ok=False)  # a late or repeated event: ignored, never a second line
    summaries.volume_sent("p", 1.0)
    assert len(lines.summaries) == 1


def test_without_dicom_output_the_volume_ends_it(lines: Lines) -> None:
    summaries = lines.make(dicom=False)
    summaries.verdict(report("p"))
    summaries.volume_sent("p", 1.0)
    assert lines.outcomes == [("p", AcquisitionEnd.PUBLISHED)] and lines.summaries[0].dicom == "off"


def test_an_engine_failure_ends_it_as_failed_once(lines: Lines) -> None:
    summaries = lines.make()
    summaries.verdict(report("f"))
    summaries.failed("f", "engine", "RuntimeError: out of memory")
    summaries.slab("f", 0.1, 1.0)  # a slab still in the queue
    summaries.failed("f", "engine", "RuntimeError: again")
    (summary,) = lines.summaries
    assert (summary.outcome, summary.failed_stage, summary.error) == (
        AcquisitionEnd.FAILED,
        "engine",
        "RuntimeError: out of memory",
    )
    assert "stage=engine" in summary.text() and 'error="RuntimeError: out of memory"' in summary.text()


def test_a_dicom_stage_failure_after_publishing_is_a_published_line_with_dicom_failed(lines: Lines) -> None:
    summaries = lines.make()
    summaries.verdict(report("d"))
    summaries.failed("d", "dicom", "OSError: No space left on device")
    summaries.volume_sent("d", 2.0)
    assert lines.outcomes == [("d", AcquisitionEnd.PUBLISHED)] and lines.summaries[0].dicom == "failed"


def test_the_accumulator_is_bounded(lines: Lines, caplog: pytest.LogCaptureFixture) -> None:
    summaries = lines.make()
    with caplog.at_level(logging.WARNING, logger="agent.ops.acquisition_summary"):
        for k in range(MAX_OPEN + 3):
            summaries.verdict(report(f"open-{k}", final=False))
    assert summaries.open_count == MAX_OPEN
    assert [r.acquisition_id for r in caplog.records] == ["open-0", "open-1", "open-2"]  # type: ignore[attr-defined]
    summaries.verdict(report("open-0", Outcome.REJECT))  # dropped ones never come back
    assert lines.summaries == []


def test_the_default_emitter_logs_one_info_line_with_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    summaries = AcquisitionSummaries(backend="torch-eager", precision="fp32", dicom_enabled=False)
    with caplog.at_level(logging.INFO, logger="agent.ops.acquisition_summary"):
        summaries.verdict(report("r", Outcome.REJECT, reasons=(ECHO2,)))
    (line,) = caplog.records
    assert line.levelno == logging.INFO and line.getMessage().startswith("acquisition_end acquisition_id=r")
    assert line.event == "acquisition_end" and line.outcome == "rejected"  # type: ignore[attr-defined]
    assert line.json_message == "acquisition r ended: rejected"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Item:
    acquisition_id: str


def test_a_stage_tells_its_error_hook_which_acquisition_failed() -> None:
    failures: list[tuple[str, str, str | None]] = []
    done = threading.Event()

    def handle(item: _Item) -> None:
        if item.acquisition_id == "bad":
            raise RuntimeError("boom")

    def on_error(stage: str, error: BaseException, acquisition_id: str | None) -> None:
        failures.append((stage, str(error), acquisition_id))
        done.set()

    stage: Stage[_Item] = Stage("engine", each(handle), depth=4, on_error=on_error, batch=False)
    stage.start()
    try:
        stage.put(_Item("good"))
        stage.put(_Item("bad"))
        assert done.wait(5)
    finally:
        stage.stop(5)
    assert failures == [("engine", "boom", "bad")]
