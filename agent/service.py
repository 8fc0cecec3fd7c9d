"""The agent as one long-running service: start everything in a safe order, report health, stop cleanly.

Start-up order is the reverse of the data flow (publisher first, watcher last), so nothing is produced before its
consumer exists, and the engine is warmed up before the agent reports ready. CURVE keys are checked first of
all: a refused key must stop the agent in milliseconds, not after the engine's warm-up. Stop is in data-flow
order: the watcher stops first, each stage finishes the item in hand (the slab in flight completes and is
published), then the publisher sends what is queued and closes its sockets. What the stages are and how they
are joined is :func:`agent.pipeline.compose`; what they report goes to :class:`agent.ops.side_services.SideServices`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from agent.inference.untrusted_regions import stored_regions
from agent.ingest.store_scp import StoreScp
from agent.ingest.watcher import Watcher
from agent.ops import sd_notify
from agent.ops.acquisition_summary import AcquisitionSummaries
from agent.ops.config import MB, AgentConfig
from agent.ops.disk_space import DiskGuard
from agent.ops.journal import Journal, JournalError
from agent.ops.metrics import AgentMetrics
from agent.ops.metrics_server import MetricsServer, serve
from agent.ops.retention import Retention
from agent.ops.side_services import SideServices, model_key
from agent.pipeline import Stages, compose
from agent.publish.publisher import Publisher
from agent.publish.security import publish_security
from agent.publish.volume_archive import VolumeArchive
from agent.records import Publication
from agent.status_page.access import check_page_access
from agent.status_page.board import EngineLine
from agent.status_page.status_page import StatusPage
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR, load_protocols
from agent.validation.protocols import SequenceProtocol
from engines.backends.base import BackendOptions
from engines.inference.engine import SctEngine
from engines.model.manifest import ModelManifest, default_manifest

logger = logging.getLogger(__name__)

#: Seconds a stage gets to finish the item in hand when the agent stops (a CPU slab takes a few seconds).
STOP_TIMEOUT_S = 60.0
JOURNAL_FILE = "journal.sqlite"
#: Folder under ``state.folder`` keeping the latest published volumes across restarts (agent.publish.volume_archive).
SNAPSHOT_ARCHIVE = "snapshot"


@dataclass(frozen=True, slots=True)
class Endpoints:
    publish: str
    metrics_url: str | None
    #: Where subscribers ask for snapshots (docs/protocol.md).
    snapshot: str = ""
    #: The publisher runs CURVE: subscribers need its public key and a key on the allow-list.
    curve: bool = False
    #: The technologist's status page (agent/status_page), "" when off.
    page_url: str = ""
    #: Where scanners send by C-STORE, "AE_TITLE@host:port" (the real port); "" when receive is off.
    receive: str = ""


class AgentService:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self._journal: Journal | None = None
        self._metrics_server: MetricsServer | None = None
        self._publisher: Publisher | None = None
        self._engine: SctEngine | None = None
        self._watcher: Watcher | None = None
        self._receiver: StoreScp | None = None
        self._stages: Stages | None = None
        self._retention: Retention | None = None
        self._page: StatusPage | None = None
        self._started = False
        self._lock = threading.Lock()
        self.protocols: tuple[SequenceProtocol, ...] = ()
        self.manifest: ModelManifest | None = None

    def start(self) -> Endpoints:
        """Build and start every stage; returns once the engine is warm and the watcher scans."""
        config = self.config
        try:
            curve = publish_security(config.publish)
            self.metrics.set_curve(curve is not None)
            check_page_access(
                config.status_page
            )  # a bad page certificate or key fails now, not after warm-up
            config.state.folder.mkdir(parents=True, exist_ok=True)
            self._journal = Journal(config.state.folder / JOURNAL_FILE)
            try:
                if self._journal.enable_space_reclaim():
                    logger.info("state journal converted to incremental vacuum (once), so pruning shrinks it")
            except JournalError as error:  # no room, or another process holds the write lock: not fatal
                logger.warning("%s; the journal is converted at a later start", error)
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
                    threads=config.engine.threads or None,
                    cache_dir=config.engine_cache_dir,
                    remote=config.triton.link(observer=self.metrics),
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
                engine=str(info.details.get("engine", "")),
            )
            acceptance = info.details.get("acceptance")
            if acceptance is not None:
                self.metrics.set_engine_acceptance(
                    mean_abs_hu=acceptance["mean_abs_hu"],
                    p999_abs_hu=acceptance["p999_abs_hu"],
                    max_abs_hu=acceptance["max_abs_hu"],
                    passed=acceptance["passed"],
                    build_s=float(info.details.get("engine_build_s", 0.0)),
                    refusals=len(info.details.get("refusals", [])),
                )
            if engine.device.type == "cuda":
                self.metrics.watch_gpu_memory(engine.gpu_memory_allocated, engine.gpu_memory_reserved)
            archive = VolumeArchive(
                config.state.folder / SNAPSHOT_ARCHIVE,
                config.publish.snapshot_volumes,
                find_regions=stored_regions,
            )
            dicom_folder = config.dicom_folder
            retention = self._retention = Retention(
                config.retention,
                journal=self._journal,
                archive=archive,
                dicom_folder=dicom_folder,
                export_folder=config.watch.folder,
                metrics=self.metrics,
                received_folder=config.received_folder,
            )
            retention.run(("snapshot",))  # volumes past their age are not republished below
            summaries = AcquisitionSummaries(
                backend=info.backend, precision=info.precision, dicom_enabled=dicom_folder is not None
            )
            services = SideServices(
                self.metrics,
                self._journal,
                archive,
                self._submit,
                summaries,
                model=model_key(self.manifest.model_id, self.manifest.version),
                dicom=dicom_folder is not None,
                on_disk_full=retention.wake,
            )
            self._publisher = Publisher(
                config.publish.endpoint,
                snapshot_endpoint=config.publish.snapshot,
                snapshot_volumes=config.publish.snapshot_volumes,
                curve=curve,
                heartbeat_s=config.publish.heartbeat_s,
                send_hwm=config.publish.send_hwm,
                queue_depth=config.pipeline.queue_depth,
                on_sent=services.sent,
                on_subscribers=self._subscribers,
                on_dropped=self.metrics.dropped,
                on_rejected=self.metrics.subscriber_rejected,
                on_snapshot=self.metrics.snapshot_served,
                on_snapshot_failed=self.metrics.snapshot_not_served,
                on_snapshot_request=self.metrics.snapshot_requested,
            )
            self._publisher.start()
            if config.status_page.enabled:
                self._page = StatusPage(
                    config.status_page, self.protocols, self.manifest.validated_protocols, self.metrics
                )
                self._page.set_engine(
                    EngineLine(self.manifest.label, info.backend, info.precision, str(info.device), warm=True)
                )
                self._page.start()
            services.engine_refusals(info.details.get("refusals", []))
            services.republish_archive()
            if dicom_folder is not None:
                dicom_folder.mkdir(parents=True, exist_ok=True)
            guard = DiskGuard(
                {
                    "state": config.state.folder,
                    **({"dicom": dicom_folder} if dicom_folder is not None else {}),
                },
                int(config.retention.min_free_mb * MB),
                publish=self._submit,
                metrics=self.metrics,
                prune_now=retention.wake,
                prune_runs=lambda: retention.runs,
            )
            self._stages = compose(
                config, engine, self.manifest, self.protocols, self._submit, services, admit=guard.admit
            )
            for stage in self._stages.all:
                self.metrics.watch_queue(stage.name, stage.inbox)
                stage.start()
            if self._stages.dicom_writer is not None:
                retention.set_in_use(self._stages.dicom_writer.in_use)
            retention.add_tick(services.journal_writes.retry)
            retention.add_tick(guard.shortage)
            retention.start()
            self._watcher = Watcher(
                config.watch.folder,
                self._stages.entry.put,
                observer=config.watch.observer,
                poll_interval_s=config.watch.poll_interval_s,
                recursive=config.watch.recursive,
                on_skipped=services.file_skipped,
                on_folder=lambda available, message: services.watch_folder(
                    config.watch.folder, available, message
                ),
            )
            self._watcher.start()
            self.metrics.set_watch_folder(True)
            if config.receive.enabled:
                self._receiver = StoreScp(
                    config.receive,
                    config.received_folder,
                    self._stages.entry.put,
                    self.metrics,
                    free_bytes=lambda: guard.free_bytes("state"),
                )
                self._receiver.start()
                self.metrics.watch_receive_associations(self._open_associations)
                if self._page is not None:
                    self._page.set_receive(self.endpoints.receive)
        except BaseException:
            self.stop()
            raise
        self._started = True
        self.metrics.set_ready(True)
        endpoints = self.endpoints
        logger.info(
            "ready: watching %s (%s), C-STORE %s, publishing on %s (snapshots %s, %s), DICOM %s, metrics %s, "
            "status page %s, model %s on %s %s, protocols %s",
            config.watch.folder,
            config.watch.observer,
            endpoints.receive or "off",
            endpoints.publish,
            endpoints.snapshot,
            "CURVE" if endpoints.curve else "plain",
            config.dicom_folder or "off",
            endpoints.metrics_url or "off",
            endpoints.page_url or "off",
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
            if self._page is not None:  # first: no browser waits on a pipeline that is going away
                self._page.stop()
                self._page = None
            if self._receiver is not None:
                self._receiver.stop()
                self._receiver = None
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            if self._stages is not None:
                for stage in self._stages.all:
                    stage.stop(STOP_TIMEOUT_S)
                self._stages = None
            if self._retention is not None:
                self._retention.stop()
                self._retention = None
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

    def __enter__(self) -> AgentService:
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
        page_url = self._page.url if self._page is not None else ""
        receive = ""
        if self._receiver is not None:
            host, port = self._receiver.address
            receive = f"{self.config.receive.ae_title}@{f'[{host}]' if ':' in host else host}:{port}"
        if publisher is None:
            return Endpoints(publish="", metrics_url=url, page_url=page_url, receive=receive)
        return Endpoints(
            publish=publisher.endpoint,
            metrics_url=url,
            snapshot=publisher.snapshot_endpoint or "",
            curve=publisher.secure,
            page_url=page_url,
            receive=receive,
        )

    def _open_associations(self) -> int:
        receiver = self._receiver
        return 0 if receiver is None else receiver.open_associations

    def healthy(self) -> bool:
        """Every stage thread is alive (the systemd watchdog is pinged only while this holds)."""
        ok = self._started and self._stages is not None and all(stage.alive for stage in self._stages.all)
        if ok:
            self.metrics.heartbeat()
        return ok

    def _subscribers(self, count: int) -> None:
        """Subscribers connected (the publisher's thread): the gauge and the page's header."""
        self.metrics.set_subscribers(count)
        page = self._page
        if page is not None:
            page.set_subscribers(count)

    def _submit(self, item: Publication) -> None:
        """Hand an item to the publisher, and show it on the status page first (a quick board update; the page
        reads what is published and never holds the stage). Stages stop before the publisher, so only an item
        produced after a stop (or a failed start) finds none: it is logged, never dropped silently."""
        page = self._page
        if page is not None:
            page.feed(item)
        publisher = self._publisher
        if publisher is None:
            logger.warning("not published (the publisher is stopped): %s", type(item).__name__)
            return
        publisher.submit(item)
