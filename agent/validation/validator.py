"""The validator stage: judge each acquisition update against the active protocols and decide on inference.

The technologist needs the verdict while the patient is still on the table (target: within 0.5 s of the
first image; docs/architecture.md, Target figures), so the first image of each echo gets a provisional verdict
at once; the end of the acquisition gets the final one. Verdicts are published on the status topic only when
something a person would want to see changed, not for every image. How many images have arrived is published
as a ``received`` status at most every ``RECEIVED_INTERVAL_S`` per acquisition (the first update and the last
always, a held-back count as soon as the interval has passed), so a screen's progress bar moves without one
message per image.

The engine runs only on an acquisition whose verdict passes, with nothing pending, for a protocol the model's
manifest lists, on magnitude images: :func:`agent.validation.inference_gate.decide` says so, the same function
``sct-agent check`` reports, so a model is never run outside the domain it was validated on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

from agent.records import AcquisitionUpdate, AcquisitionView, StatusEvent, ValidatedUpdate, Verdict
from agent.status_events import received_event, series_fields, verdict_event
from agent.validation.inference_gate import decide
from agent.validation.protocols import SequenceProtocol
from agent.validation.rules import evaluate
from agent.vocabulary import EndedBy, Outcome, StatusKind, UpdateKind

logger = logging.getLogger(__name__)

#: Least time between two ``received`` status messages of one acquisition (s): a 200-image series exported in
#: a few seconds gives a handful of messages, not two hundred, and a progress bar still moves smoothly.
RECEIVED_INTERVAL_S: Final = 0.5


@dataclass(slots=True)
class _ReceivedState:
    """When the last ``received`` of one acquisition went out (monotonic s), and the view held back since."""

    sent_at: float
    held: AcquisitionView | None = None


@dataclass(frozen=True, slots=True)
class VerdictReport:
    """What the pipeline records about a verdict besides publishing it."""

    verdict: Verdict
    #: Seconds from the acquisition's first image to this verdict, for its first verdict only.
    first_image_to_verdict_s: float | None
    #: Seconds from the last image to the detection that the acquisition ended (final verdicts only).
    completion_delay_s: float | None
    ended_by: EndedBy
    #: Whether the model may run on the acquisition, and why not (``inference_gate.decide``).
    infer: bool
    refusal: str
    #: Slices present per echo (ascending echo time) and the slices per echo the acquisition announced.
    slices_per_echo: tuple[int, ...]
    expected_slices: int | None


class ValidatorStage:
    """Not thread-safe: the validator stage thread owns it."""

    def __init__(
        self,
        protocols: Sequence[SequenceProtocol],
        model_protocols: Collection[str],
        *,
        forward: Callable[[ValidatedUpdate], object],
        publish: Callable[[StatusEvent], None],
        on_verdict: Callable[[VerdictReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        usable = [p.id for p in protocols if p.id in model_protocols]
        if not usable:
            raise ValueError(
                f"protocols.active: found {[p.id for p in protocols]}; expected at least one of the model's "
                f"validated protocols {sorted(model_protocols)} (the engine would never run)"
            )
        self._protocols = tuple(protocols)
        self._model_protocols = frozenset(model_protocols)
        self._forward = forward
        self._publish = publish
        self._on_verdict = on_verdict
        self._last: dict[str, tuple[Outcome, tuple[str, ...], int]] = {}
        self._clock = clock
        self._received: dict[str, _ReceivedState] = {}

    def handle(self, update: AcquisitionUpdate) -> None:
        view = update.view
        final = update.kind is not UpdateKind.IMAGES
        now = time.time()
        self._count_received(view, final=final, now=now)
        verdicts = [evaluate(p, view, final=final, now=now) for p in self._protocols]
        decision = decide(verdicts, view, self._model_protocols)
        chosen, infer = decision.verdict, decision.allowed
        key = view.acquisition_id
        signature = (chosen.outcome, chosen.pending, len(chosen.reasons))
        previous = self._last.get(key)
        first = previous is None
        if final or update.first_of_echo or previous is None or previous != signature:
            report = VerdictReport(
                verdict=chosen,
                first_image_to_verdict_s=(now - view.first_image_at) if first else None,
                completion_delay_s=(now - view.last_image_at) if final else None,
                ended_by=view.ended_by,
                infer=infer,
                refusal=decision.reason,
                slices_per_echo=tuple(view.slices_per_echo),
                expected_slices=view.expected_slices,
            )
            self._publish(self._status(update, chosen, verdicts, report))
            if self._on_verdict is not None:
                self._on_verdict(report)
        if final:
            self._last.pop(key, None)
        else:
            self._last[key] = signature
        self._forward(ValidatedUpdate(update=update, verdict=chosen, infer=infer))

    def idle(self) -> None:
        """Send the ``received`` counts held back whose interval has passed (the stage calls this when idle)."""
        tick = self._clock()
        for state in self._received.values():
            if state.held is not None and tick - state.sent_at >= RECEIVED_INTERVAL_S:
                self._publish(received_event(state.held, time.time()))
                state.sent_at, state.held = tick, None

    def _count_received(self, view: AcquisitionView, *, final: bool, now: float) -> None:
        tick = self._clock()
        state = self._received.get(view.acquisition_id)
        if final:
            self._received.pop(view.acquisition_id, None)
        elif state is None:
            self._received[view.acquisition_id] = _ReceivedState(sent_at=tick)
        elif tick - state.sent_at < RECEIVED_INTERVAL_S:
            state.held = view
            return
        else:
            state.sent_at, state.held = tick, None
        self._publish(received_event(view, now))

    def _status(
        self, update: AcquisitionUpdate, chosen: Verdict, verdicts: list[Verdict], report: VerdictReport
    ) -> StatusEvent:
        view = update.view
        body = {
            **verdict_event(chosen).body,
            **series_fields(view),
            "other_protocols": {v.protocol_id: v.outcome.value for v in verdicts if v is not chosen},
            "echo_times_ms": list(view.echo_times_ms),
            "slices_per_echo": list(view.slices_per_echo),
            "expected_slices": view.expected_slices,
            "ended_by": view.ended_by,
            "first_image_at": view.first_image_at,
            "last_image_at": view.last_image_at,
            "first_image_to_verdict_s": report.first_image_to_verdict_s,
            "completion_delay_s": report.completion_delay_s,
        }
        return StatusEvent(StatusKind.VERDICT, view.acquisition_id, body, chosen.decided_at)
