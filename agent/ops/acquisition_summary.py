"""The one canonical log line per acquisition: what happened to it, from first image to its end, in one place.

An operator or a log shipper should not have to join a dozen lines to learn what became of a series. Every
acquisition the agent judged gets exactly one INFO line with ``event`` "acquisition_end" when it ends, however
it ends: its outcome, the protocol and version that decided, every failed rule (attribute, found, required),
the slice counts, the latencies, the backend and precision, and whether the DICOM series was written. In the
JSON format all of these are fields; in text the message spells them as ``key=value``.

Where the end is:

- **rejected**, **incomplete**, **not_inferred**: the final verdict; nothing more is done with it.
- **published**: the sCT volume was sent on the wire and, when ``dicom.folder`` is set, the DICOM series was
  written (or failed to be: ``dicom`` says which). The DICOM stage writes after the volume is published, so
  the line waits for it; it does not wait for C-STORE, whose retries against a PACS that is down take minutes
  and which has log lines, metrics and status events of its own.
- **failed**: the first error a stage raised while handling the acquisition (an engine failure, a pixel read);
  the error is also logged with its traceback and published as an ``error`` status event. A DICOM stage error
  after the volume was published ends it as published with ``dicom`` "failed".

An acquisition interrupted by a stop gets no line: after the restart it is processed again and gets its line
then. A volume republished from the archive after a restart is not an acquisition ending again.

The hooks are called from several stage threads (validator, engine, publisher, dicom), so the accumulator
holds a lock; the line is logged outside it. It is bounded: at most :data:`MAX_OPEN` acquisitions are followed
at once (the oldest is dropped with a warning), and the ids of the last :data:`ENDED_MEMORY` ended ones are
kept so that a late event (a slab of a failed acquisition) cannot open a second summary.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from agent.records import Reason
from agent.validation.validator import VerdictReport
from agent.vocabulary import AcquisitionEnd, EndedBy, LogEvent, Outcome

logger = logging.getLogger(__name__)

#: Acquisitions followed at once; a scanner exports one or two at a time, so more means events were lost.
MAX_OPEN: Final = 64
#: Ended acquisitions remembered, so late events for them are ignored rather than opening a new summary.
ENDED_MEMORY: Final = 256
#: Digits kept of a latency in seconds (milliseconds).
_SECONDS_DIGITS: Final = 3

#: ``dicom`` field values.
DICOM_WRITTEN: Final = "written"
DICOM_FAILED: Final = "failed"
#: ``dicom.folder`` is not set: no series is written.
DICOM_OFF: Final = "off"
#: No volume, so no series (rejected, incomplete, not inferred, failed before the volume).
DICOM_NONE: Final = "none"

_VERDICT_ENDS: Final = {
    Outcome.REJECT: AcquisitionEnd.REJECTED,
    Outcome.INCOMPLETE: AcquisitionEnd.INCOMPLETE,
}


@dataclass(frozen=True, slots=True)
class AcquisitionSummary:
    """Everything the canonical line says; :meth:`fields` is its JSON form, :meth:`text` its message."""

    acquisition_id: str
    outcome: AcquisitionEnd
    protocol_id: str
    protocol_version: str
    reasons: tuple[Reason, ...]
    #: Why the model may not run (not_inferred), as attribute, found and expected; "" otherwise.
    refusal: str
    ended_by: str
    slices_per_echo: tuple[int, ...]
    expected_slices: int | None
    first_image_to_verdict_s: float | None
    #: Last image to the detection that the acquisition was complete (the final verdict).
    completion_delay_s: float | None
    last_image_to_volume_s: float | None
    slabs: int
    slab_read_s: float
    slab_inference_s: float
    backend: str
    precision: str
    dicom: str
    #: For failed: the stage and the error (type and text, without paths or UIDs).
    failed_stage: str = ""
    error: str = ""
    #: Regions of the volume its confidence says not to trust (0: checked, none); None: not checked or no volume.
    flagged: int | None = None

    def fields(self) -> dict[str, object]:
        """The structured fields of the line (JSON format)."""
        return {
            "event": str(LogEvent.ACQUISITION_END),
            "acquisition_id": self.acquisition_id,
            "outcome": str(self.outcome),
            "protocol_id": self.protocol_id,
            "protocol_version": self.protocol_version,
            "reasons": [
                {"attribute": r.attribute, "found": r.found, "required": r.required, "category": r.category}
                for r in self.reasons
            ],
            "refusal": self.refusal,
            "ended_by": self.ended_by,
            "slices_per_echo": list(self.slices_per_echo),
            "expected_slices": self.expected_slices,
            "first_image_to_verdict_s": _seconds(self.first_image_to_verdict_s),
            "completion_delay_s": _seconds(self.completion_delay_s),
            "last_image_to_volume_s": _seconds(self.last_image_to_volume_s),
            "slabs": self.slabs,
            "slab_read_s": _seconds(self.slab_read_s),
            "slab_inference_s": _seconds(self.slab_inference_s),
            "backend": self.backend,
            "precision": self.precision,
            "dicom": self.dicom,
            "stage": self.failed_stage,
            "error": self.error,
            "flagged": self.flagged,
        }

    def text(self) -> str:
        """``acquisition_end key=value ...``: one line a person reads and grep/awk split."""
        fields = self.fields()
        reasons = "; ".join(f"{r.attribute}: found {r.found}, required {r.required}" for r in self.reasons)
        fields["reasons"] = reasons
        fields["slices_per_echo"] = ",".join(map(str, self.slices_per_echo))
        shown = {key: value for key, value in fields.items() if key != "event" and value not in ("", None)}
        return f"{LogEvent.ACQUISITION_END} " + " ".join(
            f"{key}={_logfmt(value)}" for key, value in shown.items()
        )


@dataclass(slots=True)
class _Entry:
    acquisition_id: str
    protocol_id: str = ""
    protocol_version: str = ""
    final: VerdictReport | None = None
    first_image_to_verdict_s: float | None = None
    slabs: int = 0
    read_s: float = 0.0
    inference_s: float = 0.0
    volume_sent: bool = False
    last_image_to_volume_s: float | None = None
    flagged: int | None = None
    dicom: str = ""
    failed_stage: str = ""
    error: str = ""


def log_summary(summary: AcquisitionSummary) -> None:
    """The canonical line: INFO, its text as the message, its fields for the JSON format (whose message is
    short: ``json_message``, see :mod:`agent.ops.log_format`)."""
    short = f"acquisition {summary.acquisition_id} ended: {summary.outcome}"
    logger.info("%s", summary.text(), extra={**summary.fields(), "json_message": short})


class AcquisitionSummaries:
    """Follows each acquisition through the side-service hooks and emits its summary once, at its end."""

    def __init__(
        self,
        *,
        backend: str,
        precision: str,
        dicom_enabled: bool,
        emit: Callable[[AcquisitionSummary], None] = log_summary,
    ) -> None:
        self._backend = backend
        self._precision = precision
        self._dicom_enabled = dicom_enabled
        self._emit = emit
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Entry] = OrderedDict()
        self._ended: OrderedDict[str, None] = OrderedDict()

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    # ------------------------------------------------------------------------------------------------ hooks

    def verdict(self, report: VerdictReport) -> None:
        """Every verdict (validator thread): the first gives the verdict latency, the final may end it."""
        verdict = report.verdict
        with self._lock:
            entry = self._entry(verdict.acquisition_id)
            if entry is None:
                return
            entry.protocol_id, entry.protocol_version = verdict.protocol_id, verdict.protocol_version
            if report.first_image_to_verdict_s is not None and entry.first_image_to_verdict_s is None:
                entry.first_image_to_verdict_s = report.first_image_to_verdict_s
            if verdict.final:
                entry.final = report
            summary = self._end_if_done(entry)
        self._emit_outside_lock(summary)

    def slab(self, acquisition_id: str, read_s: float, inference_s: float) -> None:
        """A slab was inferred (engine thread)."""
        with self._lock:
            entry = self._entry(acquisition_id)
            if entry is not None:
                entry.slabs += 1
                entry.read_s += read_s
                entry.inference_s += inference_s

    def volume_sent(
        self, acquisition_id: str, last_image_to_volume_s: float, flagged: int | None = None
    ) -> None:
        """The volume went out on the wire (publisher thread); not called for republished volumes.
        ``flagged``: the regions its confidence says not to trust (None: not checked)."""
        with self._lock:
            entry = self._entry(acquisition_id)
            if entry is None:
                return
            entry.volume_sent = True
            entry.last_image_to_volume_s = last_image_to_volume_s
            entry.flagged = flagged
            summary = self._end_if_done(entry)
        self._emit_outside_lock(summary)

    def dicom_written(self, acquisition_id: str, ok: bool) -> None:
        """The DICOM stage wrote the series, or failed to (dicom thread)."""
        with self._lock:
            entry = self._entry(acquisition_id)
            if entry is None:
                return
            entry.dicom = DICOM_WRITTEN if ok else DICOM_FAILED
            summary = self._end_if_done(entry)
        self._emit_outside_lock(summary)

    def failed(self, acquisition_id: str, stage: str, error: str) -> None:
        """A stage raised while handling the acquisition (that stage's thread)."""
        with self._lock:
            entry = self._entry(acquisition_id)
            if entry is None:
                return
            if stage == "dicom":  # the dicom stage only ever holds a volume already handed to the publisher
                entry.dicom = DICOM_FAILED
            else:
                entry.failed_stage, entry.error = stage, error
            summary = self._end_if_done(entry)
        self._emit_outside_lock(summary)

    # --------------------------------------------------------------------------------------------- internals

    def _entry(self, acquisition_id: str) -> _Entry | None:
        """The open entry (created on first sight); None once the acquisition has ended."""
        if acquisition_id in self._ended:
            return None
        entry = self._open.get(acquisition_id)
        if entry is None:
            entry = _Entry(acquisition_id)
            self._open[acquisition_id] = entry
            while len(self._open) > MAX_OPEN:
                dropped, _ = self._open.popitem(last=False)
                self._remember_ended(dropped)
                logger.warning(
                    "acquisition %s: no acquisition_end line (more than %d acquisitions open at once)",
                    dropped,
                    MAX_OPEN,
                    extra={"event": LogEvent.SUMMARY_DROPPED, "acquisition_id": dropped},
                )
        return entry

    def _end_if_done(self, entry: _Entry) -> AcquisitionSummary | None:
        outcome = self._outcome(entry)
        if outcome is None:
            return None
        del self._open[entry.acquisition_id]
        self._remember_ended(entry.acquisition_id)
        return self._summary(entry, outcome)

    def _outcome(self, entry: _Entry) -> AcquisitionEnd | None:
        """How the acquisition ended, or None while something is still to come."""
        if entry.failed_stage:
            return AcquisitionEnd.FAILED
        final = entry.final
        if final is None:
            return None
        outcome = final.verdict.outcome
        if outcome in _VERDICT_ENDS:
            return _VERDICT_ENDS[outcome]
        if not final.infer:
            return AcquisitionEnd.NOT_INFERRED
        if not entry.volume_sent or (self._dicom_enabled and not entry.dicom):
            return None
        return AcquisitionEnd.PUBLISHED

    def _summary(self, entry: _Entry, outcome: AcquisitionEnd) -> AcquisitionSummary:
        final = entry.final
        if entry.dicom:
            dicom = entry.dicom
        elif not self._dicom_enabled:
            dicom = DICOM_OFF
        else:
            dicom = DICOM_NONE
        return AcquisitionSummary(
            acquisition_id=entry.acquisition_id,
            outcome=outcome,
            protocol_id=entry.protocol_id,
            protocol_version=entry.protocol_version,
            reasons=final.verdict.reasons if final is not None else (),
            refusal=final.refusal if final is not None and outcome is AcquisitionEnd.NOT_INFERRED else "",
            ended_by=str(final.ended_by) if final is not None else str(EndedBy.OPEN),
            slices_per_echo=final.slices_per_echo if final is not None else (),
            expected_slices=final.expected_slices if final is not None else None,
            first_image_to_verdict_s=entry.first_image_to_verdict_s,
            completion_delay_s=final.completion_delay_s if final is not None else None,
            last_image_to_volume_s=entry.last_image_to_volume_s,
            slabs=entry.slabs,
            slab_read_s=entry.read_s,
            slab_inference_s=entry.inference_s,
            backend=self._backend,
            precision=self._precision,
            dicom=dicom,
            failed_stage=entry.failed_stage,
            error=entry.error,
            flagged=entry.flagged,
        )

    def _remember_ended(self, acquisition_id: str) -> None:
        self._ended[acquisition_id] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def _emit_outside_lock(self, summary: AcquisitionSummary | None) -> None:
        if summary is not None:
            self._emit(summary)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, _SECONDS_DIGITS)


def _logfmt(value: object) -> str:
    """A value as logfmt writes it: bare when it has no space, quote or '=', JSON-quoted otherwise."""
    if isinstance(value, Mapping | list):
        value = json.dumps(value, ensure_ascii=False)
    text = str(value)
    if not text or any(ch in text for ch in ' "=\n'):
        return json.dumps(text, ensure_ascii=False)
    return text
