"""The one place the agent's stages are composed (DESIGN.md §1).

    watcher -> assembler -> validator -> streamer -> engine -> publisher (ZeroMQ PUB + snapshot ROUTER)
                   |            |                      |    +---> dicom (CT series on disk, C-STORE)
                   +------ journal (SQLite) and metrics (Prometheus) ------+

Each arrow is a bounded queue owned by the receiving :class:`~agent.stage_thread.Stage`; the watcher and the stages
block when the next one is full, so a slow engine slows ingestion instead of growing memory. The journal and
the metrics are side services called from the stage threads through the small callbacks below; no stage knows
about either.

Start-up order is the reverse of the data flow (publisher first, watcher last), so nothing is produced before
its consumer exists, and the engine is warmed up before the agent reports ready. Stop is in data-flow order:
the watcher stops first, each stage finishes the item in hand (the slab in flight completes and is published),
then the publisher sends what is queued and closes its socket.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.dicom_out.dicom_publisher import DicomOutput
from agent.inference.engine_stage import InferenceStage
from agent.inference.streamer import Streamer
from agent.ingest.assembler import Assembler
from agent.ingest.pixel_reader import read_pixels
from agent.ingest.watcher import Watcher
from agent.ops import sd_notify
from agent.ops.config import AgentConfig
from agent.ops.journal import Journal
from agent.ops.metrics import AgentMetrics, MetricsServer, serve
from agent.publish.publisher import Publisher
from agent.publish.security import publish_security
from agent.publish.volume_archive import VolumeArchive
from agent.records import (
    AcquisitionUpdate,
    ArrivedFile,
    Publication,
    SctSlab,
    SctVolume,
    SlabRequest,
    StatusEvent,
    StreamControl,
    ValidatedUpdate,
)
from agent.stage_thread import Stage, each
from agent.status_events import error_event
from agent.validation.protocols import SHIPPED_PROTOCOLS_DIR, SequenceProtocol, load_protocols
from agent.validation.validator import VerdictReport, VerdictStage
from agent.vocabulary import AcquisitionState, EndedBy, Outcome, SkipReason
from engines.backends.base import BackendOptions
from engines.inference.engine import SctEngine
from engines.model.manifest import ModelManifest, default_manifest

logger = logging.getLogger(__name__)

#: Seconds a stage gets to finish the item in hand when the agent stops (a CPU slab takes a few seconds).
STOP_TIMEOUT_S = 60.0
JOURNAL_FILE = "journal.sqlite"
#: Folder under ``state.folder`` keeping the latest published volumes across restarts (agent.publish.volume_archive).
SNAPSHOT_ARCHIVE = "snapshot"
#: Finished volumes waiting for the DICOM writer.
DICOM_QUEUE_DEPTH = 4
_COUNTED_SKIPS = frozenset({SkipReason.DICOMDIR, SkipReason.EMPTY})
#: Journal state of an acquisition after its final verdict (PASSED becomes PUBLISHED with its volume).
_FINAL_STATES = {
    Outcome.PASS: AcquisitionState.PASSED,
    Outcome.REJECT: AcquisitionState.REJECTED,
    Outcome.INCOMPLETE: AcquisitionState.INCOMPLETE,
}


@dataclass(frozen=True, slots=True)
class Endpoints:
    publish: str
    metrics_url: str | None
    #: Where subscribers ask for snapshots (docs/protocol.md).
    snapshot: str = ""
    #: The publisher runs CURVE: subscribers need its public key and a key on the allow-list.
    curve: bool = False


class Pipeline:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self._journal: Journal | None = None
        self._metrics_server: MetricsServer | None = None
        self._publisher: Publisher | None = None
        self._engine: SctEngine | None = None
        self._watcher: Watcher | None = None
        self._dicom_stage: Stage[SctVolume] | None = None
        self._archive: VolumeArchive | None = None
        self._stages: list[Stage[Any]] = []
        self._started = False
        self._lock = threading.Lock()
        self.protocols: tuple[SequenceProtocol, ...] = ()
        self.manifest: ModelManifest | None = None

    # --------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> Endpoints:
        """Build and start every stage; returns once the engine is warm and the watcher scans."""
        config = self.config
        try:
            # Keys first: a refused key must stop the agent in milliseconds, not after the engine's warm-up.
            curve = publish_security(config.publish)
            self.metrics.set_curve(curve is not None)
            config.state.folder.mkdir(parents=True, exist_ok=True)
            self._journal = Journal(config.state.folder / JOURNAL_FILE)
            self.protocols = load_protocols(
                config.protocols.folder or SHIPPED_PROTOCOLS_DIR, config.protocols.active
            )
            self.manifest = (
                ModelManifest.load(config.engine.model) if config.engine.model else default_manifest()
            )
            if config.metrics.enabled:
                self._metrics_server = serve(self.metrics, config.metrics.host, config.metrics.port)
            sd_notify.status("warming up the sCT engine")
            engine = SctEngine.load(
                self.manifest,
                backend=config.engine.backend,
                options=BackendOptions(
                    threads=config.engine.threads or None, cache_dir=config.engine_cache_dir
                ),
                slab_depth=config.engine.slab_depth or None,
            )
            self._engine = engine
            info = engine.info
            self.metrics.set_engine_info(
                model_id=info.model_id,
                model_version=info.model_version,
                backend=info.backend,
                precision=info.precision,
                device=info.device,
            )
            self._publisher = Publisher(
                config.publish.endpoint,
                snapshot_endpoint=config.publish.snapshot,
                snapshot_volumes=config.publish.snapshot_volumes,
                curve=curve,
                heartbeat_s=config.publish.heartbeat_s,
                send_hwm=config.publish.send_hwm,
                queue_depth=config.pipeline.queue_depth,
                on_sent=self._on_sent,
                on_subscribers=self.metrics.set_subscribers,
                on_dropped=self.metrics.dropped,
                on_rejected=self.metrics.subscriber_rejected,
                on_snapshot=self.metrics.snapshot_served,
            )
            self._publisher.start()
            self._archive = VolumeArchive(
                config.state.folder / SNAPSHOT_ARCHIVE, config.publish.snapshot_volumes
            )
            self._republish_archive()
            if config.dicom.folder is not None:
                config.dicom.folder.mkdir(parents=True, exist_ok=True)
            self._build_stages(engine)
            for stage in self._stages:
                self.metrics.watch_queue(stage.name, stage.inbox)
                stage.start()
            self._watcher = Watcher(
                config.watch.folder,
                self._on_arrival,
                observer=config.watch.observer,
                poll_interval_s=config.watch.poll_interval_s,
                recursive=config.watch.recursive,
                on_skipped=self._on_skipped,
            )
            self._watcher.start()
        except BaseException:
            self.stop()
            raise
        self._started = True
        self.metrics.set_ready(True)
        endpoints = self.endpoints
        logger.info(
            "ready: watching %s (%s), publishing on %s (snapshots %s, %s), DICOM %s, metrics %s, model %s on %s "
            "%s, protocols %s",
            config.watch.folder,
            config.watch.observer,
            endpoints.publish,
            endpoints.snapshot,
            "CURVE" if endpoints.curve else "plain",
            config.dicom.folder or "off",
            endpoints.metrics_url or "off",
            self.manifest.label,
            info.backend,
            info.precision,
            ", ".join(p.id for p in self.protocols),
        )
        return endpoints

    def stop(self) -> None:
        """Stop in data-flow order; safe to call twice and after a failed start."""
        with self._lock:
            self.metrics.set_ready(False)
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            for stage in self._stages:
                stage.stop(STOP_TIMEOUT_S)
            self._stages = []
            if self._publisher is not None:
                self._publisher.stop()
                self._publisher = None
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            if self._metrics_server is not None:
                self._metrics_server.close()
                self._metrics_server = None
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self._started = False

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def endpoints(self) -> Endpoints:
        publisher = self._publisher
        url = None
        if self._metrics_server is not None:
            url = f"http://{self._metrics_server.host}:{self._metrics_server.port}/metrics"
        if publisher is None:
            return Endpoints(publish="", metrics_url=url)
        return Endpoints(
            publish=publisher.endpoint,
            metrics_url=url,
            snapshot=publisher.snapshot_endpoint or "",
            curve=publisher.secure,
        )

    def healthy(self) -> bool:
        """Every stage thread is alive (the systemd watchdog is pinged only while this holds)."""
        ok = self._started and all(stage.alive for stage in self._stages)
        if ok:
            self.metrics.heartbeat()
        return ok

    # ------------------------------------------------------------------------------------------ composition

    def _build_stages(self, engine: SctEngine) -> None:
        depth = self.config.pipeline.queue_depth
        assert self.manifest is not None and self._publisher is not None
        publisher = self._publisher
        publish: Callable[[Publication], None] = publisher.submit

        inference = InferenceStage(engine, publish, on_slab=self._on_slab, on_volume=self._on_volume)
        engine_stage: Stage[SlabRequest | StreamControl] = Stage(
            "engine",
            each(inference.handle),
            depth=max(2, depth // 16),
            on_error=self._on_error,
            batch=False,
        )
        streamer = Streamer(
            plan_for=engine.plan,
            leading_slices=self.manifest.normalisation.leading_slices,
            scale_of=engine.scale,
            emit=engine_stage.put,
            status=publish,
            reader=read_pixels,
        )
        streamer_stage: Stage[ValidatedUpdate] = Stage(
            "streamer", each(streamer.handle), depth=depth,
            on_error=self._on_error,
        )  # fmt: skip
        verdicts = VerdictStage(
            self.protocols,
            self.manifest.validated_protocols,
            forward=streamer_stage.put,
            publish=publish,
            on_verdict=self._on_verdict,
        )
        validator_stage: Stage[AcquisitionUpdate] = Stage(
            "validator", each(verdicts.handle), depth=depth,
            on_error=self._on_error,
        )  # fmt: skip
        finished = self._journal.finished_acquisitions() if self._journal is not None else set()
        assembler = Assembler(
            validator_stage.put,
            quiet_period_s=self.config.assembly.quiet_period_s,
            on_file=self._on_file,
            already_finished=finished,
        )

        def assemble(items: list[ArrivedFile]) -> None:
            for item in items:
                assembler.add_file(item)
            assembler.flush()

        def idle() -> None:
            assembler.tick()
            self.metrics.set_acquisitions_open(assembler.open_count)

        assembler_stage: Stage[ArrivedFile] = Stage(
            "assembler", assemble, depth=depth * 4, idle=idle, on_error=self._on_error
        )
        self._assembler_stage = assembler_stage
        self._stages = [assembler_stage, validator_stage, streamer_stage, engine_stage]
        if self.config.dicom.folder is not None:
            output = DicomOutput(
                self.config.dicom,
                publish,
                on_written=self.metrics.dicom_series,
                on_stored=self.metrics.dicom_store,
            )
            # A few volumes deep: the engine waits (back-pressure) rather than memory growing if the disk is slow.
            self._dicom_stage = Stage(
                "dicom", each(output.handle), depth=DICOM_QUEUE_DEPTH, on_error=self._on_error, batch=False
            )
            self._stages.append(self._dicom_stage)

    # ---------------------------------------------------------------------------------- side-service hooks

    def _on_arrival(self, arrived: ArrivedFile) -> None:
        self._assembler_stage.put(arrived)

    def _on_skipped(self, path: Path, reason: str) -> None:
        # Temp names, hidden files and folders are the normal traffic of an export in progress, not files the
        # agent declined: only files that could have been images count as skipped.
        if reason in _COUNTED_SKIPS:
            self.metrics.file_seen("skipped")
            logger.info("skipped %s: %s", path.name, reason)

    def _on_file(self, arrived: ArrivedFile, outcome: str, reason: str, acquisition_id: str | None) -> None:
        self.metrics.file_seen(outcome)
        if self._journal is not None:
            self._journal.record_file(
                arrived.path, arrived.size, arrived.mtime_ns, outcome, reason, acquisition_id
            )

    def _on_verdict(self, report: VerdictReport) -> None:
        verdict = report.verdict
        self.metrics.verdict(
            verdict.outcome.value,
            verdict.final,
            report.first_image_to_verdict_s,
            [r.category for r in verdict.reasons],
        )
        if report.completion_delay_s is not None and report.ended_by == EndedBy.COUNT:
            self.metrics.completion_detected(report.completion_delay_s)
        if self._journal is not None:
            self._journal.record_verdict(verdict)
            if verdict.final:
                self._journal.record_acquisition(
                    verdict.acquisition_id,
                    _FINAL_STATES[verdict.outcome],
                    protocol_id=verdict.protocol_id,
                )
        if verdict.final:
            logger.info(
                "acquisition %s ended (%s): %s against %s%s",
                verdict.acquisition_id,
                report.ended_by,
                verdict.outcome.value,
                verdict.protocol_id,
                "".join(f"; {r.text()}" for r in verdict.reasons),
            )

    def _on_slab(self, request: SlabRequest, slab: SctSlab) -> None:
        self.metrics.slab_inferred(request.read_s, slab.inference_s)
        if self._journal is not None:
            self._journal.record_slab(
                slab.acquisition_id, slab.slab_index, slab.start, slab.size, slab.sha256, None
            )

    def _republish_archive(self) -> None:
        """Put the volumes published before a restart back within reach of late robots (marked republished)."""
        assert self._archive is not None and self._publisher is not None
        volumes, problems = self._archive.load()
        for problem in problems:
            self.metrics.error("publisher")
            self._publisher.submit(
                error_event(
                    problem.acquisition_id,
                    stage="publisher",
                    message=f"stored volume not republished: {problem.reason}",
                    at=time.time(),
                )
            )
        for volume in volumes:
            self._publisher.submit(volume)
        if volumes:
            logger.info("republished %d sCT volume(s) kept from before the restart", len(volumes))

    def _on_volume(self, volume: SctVolume, last_image_at: float) -> None:
        if self._archive is not None:
            try:
                self._archive.save(volume)
            except (OSError, ValueError) as error:
                # The volume is published; only a restart's late joiners would miss it. Say so, carry on.
                logger.error(
                    "acquisition %s: volume not archived for restarts: %s", volume.acquisition_id, error
                )
                self.metrics.error("publisher")
        if self._dicom_stage is not None:
            self._dicom_stage.put(volume)
        logger.info(
            "acquisition %s: sCT volume %s done %.2f s after the last image",
            volume.acquisition_id,
            "x".join(map(str, volume.geometry.shape)),
            volume.produced_at - last_image_at,
        )

    def _on_sent(self, item: Publication, seq: int, sent_at: float) -> None:
        if isinstance(item, SctSlab):
            self.metrics.published("sct.slab", int(item.hu.nbytes))
            last = item.slab_index == item.slab_count - 1
            self.metrics.slab_published(sent_at - item.inputs_complete_at if last else None)
            if self._journal is not None:
                self._journal.record_publication(
                    item.acquisition_id, "slab", seq, item.sha256, slab_index=item.slab_index
                )
        elif isinstance(item, SctVolume):
            self.metrics.published("sct.volume", int(item.hu.nbytes))
            if item.republished:
                return  # counted and journalled when it was first published, before the restart
            self.metrics.volume_published(max(0.0, sent_at - item.last_image_at))
            if self._journal is not None:
                self._journal.record_publication(item.acquisition_id, "volume", seq, item.sha256)
                self._journal.record_acquisition(
                    item.acquisition_id, AcquisitionState.PUBLISHED, protocol_id=item.protocol_id
                )
        elif isinstance(item, StatusEvent):
            self.metrics.published("status", 0)

    def _on_error(self, stage: str, error: BaseException) -> None:
        self.metrics.error(stage)
        if self._publisher is not None:
            self._publisher.submit(
                error_event(None, stage=stage, message=f"{type(error).__name__}: {error}", at=time.time())
            )
