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

With a model that has a confidence output (its manifest's ``confidence`` section), each slab's confidence is
computed in the same network pass, travels with the slab (``SctSlab.confidence``, uint8, hashed here too) and
is stitched like the HU. A finished volume with confidence is handed to the regions stage
(agent.inference.untrusted_regions), which finds the regions not to trust on the whole volume, off this
thread, and then sends it; a volume without goes out from here (agent.inference.volume_delivery).

A slab the engine cannot compute (its worker process killed by the kernel's OOM killer, the GPU out of
memory, anything the backend raises) fails its series, not the agent: what was computed of the volume is
dropped, the series is reported (an ``error`` status naming the acquisition, the engine and the cause, then
``cancelled``, so subscribers and snapshots drop its slabs) and counted, its remaining slabs are passed over,
and the next series runs as usual (the worker is started again for it). Nothing partial is ever published as
a volume. It is not retried here: a slab that exhausted memory once would do it again; a restart of the agent
infers the series again (the journal does not count it as finished).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from agent.inference.untrusted_regions import RegionSearch
from agent.inference.volume_delivery import VolumeDelivery
from agent.records import (
    Publication,
    SctSlab,
    SctVolume,
    SlabRequest,
    StatusEvent,
    StreamControl,
    VolumeToCheck,
    confidence_sha256,
    payload_sha256,
)
from agent.status_events import error_event, progress_event
from agent.vocabulary import LogEvent, StatusKind, StreamAction
from engines.backends.aot_worker import EngineWorkerEndedError
from engines.backends.remote_link import RemoteInferenceError
from engines.inference.engine import EngineOutOfMemoryError, SctEngine
from engines.serving.contract import ServedModelMismatchError
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

#: Failed acquisitions remembered so that their remaining slabs are passed over; slabs of one acquisition
#: arrive together, so a few dozen is plenty, and the bound keeps a long run's memory flat.
MAX_FAILED_KEPT: Final = 64


def failure_cause(error: BaseException) -> str:
    """The bounded cause of an engine failure, for the metric (``agent.ops.metrics.ENGINE_FAILURE_CAUSES``)."""
    if isinstance(error, EngineWorkerEndedError):
        return "worker_ended"
    if isinstance(error, EngineOutOfMemoryError):
        return "out_of_memory"
    if isinstance(error, RemoteInferenceError | ServedModelMismatchError):
        return "remote"
    return "error"


@dataclass(slots=True)
class _Volume:
    geometry: VolumeGeometry
    protocol_id: str
    slab_count: int
    hu: npt.NDArray[np.int16]
    #: The volume's confidence, filled slab by slab like ``hu``; None when the model has no confidence output.
    confidence: npt.NDArray[np.uint8] | None = None
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
        on_failure: Callable[[str, str], None] | None = None,
        on_cancel: Callable[[str], None] | None = None,
        check: Callable[[VolumeToCheck], object] | None = None,
    ) -> None:
        """``on_failure(acquisition_id, cause)`` is told each series the engine failed (cause: see
        :func:`failure_cause`). ``check`` takes a finished volume with confidence to the regions stage; without
        it the regions are found here, on this thread (tools and tests)."""
        self._engine = engine
        self._publish = publish
        self._on_slab = on_slab
        self._delivery = VolumeDelivery(publish, commit=commit, on_volume=on_volume)
        spec = engine.confidence
        self._spec = spec
        if check is None and spec is not None:
            check = RegionSearch(spec, self._delivery).handle
        self._check = check
        self._committed = committed
        self._on_failure = on_failure
        #: Told, before subscribers are, that an acquisition's slabs so far are void (the journal forgets them).
        self._on_cancel = on_cancel
        self._volumes: dict[str, _Volume] = {}
        #: Acquisitions the engine failed: their later slabs and their finalize are passed over.
        self._failed: OrderedDict[str, None] = OrderedDict()

    @property
    def open_count(self) -> int:
        return len(self._volumes)

    def handle(self, item: SlabRequest | StreamControl) -> None:
        if isinstance(item, StreamControl):
            self._control(item)
        else:
            self._slab(item)

    def _slab(self, request: SlabRequest) -> None:
        if request.acquisition_id in self._failed:
            logger.debug(
                "acquisition %s: slab %d passed over (the engine failed this series)",
                request.acquisition_id,
                request.slab_index,
            )
            return
        grid = request.geometry
        volume = self._volumes.get(request.acquisition_id)
        if volume is None or volume.geometry != grid:
            volume = _Volume(
                geometry=grid,
                protocol_id=request.protocol_id,
                slab_count=request.slab_count,
                hu=self._engine.new_output(grid.shape),
                confidence=self._engine.new_confidence_output(grid.shape) if self._spec is not None else None,
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
        core = slice(window.core_start, window.core_stop)
        confidence = volume.confidence[core] if volume.confidence is not None else None
        started = time.perf_counter()
        try:
            hu = self._engine.run_slab(
                request.volume, plan, window, request.scale, out=volume.hu[core], confidence_out=confidence
            )
        except Exception as error:  # one series lost, never the stage: see the module's docstring
            self._fail(request, error)
            return
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
            **self._confidence_fields(confidence),
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

    def _fail(self, request: SlabRequest, error: Exception) -> None:
        key = request.acquisition_id
        self._volumes.pop(key, None)
        self._failed[key] = None
        while len(self._failed) > MAX_FAILED_KEPT:
            self._failed.popitem(last=False)
        info = self._engine.info
        cause = failure_cause(error)
        message = (
            f"engine {info.backend} {info.precision} on {info.device} failed on slab {request.slab_index + 1} of "
            f"{request.slab_count}: {type(error).__name__}: {error}; this series gets no sCT, the next one "
            f"runs as usual"
        )
        logger.error("acquisition %s: %s", key, message, exc_info=cause == "error")
        now = time.time()
        if self._on_cancel is not None:
            self._on_cancel(key)
        self._publish(error_event(key, stage="engine", message=message, at=now))
        self._publish(StatusEvent(StatusKind.CANCELLED, key, {"reason": f"engine failed ({cause})"}, now))
        if self._on_failure is not None:
            self._on_failure(key, cause)

    def _control(self, control: StreamControl) -> None:
        volume = self._volumes.get(control.acquisition_id)
        if control.action is StreamAction.CANCEL:
            self._volumes.pop(control.acquisition_id, None)
            # A stream started again after a cancel (a new slice grid) is new work: the engine tries it.
            self._failed.pop(control.acquisition_id, None)
            if self._on_cancel is not None:
                self._on_cancel(control.acquisition_id)
            self._publish(
                StatusEvent(
                    StatusKind.CANCELLED, control.acquisition_id, {"reason": control.reason}, time.time()
                )
            )
            return
        if volume is None:
            if control.acquisition_id not in self._failed:
                logger.warning(
                    "acquisition %s: finalize without slabs",
                    control.acquisition_id,
                    extra={
                        "event": LogEvent.VOLUME,
                        "stage": "engine",
                        "acquisition_id": control.acquisition_id,
                    },
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
            **self._confidence_fields(volume.confidence),
        )
        if volume.confidence is not None and self._check is not None:
            # The regions are found on the whole volume, off this thread; that stage sends it.
            self._check(VolumeToCheck(finished, volume.committed))
        else:
            self._delivery.deliver(finished, volume.committed)

    def _confidence_fields(self, confidence: npt.NDArray[np.uint8] | None) -> dict[str, Any]:
        """The confidence fields of a slab or volume record (none without a confidence output)."""
        spec = self._spec
        if confidence is None or spec is None:
            return {}
        return {
            "confidence": confidence,
            "confidence_sha256": confidence_sha256(confidence),
            "confidence_method": spec.method,
            "confidence_threshold": spec.threshold,
        }
