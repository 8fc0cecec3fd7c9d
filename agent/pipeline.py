"""The data flow: the one place the agent's stages are composed (docs/architecture.md draws it).

    watcher -> assembler -> validator -> streamer -> engine -> publisher (ZeroMQ PUB + snapshot ROUTER)
                   |            |                      |  [-> regions, with a confidence output]
                   |            |                      |    +---> dicom (CT series on disk, C-STORE)
                   +------ journal (SQLite) and metrics (Prometheus): SideServices ------+

Each arrow is the bounded inbox of the receiving :class:`~agent.stage_thread.Stage`: a stage blocks when the
next one is full, so a slow engine slows ingestion instead of growing memory. :func:`compose` builds the chain
from its far end (each stage needs the ``put`` of the next one), so it reads bottom-up; the agent's lifecycle
(what starts first, how it stops) lives in :mod:`agent.service`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.dicom_out.dicom_publisher import STORE_BACKLOG, DicomPublisher
from agent.inference.engine_stage import EngineStage
from agent.inference.streamer import Streamer
from agent.inference.untrusted_regions import RegionSearch
from agent.inference.volume_delivery import VolumeDelivery
from agent.ingest.assembler import Assembler
from agent.ingest.pixel_reader import read_pixels
from agent.ops.config import AgentConfig
from agent.ops.side_services import SideServices
from agent.records import ArrivedFile, DicomStoreRequest, Publication, SctVolume, StatusEvent, VolumeToCheck
from agent.stage_thread import Stage, each
from agent.validation.protocols import SequenceProtocol
from agent.validation.validator import ValidatorStage
from engines.inference.engine import SctEngine
from engines.model.manifest import ModelManifest

#: Finished volumes waiting for the DICOM writer: a few deep, so a slow disk holds the engine back (back-pressure)
#: rather than memory growing.
DICOM_QUEUE_DEPTH = 4
#: Finished volumes waiting for their regions to be found (a model with a confidence output): as few as the DICOM
#: writer's, for the same reason.
REGIONS_QUEUE_DEPTH = 4


@dataclass(frozen=True, slots=True)
class Stages:
    """The composed stages, in data-flow order; ``entry`` takes the watcher's files."""

    all: tuple[Stage[Any], ...]
    entry: Stage[ArrivedFile]
    assembler: Assembler
    #: The sCT DICOM writer (None when ``dicom.enabled`` is false); retention asks it which series are in use.
    dicom_writer: DicomPublisher | None = None


def compose(
    config: AgentConfig,
    engine: SctEngine,
    manifest: ModelManifest,
    protocols: Sequence[SequenceProtocol],
    publish: Callable[[Publication], None],
    services: SideServices,
    *,
    admit: Callable[[str], bool] | None = None,
) -> Stages:
    """``admit`` decides whether a new acquisition may start now (the free-space check, agent.ops.disk_space)."""
    depth, error = config.pipeline.queue_depth, services.stage_error

    dicom: Stage[SctVolume] | None = None
    writer: DicomPublisher | None = None
    store: Stage[DicomStoreRequest] | None = None

    def offer_store(request: DicomStoreRequest) -> bool:
        return store is not None and store.offer(request)

    if config.dicom_folder is not None:

        def publish_dicom(event: StatusEvent) -> None:
            services.dicom_reported(event)
            publish(event)

        writer = DicomPublisher(
            config.dicom,
            publish_dicom,
            on_written=services.metrics.dicom_series,
            on_stored=services.metrics.dicom_store,
            on_series=services.dicom_written,
            on_disk_full=services.dicom_disk_full,
            folder=config.dicom_folder,
            forward_store=offer_store if config.dicom.store_peer else None,
        )
        dicom = Stage("dicom", each(writer.handle), depth=DICOM_QUEUE_DEPTH, on_error=error, batch=False)
        if config.dicom.store_peer:
            # Its own thread: a peer that hangs costs its timeouts there, never the next series' write.
            store = Stage("dicom_store", each(writer.store), depth=STORE_BACKLOG, on_error=error, batch=False)

    def volume_done(volume: SctVolume, last_image_at: float) -> None:
        services.volume_done(volume, last_image_at)
        if dicom is not None:
            dicom.put(volume)

    regions: Stage[VolumeToCheck] | None = None
    if engine.confidence is not None:
        # The regions not to trust are found on the whole volume on a thread of their own, and the volume goes
        # out from there: the engine's thread goes on with the next slab meanwhile.
        search = RegionSearch(
            engine.confidence,
            VolumeDelivery(publish, commit=services.commit_volume, on_volume=volume_done),
        )
        regions = Stage(
            "regions", each(search.handle), depth=REGIONS_QUEUE_DEPTH, on_error=error, batch=False
        )

    engine_stage = EngineStage(
        engine,
        publish,
        on_slab=services.slab_inferred,
        on_volume=volume_done,
        commit=services.commit_volume,
        committed=services.committed_volume,
        on_failure=services.engine_failed,
        on_cancel=services.stream_cancelled,
        check=regions.put if regions is not None else None,
    )
    inference = Stage(
        "engine", each(engine_stage.handle), depth=max(2, depth // 16), on_error=error, batch=False
    )

    streamer = Streamer(
        plan_for=engine.plan,
        leading_slices=manifest.normalisation.leading_slices,
        scale_of=engine.scale,
        emit=inference.put,
        status=publish,
        reader=read_pixels,
        new_volume=engine.new_volume,
    )
    streaming = Stage("streamer", each(streamer.handle), depth=depth, on_error=error)

    validator = ValidatorStage(
        protocols,
        manifest.validated_protocols,
        forward=streaming.put,
        publish=publish,
        on_verdict=services.verdict,
    )
    validating = Stage("validator", each(validator.handle), depth=depth, idle=validator.idle, on_error=error)

    assembler = Assembler(
        validating.put,
        quiet_period_s=config.assembly.quiet_period_s,
        on_file=services.file_done,
        already_finished=services.finished_acquisitions(),
        admit=admit,
    )

    def assemble(items: list[ArrivedFile]) -> None:
        for item in items:
            assembler.add_file(item)
        assembler.flush()

    def idle() -> None:
        assembler.tick()
        services.metrics.set_acquisitions_open(assembler.open_count)
        services.metrics.set_files_held(assembler.held_count)

    assembling = Stage("assembler", assemble, depth=depth * 4, idle=idle, on_error=error)

    outputs = tuple(stage for stage in (regions, dicom, store) if stage is not None)
    stages = (assembling, validating, streaming, inference, *outputs)
    return Stages(all=stages, entry=assembling, assembler=assembler, dicom_writer=writer)
