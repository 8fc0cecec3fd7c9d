"""The engine stage: run each slab through the sCT engine, publish it, and publish the stitched volume.

HU leave this stage as int16 (the CT convention; the model's range -1024..3071 HU fits) with a sha256 computed
here, where the slab is made, so the checksum a subscriber verifies covers every hop after the engine. The
finished volume is published only when the streamer says the final verdict passed (FINALIZE) and every slab
is done, whichever comes last.

Exactly once per model, across crashes: before a volume is sent it is committed (``commit``: the volume archive,
then the journal), so a crash after the commit leaves it to the archive to republish at the next start. An
acquisition whose volume was committed before a restart but whose work is not finished (its DICOM series was not
written) is inferred again from the export folder; its slabs and volume are then not sent a second time
(``committed`` says so at its first slab), and only the stages after the wire (DICOM) get the volume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.records import (
    Publication,
    SctSlab,
    SctVolume,
    SlabRequest,
    StatusEvent,
    StreamControl,
    payload_sha256,
)
from agent.status_events import error_event, progress_event
from agent.vocabulary import LogEvent, StatusKind, StreamAction
from engines.inference.engine import SctEngine
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Volume:
    geometry: VolumeGeometry
    protocol_id: str
    slab_count: int
    hu: npt.NDArray[np.int16]
    done: set[int] = field(default_factory=set)
    finalize: StreamControl | None = None
    #: sha256 of this acquisition's volume committed before a restart; its slabs and volume are not sent again.
    committed: str | None = None


class EngineStage:
    """Not thread-safe: the engine stage thread owns it (and the engine)."""

    def __init__(
        self,
        engine: SctEngine,
        publish: Callable[[Publication], None],
        *,
        on_slab: Callable[[SlabRequest, SctSlab], None] | None = None,
        on_volume: Callable[[SctVolume, float], None] | None = None,
        commit: Callable[[SctVolume], str | None] | None = None,
        committed: Callable[[str], str | None] | None = None,
    ) -> None:
        self._engine = engine
        self._publish = publish
        self._on_slab = on_slab
        self._on_volume = on_volume
        self._commit = commit
        self._committed = committed
        self._volumes: dict[str, _Volume] = {}

    @property
    def open_count(self) -> int:
        return len(self._volumes)

    def handle(self, item: SlabRequest | StreamControl) -> None:
        if isinstance(item, StreamControl):
            self._control(item)
        else:
            self._slab(item)

    def _slab(self, request: SlabRequest) -> None:
        grid = request.geometry
        volume = self._volumes.get(request.acquisition_id)
        if volume is None or volume.geometry != grid:
            volume = _Volume(
                geometry=grid,
                protocol_id=request.protocol_id,
                slab_count=request.slab_count,
                hu=self._engine.new_output(grid.shape),
                committed=self._committed(request.acquisition_id) if self._committed else None,
            )
            self._volumes[request.acquisition_id] = volume
            if volume.committed is not None:
                logger.info(
                    "acquisition %s: its sCT volume was published before a restart; inferring it again for the "
                    "outputs still missing, without sending it again",
                    request.acquisition_id,
                )
        plan = self._engine.plan(grid.shape[0])
        window = plan.windows[request.slab_index]
        started = time.perf_counter()
        hu = self._engine.run_slab(
            request.volume, plan, window, request.scale, out=volume.hu[window.core_start : window.core_stop]
        )
        inference_s = time.perf_counter() - started
        volume.done.add(request.slab_index)
        manifest = self._engine.manifest
        slab = SctSlab(
            acquisition_id=request.acquisition_id,
            protocol_id=request.protocol_id,
            model_id=manifest.model_id,
            model_version=manifest.version,
            geometry=grid,
            slab_index=request.slab_index,
            slab_count=request.slab_count,
            start=window.core_start,
            size=window.core_stop - window.core_start,
            hu=hu,
            sha256=payload_sha256(hu),
            inference_s=inference_s,
            inputs_complete_at=request.inputs_complete_at,
            produced_at=time.time(),
        )
        if volume.committed is None:
            self._publish(slab)
            progress = progress_event(
                request.acquisition_id,
                slabs_done=len(volume.done),
                slab_count=request.slab_count,
                at=time.time(),
            )
            self._publish(
                StatusEvent(
                    progress.kind,
                    progress.acquisition_id,
                    {**progress.body, "inference_s": round(inference_s, 3)},
                    progress.at,
                )
            )
        if self._on_slab is not None:
            self._on_slab(request, slab)
        self._maybe_finish(request.acquisition_id, volume)

    def _control(self, control: StreamControl) -> None:
        volume = self._volumes.get(control.acquisition_id)
        if control.action is StreamAction.CANCEL:
            self._volumes.pop(control.acquisition_id, None)
            self._publish(
                StatusEvent(
                    StatusKind.CANCELLED, control.acquisition_id, {"reason": control.reason}, time.time()
                )
            )
            return
        if volume is None:
            logger.warning(
                "acquisition %s: finalize without slabs",
                control.acquisition_id,
                extra={"event": LogEvent.VOLUME, "stage": "engine", "acquisition_id": control.acquisition_id},
            )
            return
        volume.finalize = control
        self._maybe_finish(control.acquisition_id, volume)

    def _maybe_finish(self, acquisition_id: str, volume: _Volume) -> None:
        if volume.finalize is None or len(volume.done) < volume.slab_count:
            return
        del self._volumes[acquisition_id]
        manifest = self._engine.manifest
        finished = SctVolume(
            acquisition_id=acquisition_id,
            protocol_id=volume.protocol_id,
            model_id=manifest.model_id,
            model_version=manifest.version,
            geometry=volume.geometry,
            hu=volume.hu,
            sha256=payload_sha256(volume.hu),
            slab_count=volume.slab_count,
            produced_at=time.time(),
            last_image_at=volume.finalize.last_image_at,
            sources=volume.finalize.sources,
        )
        prior = self._commit(finished) if self._commit is not None else volume.committed
        if prior is None:
            self._publish(finished)
        elif prior != finished.sha256:
            # Inference is deterministic on one backend; a difference means the backend or its engine changed
            # under the same model version. What the robots got stays the published volume.
            logger.error(
                "acquisition %s: the sCT volume inferred again has sha256 %s…, the one published before the "
                "restart %s…; not sent again",
                acquisition_id,
                finished.sha256[:12],
                prior[:12],
            )
            self._publish(
                error_event(
                    acquisition_id,
                    stage="engine",
                    message=(
                        f"volume inferred again after a restart differs from the published one (sha256 "
                        f"{finished.sha256[:12]}…, published {prior[:12]}…); the published one stands"
                    ),
                    at=time.time(),
                )
            )
        if self._on_volume is not None:
            self._on_volume(finished, volume.finalize.last_image_at)
