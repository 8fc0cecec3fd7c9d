"""The validator stage: judge each acquisition update against the active protocols and decide on inference.

The technologist needs the verdict while the patient is still on the table (target: within 0.5 s of the
first image; docs/architecture.md, Target figures), so the first image of each echo gets a provisional verdict
at once; the end of the acquisition gets the final one. Verdicts are published on the status topic only when
something a person would want to see changed, not for every image.

The engine runs only on an acquisition whose verdict passes, with nothing pending, for a protocol the model's
manifest lists, on magnitude images: :func:`agent.validation.inference_gate.decide` says so, the same function
``sct-agent check`` reports, so a model is never run outside the domain it was validated on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from agent.records import AcquisitionUpdate, StatusEvent, ValidatedUpdate, Verdict
from agent.status_events import verdict_event
from agent.validation.inference_gate import decide
from agent.validation.protocols import SequenceProtocol
from agent.validation.rules import evaluate
from agent.vocabulary import EndedBy, Outcome, StatusKind, UpdateKind

logger = logging.getLogger(__name__)


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

    def handle(self, update: AcquisitionUpdate) -> None:
        view = update.view
        final = update.kind is not UpdateKind.IMAGES
        now = time.time()
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

    def _status(
        self, update: AcquisitionUpdate, chosen: Verdict, verdicts: list[Verdict], report: VerdictReport
    ) -> StatusEvent:
        view = update.view
        body = {
            **verdict_event(chosen).body,
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
