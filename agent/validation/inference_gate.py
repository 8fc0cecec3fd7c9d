"""May the model run on this acquisition? One pure function decides, for the agent and for ``sct-agent check``.

A model is never run outside the domain it was validated on: the acquisition must pass a protocol, with no rule
still pending, the protocol must be one the model's manifest lists, and the images must be magnitude images
(the model takes nothing else, whatever a site protocol forgets to require). The validator stage calls
:func:`decide` on every update and forwards its answer to the streamer; ``check`` calls the same function on
what a folder holds and prints its answer, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from agent.records import AcquisitionView, Verdict
from agent.vocabulary import ImageKind, Outcome


@dataclass(frozen=True, slots=True)
class InferenceDecision:
    """The verdict that decides, and whether (and if not, why not) the model may run."""

    #: A passing verdict for a protocol the model is validated for, else the model protocol the acquisition
    #: comes closest to (fewest failed rules): its reasons are what a technologist must fix.
    verdict: Verdict
    allowed: bool
    #: Why the model may not run, as attribute, value found and value expected; "" when it may.
    reason: str = ""


def choose_verdict(verdicts: Sequence[Verdict], model_protocols: Collection[str]) -> Verdict:
    """The verdict that decides inference among one verdict per protocol judged (at least one)."""
    if not verdicts:
        raise ValueError("choose_verdict: found no verdict; expected one per protocol judged")
    candidates = [v for v in verdicts if v.protocol_id in model_protocols] or list(verdicts)
    for verdict in candidates:
        if verdict.outcome is Outcome.PASS:
            return verdict
    return min(candidates, key=lambda v: (len(v.reasons), v.outcome is Outcome.REJECT))


def decide(
    verdicts: Sequence[Verdict], view: AcquisitionView, model_protocols: Collection[str]
) -> InferenceDecision:
    """Whether the model validated for ``model_protocols`` may run on the acquisition ``view`` describes."""
    verdict = choose_verdict(verdicts, model_protocols)
    reason = ""
    if verdict.outcome is not Outcome.PASS:
        reason = f"verdict: found {verdict.outcome.value} against {verdict.protocol_id}, expected pass"
    elif verdict.pending:
        reason = f"pending rules: found {', '.join(verdict.pending)} not yet judged, expected none"
    elif verdict.protocol_id not in model_protocols:
        reason = (
            f"protocol: found {verdict.protocol_id}, expected one the model is validated for "
            f"({', '.join(sorted(model_protocols)) or 'none'})"
        )
    elif view.magnitude is not True or view.image_kind != ImageKind.MAGNITUDE:
        reason = f"image kind: found {view.image_kind}, expected magnitude images"
    return InferenceDecision(verdict=verdict, allowed=not reason, reason=reason)
