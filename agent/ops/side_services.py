"""What the stages tell the side services: the journal, the metrics, the volume archive and the log.

Stages know nothing of SQLite, Prometheus or the state folder; they call the small hooks they were built with,
and :class:`SideServices` is what the pipeline passes as those hooks. Every hook runs on the thread of the stage
that calls it (the journal serialises its own writes), so none of them may block for long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.ops.journal import Journal
from agent.ops.metrics import AgentMetrics
from agent.publish.volume_archive import VolumeArchive
from agent.records import ArrivedFile, Publication, SctSlab, SctVolume, SlabRequest, StatusEvent
from agent.status_events import error_event, watch_event
from agent.validation.validator import VerdictReport
from agent.vocabulary import AcquisitionState, EndedBy, Outcome, SkipReason

logger = logging.getLogger(__name__)

#: Skips that count as files the agent declined; temp names, hidden files and folders are the normal traffic of
#: an export in progress.
_COUNTED_SKIPS = frozenset({SkipReason.DICOMDIR, SkipReason.EMPTY})
#: Journal state of an acquisition after its final verdict (PASSED becomes PUBLISHED with its volume).
_FINAL_STATES = {
    Outcome.PASS: AcquisitionState.PASSED,
    Outcome.REJECT: AcquisitionState.REJECTED,
    Outcome.INCOMPLETE: AcquisitionState.INCOMPLETE,
}


class SideServices:
    """The hooks of every stage, bound to one journal, one metrics registry and one volume archive."""

    def __init__(
        self,
        metrics: AgentMetrics,
        journal: Journal,
        archive: VolumeArchive,
        publish: Callable[[Publication], None],
    ) -> None:
        self.metrics = metrics
        self.journal = journal
        self.archive = archive
        self._publish = publish

    # ---------------------------------------------------------------------------------------------- ingest

    def file_skipped(self, path: Path, reason: str) -> None:
        if reason in _COUNTED_SKIPS:
            self.metrics.file_seen("skipped")
            logger.info("skipped %s: %s", path.name, reason)

    def watch_folder(self, folder: Path, available: bool, message: str) -> None:
        """The export folder went away or came back (agent.ingest.watcher): gauge, count, status event."""
        self.metrics.set_watch_folder(available)
        if not available:
            self.metrics.error("watcher")
        self._publish(watch_event(available=available, folder=str(folder), message=message, at=time.time()))

    def file_done(self, arrived: ArrivedFile, outcome: str, reason: str, acquisition_id: str | None) -> None:
        self.metrics.file_seen(outcome)
        self.journal.record_file(
            arrived.path, arrived.size, arrived.mtime_ns, outcome, reason, acquisition_id
        )

    # ------------------------------------------------------------------------------------------ validation

    def verdict(self, report: VerdictReport) -> None:
        verdict = report.verdict
        self.metrics.verdict(
            verdict.outcome.value,
            verdict.final,
            report.first_image_to_verdict_s,
            [r.category for r in verdict.reasons],
        )
        if report.completion_delay_s is not None and report.ended_by == EndedBy.COUNT:
            self.metrics.completion_detected(report.completion_delay_s)
        self.journal.record_verdict(verdict)
        if not verdict.final:
            return
        self.journal.record_acquisition(
            verdict.acquisition_id, _FINAL_STATES[verdict.outcome], protocol_id=verdict.protocol_id
        )
        logger.info(
            "acquisition %s ended (%s): %s against %s%s",
            verdict.acquisition_id,
            report.ended_by,
            verdict.outcome.value,
            verdict.protocol_id,
            "".join(f"; {r.text()}" for r in verdict.reasons),
        )

    # ------------------------------------------------------------------------------------------- inference

    def slab_inferred(self, request: SlabRequest, slab: SctSlab) -> None:
        self.metrics.slab_inferred(request.read_s, slab.inference_s)
        self.journal.record_slab(
            slab.acquisition_id, slab.slab_index, slab.start, slab.size, slab.sha256, None
        )

    def engine_refusals(self, refusals: list[str]) -> None:
        """Cached engines refused at start (altered file, another machine's, failed acceptance) and built again:
        already logged and in ``engine_refusals``; said on the status topic too, for whoever listens."""
        for refusal in refusals:
            self._publish(
                error_event(None, stage="engine", message=f"{refusal}; it was built again", at=time.time())
            )

    def engine_failed(self, acquisition_id: str, cause: str) -> None:
        """The engine failed a series (it published the error and the cancellation itself): count it."""
        self.metrics.engine_failure(cause)
        self.metrics.error("engine")

    def volume_done(self, volume: SctVolume, last_image_at: float) -> None:
        try:
            self.archive.save(volume)
        except (OSError, ValueError) as error:
            # The volume is published; only a restart's late joiners would miss it. Say so, carry on.
            logger.error("acquisition %s: volume not archived for restarts: %s", volume.acquisition_id, error)
            self.metrics.error("publisher")
        logger.info(
            "acquisition %s: sCT volume %s done %.2f s after the last image",
            volume.acquisition_id,
            "x".join(map(str, volume.geometry.shape)),
            volume.produced_at - last_image_at,
        )

    # ----------------------------------------------------------------------------------------- publishing

    def sent(self, item: Publication, seq: int, sent_at: float) -> None:
        if isinstance(item, SctSlab):
            self.metrics.published("sct.slab", int(item.hu.nbytes))
            last = item.slab_index == item.slab_count - 1
            self.metrics.slab_published(sent_at - item.inputs_complete_at if last else None)
            self.journal.record_publication(
                item.acquisition_id, "slab", seq, item.sha256, slab_index=item.slab_index
            )
        elif isinstance(item, SctVolume):
            self.metrics.published("sct.volume", int(item.hu.nbytes))
            if item.republished:
                return  # counted and journalled when it was first published, before the restart
            self.metrics.volume_published(max(0.0, sent_at - item.last_image_at))
            self.journal.record_publication(item.acquisition_id, "volume", seq, item.sha256)
            self.journal.record_acquisition(
                item.acquisition_id, AcquisitionState.PUBLISHED, protocol_id=item.protocol_id
            )
        elif isinstance(item, StatusEvent):
            self.metrics.published("status", 0)

    def republish_archive(self) -> None:
        """Put the volumes published before a restart back within reach of late robots (marked republished)."""
        volumes, problems = self.archive.load()
        for problem in problems:
            self.metrics.error("publisher")
            self._publish(
                error_event(
                    problem.acquisition_id,
                    stage="publisher",
                    message=f"stored volume not republished: {problem.reason}",
                    at=time.time(),
                )
            )
        for volume in volumes:
            self._publish(volume)
        if volumes:
            logger.info("republished %d sCT volume(s) kept from before the restart", len(volumes))

    # ---------------------------------------------------------------------------------------------- errors

    def stage_error(self, stage: str, error: BaseException) -> None:
        self.metrics.error(stage)
        self._publish(
            error_event(None, stage=stage, message=f"{type(error).__name__}: {error}", at=time.time())
        )
