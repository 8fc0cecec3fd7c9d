"""What the stages tell the side services: the journal, the metrics, the volume archive and the log.

Stages know nothing of SQLite, Prometheus or the state folder; they call the small hooks they were built with,
and :class:`SideServices` is what the pipeline passes as those hooks. Every hook runs on the thread of the stage
that calls it (the journal serialises its own writes), so none of them may block for long.

Journal writes go through :class:`~agent.ops.journal_disk_full.JournalWrites`, so a full disk costs records, not
the stage (that module says what is kept). A write that finds its disk full (journal, archive, DICOM series) is
counted in ``sct_agent_disk_full_total{store}`` and calls ``on_disk_full`` (the agent wakes retention).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.file_labels import error_text, file_label
from agent.ops.acquisition_summary import AcquisitionSummaries
from agent.ops.journal import Journal
from agent.ops.journal_disk_full import JournalWrites
from agent.ops.metrics import AgentMetrics
from agent.publish.volume_archive import VolumeArchive
from agent.records import ArrivedFile, Publication, SctSlab, SctVolume, SlabRequest, StatusEvent
from agent.status_events import error_event, watch_event
from agent.validation.validator import VerdictReport
from agent.vocabulary import AcquisitionState, EndedBy, LogEvent, Outcome, SkipReason, StatusKind

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
    """The hooks of every stage, bound to one journal, one metrics registry, one volume archive and the
    acquisitions' canonical log lines (:mod:`agent.ops.acquisition_summary`)."""

    def __init__(
        self,
        metrics: AgentMetrics,
        journal: Journal,
        archive: VolumeArchive,
        publish: Callable[[Publication], None],
        summaries: AcquisitionSummaries | None = None,
        *,
        model: str = "",
        dicom: bool = False,
        on_disk_full: Callable[[], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.journal = journal
        self.archive = archive
        self._publish = publish
        self.summaries = summaries
        #: "<model id>@<version>" of the running model: the journal keeps one volume per acquisition and model.
        self.model = model
        #: A DICOM series is written for each volume: an acquisition is finished only once it is.
        self.dicom = dicom
        self._on_disk_full = on_disk_full
        self.journal_writes = JournalWrites(journal, metrics, publish, on_full=on_disk_full)

    def finished_acquisitions(self) -> set[str]:
        """Acquisitions a restart must leave alone (their files are not processed again)."""
        return self.journal.finished_acquisitions(self.model, dicom=self.dicom)

    # ---------------------------------------------------------------------------------------------- ingest

    def file_skipped(self, path: Path, reason: str) -> None:
        if reason in _COUNTED_SKIPS:
            self.metrics.file_seen("skipped")
            logger.info(
                "skipped %s: %s",
                file_label(path),
                reason,
                extra={"event": LogEvent.FILE, "outcome": "skipped", "file": file_label(path)},
            )

    def watch_folder(self, folder: Path, available: bool, message: str) -> None:
        """The export folder went away or came back (agent.ingest.watcher): gauge, count, status event."""
        self.metrics.set_watch_folder(available)
        if not available:
            self.metrics.error("watcher")
        self._publish(watch_event(available=available, folder=str(folder), message=message, at=time.time()))

    def file_done(self, arrived: ArrivedFile, outcome: str, reason: str, acquisition_id: str | None) -> None:
        self.metrics.file_seen(outcome)
        self.journal_writes.write(
            "files",
            lambda: self.journal.record_file(
                arrived.path, arrived.size, arrived.mtime_ns, outcome, reason, acquisition_id
            ),
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
        self.journal_writes.write("verdicts", lambda: self.journal.record_verdict(verdict))
        if verdict.final:
            self.journal_writes.acquisition(
                verdict.acquisition_id, _FINAL_STATES[verdict.outcome], protocol_id=verdict.protocol_id
            )
            # The canonical acquisition_end line says it all at the end; this one marks the verdict.
            logger.debug(
                "acquisition %s: final verdict (%s) %s against %s%s",
                verdict.acquisition_id,
                report.ended_by,
                verdict.outcome.value,
                verdict.protocol_id,
                "".join(f"; {r.text()}" for r in verdict.reasons),
                extra={
                    "event": LogEvent.VERDICT,
                    "stage": "validator",
                    "acquisition_id": verdict.acquisition_id,
                    "outcome": verdict.outcome.value,
                    "protocol_id": verdict.protocol_id,
                },
            )
        if self.summaries is not None:
            self.summaries.verdict(report)

    # ------------------------------------------------------------------------------------------- inference

    def slab_inferred(self, request: SlabRequest, slab: SctSlab) -> None:
        self.metrics.slab_inferred(request.read_s, slab.inference_s)
        self.journal_writes.write(
            "slabs",
            lambda: self.journal.record_slab(
                slab.acquisition_id, slab.slab_index, slab.start, slab.size, slab.sha256, None
            ),
        )
        if self.summaries is not None:
            self.summaries.slab(slab.acquisition_id, request.read_s, slab.inference_s)

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

    def stream_cancelled(self, acquisition_id: str) -> None:
        self.journal_writes.write("slabs", lambda: self.journal.void_slabs(acquisition_id))

    def committed_volume(self, acquisition_id: str) -> str | None:
        """The sha256 of the volume committed for ``acquisition_id`` by the running model before, if any."""
        return self.journal.committed_volume(acquisition_id, self.model)

    def commit_volume(self, volume: SctVolume) -> str | None:
        """Make ``volume`` durable before it is sent: archive first (so that the next start can republish it),
        then the journal. Returns the sha256 committed before a restart, or None for a first commit."""
        model = volume_model(volume)
        if self.journal.committed_volume(volume.acquisition_id, model) is None:
            self._archive(volume)
        prior: list[str | None] = [None]
        flagged = volume.flagged

        def commit() -> None:
            prior[0] = self.journal.commit_volume(volume.acquisition_id, model, volume.sha256)
            if prior[0] is None:  # what the confidence check found, with the volume it was found on
                self.journal.record_flagged(
                    volume.acquisition_id,
                    model,
                    flagged=None if flagged is None else flagged.count,
                    volume_ml=None if flagged is None else flagged.volume_ml,
                    regions=[] if flagged is None else [r.as_json() for r in flagged.regions],
                )

        # A journal that cannot take the commit (disk full) must not cost the surgery its volume: it is sent
        # uncommitted (counted and reported by journal_writes); a restart before the disk has room may send it
        # a second time, with the same content.
        self.journal_writes.write("volumes", commit)
        return prior[0]

    def _archive(self, volume: SctVolume) -> None:
        try:
            self.archive.save(volume)
        except (OSError, ValueError) as error:
            # Only a restart's late joiners would miss it: the volume still goes out. Say so, carry on.
            logger.error(
                "acquisition %s: volume not archived for restarts: %s",
                volume.acquisition_id,
                error_text(error),
                extra={"event": LogEvent.ARCHIVE, "stage": "engine", "acquisition_id": volume.acquisition_id},
            )
            self.metrics.error("publisher")
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                self._disk_full("snapshot")

    def dicom_written(self, volume: SctVolume, series_folder: str) -> None:
        self.journal_writes.write(
            "volumes",
            lambda: self.journal.record_dicom_series(
                volume.acquisition_id, volume_model(volume), volume.sha256, series_folder
            ),
        )

    def volume_done(self, volume: SctVolume, last_image_at: float) -> None:
        logger.info(
            "acquisition %s: sCT volume %s done %.2f s after the last image",
            volume.acquisition_id,
            "x".join(map(str, volume.geometry.shape)),
            volume.produced_at - last_image_at,
            extra={
                "event": LogEvent.VOLUME,
                "stage": "engine",
                "acquisition_id": volume.acquisition_id,
                "protocol_id": volume.protocol_id,
            },
        )

    # ----------------------------------------------------------------------------------------- publishing

    def sent(self, item: Publication, seq: int, sent_at: float) -> None:
        if isinstance(item, SctSlab):
            self.metrics.published("sct.slab", int(item.hu.nbytes))
            if item.confidence is not None:
                self.metrics.published("confidence", int(item.confidence.nbytes))
            last = item.slab_index == item.slab_count - 1
            self.metrics.slab_published(sent_at - item.inputs_complete_at if last else None)
            self.journal_writes.write(
                "publications",
                lambda: self.journal.record_publication(
                    item.acquisition_id, "slab", seq, item.sha256, slab_index=item.slab_index
                ),
            )
        elif isinstance(item, SctVolume):
            self.metrics.published("sct.volume", int(item.hu.nbytes))
            if item.confidence is not None:
                self.metrics.published("confidence", int(item.confidence.nbytes))
            if item.republished:
                return  # counted and journalled when it was first published, before the restart
            latency = max(0.0, sent_at - item.last_image_at)
            self.metrics.volume_published(latency)
            flagged = item.flagged
            self.metrics.volume_flagged(
                None if flagged is None else flagged.count, None if flagged is None else flagged.search_s
            )
            self.journal_writes.write(
                "publications",
                lambda: self.journal.record_publication(item.acquisition_id, "volume", seq, item.sha256),
            )
            self.journal_writes.acquisition(
                item.acquisition_id, AcquisitionState.PUBLISHED, protocol_id=item.protocol_id
            )
            if self.summaries is not None:
                self.summaries.volume_sent(
                    item.acquisition_id, latency, None if flagged is None else flagged.count
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

    # ------------------------------------------------------------------------------------------ full disks

    def dicom_disk_full(self) -> None:
        """The dicom stage could not write a series for want of space."""
        self._disk_full("dicom")

    def _disk_full(self, store: str) -> None:
        self.metrics.disk_full(store)
        if self._on_disk_full is not None:
            self._on_disk_full()

    # ---------------------------------------------------------------------------------------------- errors

    def dicom_reported(self, event: StatusEvent) -> None:
        """A status event of the dicom stage (its thread), seen before it is published: a written or failed
        series ends a published acquisition's summary."""
        if event.kind != StatusKind.DICOM or event.acquisition_id is None or self.summaries is None:
            return
        if event.body.get("step") == "write":
            self.summaries.dicom_written(event.acquisition_id, bool(event.body.get("ok")))

    def stage_error(self, stage: str, error: BaseException, acquisition_id: str | None = None) -> None:
        """A stage's handler raised (already logged with its traceback by the stage). ``acquisition_id`` is
        the acquisition of the item in hand, when the stage knows it; the error ends that acquisition."""
        self.metrics.error(stage)
        text = error_text(error)
        self._publish(error_event(acquisition_id, stage=stage, message=text, at=time.time()))
        if acquisition_id is not None and self.summaries is not None:
            self.summaries.failed(acquisition_id, stage, text)


def model_key(model_id: str, version: str) -> str:
    """The journal's name of a model: ``<model id>@<version>``; volumes are committed once per acquisition and model."""
    return f"{model_id}@{version}"


def volume_model(volume: SctVolume) -> str:
    return model_key(volume.model_id, volume.model_version)
