"""What the status page shows, kept up to date from what the agent publishes: one card per acquisition and a
header about the agent itself.

The board is fed in-process with every :data:`~agent.records.Publication` the stages hand to the publisher
(verdicts, images received, progress, volumes, DICOM outcomes, errors), on the stage's own thread, so feeding
must be quick: a dictionary update under one lock. Data flows one way: the board reads what the agent says and
never asks a stage anything, so the page cannot slow or change the pipeline. Readers get frozen
:class:`BoardSnapshot` objects and a version number that grows with every change; :meth:`StatusBoard.wait`
lets the page's event streams sleep until something changed.

Nothing here holds a patient name, ID or birth date: acquisitions are the agent's opaque ``acquisition_id``,
and the series number and description are console protocol labels (they come redacted on the status topic).

One module on purpose: the frozen snapshot records and the board that fills them change together (a field
added to a card is read from an event and written to the snapshot in the same place).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from agent.records import Publication, Reason, SctVolume, StatusEvent
from agent.status_events import REGIONS_LISTED
from agent.status_page.plain_words import explain
from agent.validation.protocols import CountRule, SequenceProtocol
from agent.vocabulary import Outcome, PageState, StatusKind

#: Acquisitions kept on the board at most, whatever ``history_hours`` says (a busy scanner does ~30 an hour).
MAX_ACQUISITIONS: Final = 200
#: The agent's last errors shown in the header.
MAX_ERRORS: Final = 8


@dataclass(frozen=True, slots=True)
class ReasonLine:
    """One failed rule: the verdict's own values and the plain words (:mod:`agent.status_page.plain_words`)."""

    attribute: str
    found: str
    required: str
    category: str
    headline: str
    action: str


@dataclass(frozen=True, slots=True)
class VerdictLine:
    outcome: str
    final: bool
    protocol_id: str
    protocol_version: str
    decided_at: float
    reasons: tuple[ReasonLine, ...]
    #: Rules waiting for images (e.g. EchoTime2 before the second echo arrived).
    pending: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FlaggedLine:
    """What the sCT's confidence check found (the ``flagged`` status), for the card."""

    #: "flagged" (regions not to trust), "clear" (checked, none), "unchecked" (the model has no confidence).
    verdict: str
    regions: int | None
    volume_ml: float | None
    #: The whole finding in plain words, and one line per region ("sCT not trusted in slices 41-53 ...").
    message: str
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AcquisitionCard:
    """One acquisition as the page shows it."""

    acquisition_id: str
    series_number: int | None
    series_description: str
    state: PageState
    first_image_at: float
    last_image_at: float
    images_received: int
    images_expected: int | None
    echoes_received: int
    echoes_expected: int | None
    slabs_done: int
    slab_count: int
    verdict: VerdictLine | None
    #: When the current outcome was first decided (the provisional verdict that first said REJECT, say).
    outcome_at: float | None
    first_image_to_verdict_s: float | None
    last_image_to_volume_s: float | None
    #: "", "written", "stored", "failed": what became of the sCT DICOM series.
    dicom: str
    #: Why it failed, was cancelled or waits (an error's message, a cancellation's reason).
    note: str
    #: A preview PNG is ready at /preview/<acquisition_id>.png.
    preview: bool
    updated_at: float
    #: Where the sCT should not be trusted, once the volume's confidence was checked (None before).
    flagged: FlaggedLine | None = None


@dataclass(frozen=True, slots=True)
class EngineLine:
    model: str
    backend: str
    precision: str
    device: str
    #: Loaded and warmed up (one inference ran), so the first slab is not slowed by compilation.
    warm: bool


@dataclass(frozen=True, slots=True)
class ErrorLine:
    at: float
    stage: str
    message: str
    acquisition_id: str | None


@dataclass(frozen=True, slots=True)
class AgentLine:
    """The page's header: the agent as a whole."""

    engine: EngineLine | None
    protocols: tuple[str, ...]
    subscribers: int
    dicom_written: int
    dicom_stored: int
    dicom_failed: int
    export_folder_ok: bool
    export_folder_message: str
    #: Where scanners push by C-STORE, "AE_TITLE@host:port"; "" when the agent does not receive.
    receive: str
    #: The latest acquisition's latencies (seconds).
    first_image_to_verdict_s: float | None
    last_image_to_volume_s: float | None
    errors: tuple[ErrorLine, ...]


@dataclass(frozen=True, slots=True)
class BoardSnapshot:
    version: int
    at: float
    agent: AgentLine
    #: Newest first.
    acquisitions: tuple[AcquisitionCard, ...]

    def to_json(self) -> dict[str, Any]:
        """The document ``/state.json`` and the event stream send (plain JSON types)."""
        return asdict(self)


@dataclass(slots=True)
class _Card:
    acquisition_id: str
    created_at: float
    series_number: int | None = None
    series_description: str = ""
    first_image_at: float = 0.0
    last_image_at: float = 0.0
    slices_per_echo: tuple[int, ...] = ()
    expected_slices: int | None = None
    expected_echoes: int | None = None
    ended: bool = False
    slabs_done: int = 0
    slab_count: int = 0
    verdict: VerdictLine | None = None
    outcome_at: float | None = None
    first_image_to_verdict_s: float | None = None
    last_image_to_volume_s: float | None = None
    published: bool = False
    failed: bool = False
    waiting: bool = False
    dicom: str = ""
    note: str = ""
    preview: bool = False
    updated_at: float = 0.0
    flagged: FlaggedLine | None = None


@dataclass(slots=True)
class _Agent:
    engine: EngineLine | None = None
    subscribers: int = 0
    dicom_written: int = 0
    dicom_stored: int = 0
    dicom_failed: int = 0
    export_folder_ok: bool = True
    export_folder_message: str = ""
    receive: str = ""
    first_image_to_verdict_s: float | None = None
    last_image_to_volume_s: float | None = None
    errors: list[ErrorLine] = field(default_factory=list)


class StatusBoard:
    """Thread-safe: fed from the stage threads, read by the page's HTTP threads."""

    def __init__(
        self,
        protocols: Iterable[SequenceProtocol],
        model_protocols: Collection[str],
        *,
        history_hours: float,
        max_acquisitions: int = MAX_ACQUISITIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._protocols: Mapping[str, SequenceProtocol] = {p.id: p for p in protocols}
        self._model_protocols = frozenset(model_protocols)
        self._history_s = history_hours * 3600.0
        self._max = max_acquisitions
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._cards: dict[str, _Card] = {}
        self._agent = _Agent()
        self._version = 0
        self._closed = False
        self._json: tuple[int, bytes] = (-1, b"")

    # ---------------------------------------------------------------------------------------------- feeding

    def feed(self, item: Publication) -> None:
        """One publication, as the publisher is handed it (any stage thread)."""
        if isinstance(item, StatusEvent):
            with self._lock:
                self._event(item)
                self._bump()
        elif isinstance(item, SctVolume) and not item.republished:
            # A volume republished after a restart is not new work on the scanner: no card for it.
            with self._lock:
                card = self._card(item.acquisition_id)
                card.published = True
                card.note = ""  # a stream restarted on the way (a new slice grid) is no news once it is done
                card.slabs_done = card.slab_count = item.slab_count
                if item.last_image_at:
                    card.last_image_to_volume_s = max(0.0, item.produced_at - item.last_image_at)
                    self._agent.last_image_to_volume_s = card.last_image_to_volume_s
                self._bump()

    def preview_ready(self, acquisition_id: str) -> None:
        with self._lock:
            card = self._cards.get(acquisition_id)
            if card is not None:
                card.preview = True
                self._bump()

    def set_engine(self, engine: EngineLine) -> None:
        with self._lock:
            self._agent.engine = engine
            self._bump()

    def set_receive(self, address: str) -> None:
        """Where scanners push by C-STORE (shown beside the export folder, so the technologist knows both ways in)."""
        with self._lock:
            if self._agent.receive != address:
                self._agent.receive = address
                self._bump()

    def set_subscribers(self, count: int) -> None:
        with self._lock:
            if self._agent.subscribers != count:
                self._agent.subscribers = count
                self._bump()

    def close(self) -> None:
        """Wake every waiter for good: the page is stopping."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()

    def wake(self) -> None:
        """Wake every waiter once (an event stream that is being closed)."""
        with self._lock:
            self._changed.notify_all()

    # ---------------------------------------------------------------------------------------------- reading

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def wait(self, after: int, timeout_s: float, stop: Callable[[], bool] = lambda: False) -> int:
        """Block until the version passes ``after``, the board closes, ``stop()`` holds or ``timeout_s``
        runs out; returns the version then."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._version <= after and not self._closed and not stop():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._version

    def snapshot(self) -> BoardSnapshot:
        with self._lock:
            return self._snapshot()

    def snapshot_json(self) -> tuple[int, bytes]:
        """(version, the snapshot as compact JSON), built once per version however many pages read it."""
        with self._lock:
            if self._json[0] != self._version:
                document = json.dumps(self._snapshot().to_json(), separators=(",", ":"), allow_nan=False)
                self._json = (self._version, document.encode())
            return self._json

    # ------------------------------------------------------------------------------------------- internals

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    def _card(self, acquisition_id: str) -> _Card:
        now = self._clock()
        card = self._cards.get(acquisition_id)
        if card is None:
            self._prune(now)
            card = self._cards[acquisition_id] = _Card(acquisition_id, created_at=now)
        card.updated_at = now
        return card

    def _prune(self, now: float) -> None:
        horizon = now - self._history_s
        for key in [k for k, c in self._cards.items() if c.updated_at < horizon]:
            del self._cards[key]
        while len(self._cards) >= self._max:
            oldest = min(self._cards.values(), key=lambda c: c.created_at)
            del self._cards[oldest.acquisition_id]

    def _event(self, event: StatusEvent) -> None:
        body = event.body
        kind = event.kind
        if kind == StatusKind.WATCH:
            self._agent.export_folder_ok = bool(body.get("available", True))
            self._agent.export_folder_message = str(body.get("message", ""))
            return
        if kind == StatusKind.ERROR:
            self._error(event)
            return
        if kind == StatusKind.DICOM:
            self._dicom(event)
            return
        if event.acquisition_id is None:
            return
        card = self._card(event.acquisition_id)
        if kind in (StatusKind.VERDICT, StatusKind.RECEIVED):
            self._images(card, body)
            card.waiting = False
        if kind == StatusKind.VERDICT:
            self._verdict(card, event)
        elif kind == StatusKind.PROGRESS:
            if body.get("restarted"):
                card.slabs_done = 0
            else:
                card.slabs_done = int(body.get("slabs_done", card.slabs_done))
                card.slab_count = int(body.get("slab_count", card.slab_count))
        elif kind == StatusKind.CANCELLED:
            reason = str(body.get("reason", ""))
            card.slabs_done = 0
            if reason.startswith("engine failed"):
                card.failed = True
            card.note = f"sCT stream cancelled: {reason}" if reason else "sCT stream cancelled"
        elif kind == StatusKind.REFUSED:
            card.waiting = True
            card.note = str(body.get("message", ""))
        elif kind == StatusKind.FLAGGED:
            card.flagged = _flagged(body)

    def _images(self, card: _Card, body: Mapping[str, Any]) -> None:
        if "series_number" in body:
            number = body["series_number"]
            card.series_number = int(number) if isinstance(number, int | float) else None
        if body.get("series_description"):
            card.series_description = str(body["series_description"])
        if "slices_per_echo" in body:
            card.slices_per_echo = tuple(int(n) for n in body["slices_per_echo"])
        if "expected_slices" in body:
            expected = body["expected_slices"]
            card.expected_slices = int(expected) if isinstance(expected, int | float) else None
        if isinstance(body.get("expected_echoes"), int | float):
            card.expected_echoes = int(body["expected_echoes"])
        if isinstance(body.get("first_image_at"), int | float):
            card.first_image_at = float(body["first_image_at"])
        if isinstance(body.get("last_image_at"), int | float):
            card.last_image_at = float(body["last_image_at"])
        if body.get("ended") or body.get("ended_by"):
            card.ended = True

    def _verdict(self, card: _Card, event: StatusEvent) -> None:
        body = event.body
        protocol_id = str(body.get("protocol_id", ""))
        protocol = self._protocols.get(protocol_id)
        reasons = []
        for raw in body.get("reasons", ()):
            reason = Reason(
                protocol_id=str(raw.get("protocol_id", protocol_id)),
                attribute=str(raw.get("attribute", "")),
                found=str(raw.get("found", "")),
                required=str(raw.get("required", "")),
                category=str(raw.get("category", "")),
            )
            words = explain(reason, protocol.rule(reason.attribute) if protocol is not None else None)
            reasons.append(
                ReasonLine(
                    reason.attribute,
                    reason.found,
                    reason.required,
                    reason.category,
                    words.headline,
                    words.action,
                )
            )
        verdict = VerdictLine(
            outcome=str(body.get("outcome", "")),
            final=bool(body.get("final", False)),
            protocol_id=protocol_id,
            protocol_version=str(body.get("protocol_version", "")),
            decided_at=event.at,
            reasons=tuple(reasons),
            pending=tuple(str(p) for p in body.get("pending", ())),
        )
        if card.verdict is None or card.verdict.outcome != verdict.outcome:
            card.outcome_at = event.at
        card.verdict = verdict
        if card.expected_echoes is None and protocol is not None:
            rule = protocol.rule("EchoCount")
            if isinstance(rule, CountRule) and rule.equals is not None:
                card.expected_echoes = rule.equals
        latency = body.get("first_image_to_verdict_s")
        if isinstance(latency, int | float):
            card.first_image_to_verdict_s = float(latency)
            self._agent.first_image_to_verdict_s = float(latency)
        if verdict.final:
            card.ended = True

    def _error(self, event: StatusEvent) -> None:
        message = str(event.body.get("message", ""))
        line = ErrorLine(event.at, str(event.body.get("stage", "")), message, event.acquisition_id)
        self._agent.errors = [line, *self._agent.errors][:MAX_ERRORS]
        if event.acquisition_id is not None:
            card = self._card(event.acquisition_id)
            card.failed = True
            card.note = message

    def _dicom(self, event: StatusEvent) -> None:
        body = event.body
        ok, step = bool(body.get("ok")), str(body.get("step", ""))
        if not ok:
            self._agent.dicom_failed += 1
        elif step == "write":
            self._agent.dicom_written += 1
        else:
            self._agent.dicom_stored += 1
        if event.acquisition_id is not None and event.acquisition_id in self._cards:
            card = self._card(event.acquisition_id)
            card.dicom = "failed" if not ok else "written" if step == "write" else "stored"
            if not ok:
                card.note = str(body.get("message", ""))

    def _state(self, card: _Card) -> PageState:
        """The one state a card shows: what went wrong or what came out first, then how far the work is."""
        verdict = card.verdict
        outcome = verdict.outcome if verdict is not None else ""
        final = verdict is not None and verdict.final
        state: PageState
        if card.failed:
            state = PageState.FAILED
        elif card.published:
            state = PageState.PUBLISHED
        elif outcome == Outcome.REJECT:
            state = PageState.REJECTED
        elif final and outcome == Outcome.INCOMPLETE:
            state = PageState.INCOMPLETE
        elif final and verdict is not None and verdict.protocol_id not in self._model_protocols:
            state = PageState.NOT_INFERRED
        elif card.slabs_done > 0 or (card.ended and final):
            state = PageState.STREAMING
        elif card.waiting:
            state = PageState.WAITING
        elif not card.ended and sum(card.slices_per_echo) > 0:
            state = PageState.RECEIVING
        else:
            state = PageState.JUDGING
        return state

    def _snapshot(self) -> BoardSnapshot:
        cards = sorted(
            self._cards.values(), key=lambda c: (c.first_image_at or c.created_at, c.created_at), reverse=True
        )
        agent = self._agent
        return BoardSnapshot(
            version=self._version,
            at=self._clock(),
            agent=AgentLine(
                engine=agent.engine,
                protocols=tuple(self._protocols),
                subscribers=agent.subscribers,
                dicom_written=agent.dicom_written,
                dicom_stored=agent.dicom_stored,
                dicom_failed=agent.dicom_failed,
                export_folder_ok=agent.export_folder_ok,
                export_folder_message=agent.export_folder_message,
                receive=agent.receive,
                first_image_to_verdict_s=agent.first_image_to_verdict_s,
                last_image_to_volume_s=agent.last_image_to_volume_s,
                errors=tuple(agent.errors),
            ),
            acquisitions=tuple(self._frozen(c) for c in cards),
        )

    def _frozen(self, card: _Card) -> AcquisitionCard:
        received = sum(card.slices_per_echo)
        echoes_expected = card.expected_echoes
        expected = (
            card.expected_slices * echoes_expected
            if card.expected_slices is not None and echoes_expected is not None
            else None
        )
        return AcquisitionCard(
            acquisition_id=card.acquisition_id,
            series_number=card.series_number,
            series_description=card.series_description,
            state=self._state(card),
            first_image_at=card.first_image_at,
            last_image_at=card.last_image_at,
            images_received=received,
            images_expected=expected,
            echoes_received=sum(1 for n in card.slices_per_echo if n > 0),
            echoes_expected=echoes_expected,
            slabs_done=card.slabs_done,
            slab_count=card.slab_count,
            verdict=card.verdict,
            outcome_at=card.outcome_at,
            first_image_to_verdict_s=card.first_image_to_verdict_s,
            last_image_to_volume_s=card.last_image_to_volume_s,
            dicom=card.dicom,
            note=card.note,
            preview=card.preview,
            updated_at=card.updated_at,
            flagged=card.flagged,
        )


def _flagged(body: Mapping[str, Any]) -> FlaggedLine:
    """The ``flagged`` status as the card shows it."""
    count = body.get("flagged")
    regions = int(count) if isinstance(count, int | float) else None
    volume_ml = body.get("volume_ml")
    if not body.get("checked") or regions is None:
        verdict = "unchecked"
    else:
        verdict = "flagged" if regions > 0 else "clear"
    lines = tuple(str(r.get("message", "")) for r in body.get("regions", ()) if isinstance(r, Mapping))
    if len(lines) > REGIONS_LISTED:
        # A screws series has a dozen regions: the card shows the status message's summary (count, volume,
        # slices, the largest), not a dozen near-identical lines.
        lines = (str(body.get("message", "")),)
    return FlaggedLine(
        verdict=verdict,
        regions=regions,
        volume_ml=float(volume_ml) if isinstance(volume_ml, int | float) else None,
        message=str(body.get("message", "")),
        lines=lines,
    )
