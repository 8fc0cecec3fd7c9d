"""Hand slabs to the engine as soon as their slices (and halo) are on disk in every echo.

A slab of the plan needs the slices ``SlabWindow.needed_slices`` of both echoes, and the first slab also needs
the normalisation's leading slices (the intensity scale is computed once from them, so every slab of a volume
uses the same scale as a whole-volume pass). The streamer does not wait for the series to complete: with
slices arriving in order, slab k goes to the engine while slab k+1's images are still being written.

Pixels are read only here and only for the slices a slab needs, and each slice goes straight into the engine's
device-resident volume (``[echo, slice, row, column]`` on the GPU when there is one), so the engine stage never
copies pixels again. The volume lives as long as the acquisition streams and is freed when it ends, so memory
is bounded by the acquisitions in flight, not by how many were seen. The normalisation's leading slices are
also kept on the host until the intensity scale is computed from them. Slabs of one acquisition are handed on
in order.

Nothing is handed on for an acquisition whose verdict does not allow inference. If the verdict turns after
slabs were sent (a final check fails), or the assembler had to place the slice grid again, the engine stage is
told to cancel what it holds, and in the second case streaming starts over on the new grid.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.records import ImageRef, SlabRequest, SourceImages, StatusEvent, StreamControl, ValidatedUpdate
from agent.vocabulary import LogEvent, StreamAction, UpdateKind
from engines.inference.device_volume import DeviceVolume
from engines.inference.slabs import SlabPlan, SlabWindow
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

#: Two placements of one grid whose origins are closer than this (mm) are the same grid: the assembler states
#: the origin at full precision, as ImagePositionPatient of slice 0 once that image is in, computed from another
#: slice's position before (the two differ in the last bits, or by a console's DS rounding). The stream keeps
#: the grid its first slab went out on, so every slab and the volume of one acquisition carry one ``volume``
#: object.
SAME_GRID_TOLERANCE_MM = 1e-3

#: Reads the given frames of one file: ``[len(frames), rows, columns]``.
PixelReader = Callable[[Path, Sequence[int | None]], npt.NDArray[Any]]
#: An empty device-resident volume for (echoes, (slices, rows, columns)): the engine's ``new_volume``.
VolumeFactory = Callable[[int, tuple[int, int, int]], DeviceVolume]


@dataclass(slots=True)
class _Stream:
    refs: list[ImageRef] = field(default_factory=list)
    grid: VolumeGeometry | None = None
    plan: SlabPlan | None = None
    next_slab: int = 0
    volume: DeviceVolume | None = None
    #: Host copy of the normalisation's leading slices, until the scale is computed from them.
    leading: npt.NDArray[Any] | None = None
    loaded: set[tuple[int, int]] = field(default_factory=set)
    scale: float | None = None
    sent: bool = False
    protocol_id: str = ""


class Streamer:
    """Not thread-safe: the streamer stage thread owns it."""

    def __init__(
        self,
        *,
        plan_for: Callable[[int], SlabPlan],
        leading_slices: int,
        scale_of: Callable[[npt.NDArray[Any]], float],
        emit: Callable[[SlabRequest | StreamControl], object],
        status: Callable[[StatusEvent], None],
        reader: PixelReader,
        new_volume: VolumeFactory,
    ) -> None:
        self._plan_for = plan_for
        self._leading = leading_slices
        self._scale_of = scale_of
        self._emit = emit
        self._status = status
        self._reader = reader
        self._new_volume = new_volume
        self._streams: dict[str, _Stream] = {}

    @property
    def open_count(self) -> int:
        return len(self._streams)

    def handle(self, item: ValidatedUpdate) -> None:
        update, view = item.update, item.update.view
        key = view.acquisition_id
        ended = update.kind is not UpdateKind.IMAGES
        stream = self._streams.setdefault(key, _Stream())
        stream.refs.extend(update.new_images)
        try:
            if not item.infer:
                if stream.sent:
                    self._cancel(key, stream, f"verdict {item.verdict.outcome.value}")
                return
            stream.protocol_id = item.verdict.protocol_id
            if view.grid is None or (stream.grid is not None and not _same_grid(view.grid, stream.grid)):
                if stream.sent:
                    self._cancel(key, stream, "slice grid placed again; restarting the stream")
                    self._status(
                        StatusEvent(
                            "progress",
                            key,
                            {"restarted": True, "reason": "slice grid placed again"},
                            time.time(),
                        )
                    )
                stream.grid = None
                if view.grid is None:
                    return
            if stream.grid is None or not stream.sent:
                # Nothing published on it yet: take the newest placement (slice 0's stated position, once in).
                stream.grid = view.grid
                stream.plan = self._plan_for(view.grid.shape[0])
            self._send_ready(key, stream, list(view.echo_times_ms), view.last_image_at)
            if ended and item.verdict.final:
                assert stream.plan is not None
                if stream.next_slab == len(stream.plan.windows):
                    self._emit(
                        StreamControl(
                            key,
                            StreamAction.FINALIZE,
                            last_image_at=view.last_image_at,
                            sources=self._sources(stream, list(view.echo_times_ms)),
                        )
                    )
                else:
                    self._cancel(key, stream, "acquisition ended before every slab had its slices")
        finally:
            if ended:
                self._streams.pop(key, None)

    # ------------------------------------------------------------------------------------------ internals

    def _send_ready(self, key: str, stream: _Stream, echo_times: list[float], last_image_at: float) -> None:
        grid, plan = stream.grid, stream.plan
        assert grid is not None and plan is not None
        present = self._index(stream, grid, echo_times)
        while stream.next_slab < len(plan.windows):
            window = plan.windows[stream.next_slab]
            needed = self._needed(window, plan.n_slices, first=stream.next_slab == 0)
            if not all(k in present[e] for e in range(len(echo_times)) for k in needed):
                return
            started = time.perf_counter()
            volume = self._load(stream, grid, present, needed, len(echo_times))
            if stream.scale is None:
                assert stream.leading is not None
                stream.scale = self._scale_of(stream.leading)
                stream.leading = None
            read_s = time.perf_counter() - started
            self._emit(
                SlabRequest(
                    acquisition_id=key,
                    protocol_id=stream.protocol_id,
                    geometry=grid,
                    slab_index=window.index,
                    slab_count=len(plan.windows),
                    volume=volume,
                    scale=stream.scale,
                    inputs_complete_at=last_image_at,
                    read_s=read_s,
                )
            )
            stream.sent = True
            stream.next_slab += 1

    def _sources(self, stream: _Stream, echo_times: list[float]) -> SourceImages:
        """Each slice's image of each echo; every one is present, since every slab had its slices."""
        assert stream.grid is not None
        present = self._index(stream, stream.grid, echo_times)
        return tuple(
            tuple(present[echo][k] for echo in range(len(echo_times))) for k in range(stream.grid.shape[0])
        )

    def _needed(self, window: SlabWindow, n_slices: int, *, first: bool) -> range:
        if first:
            return range(0, max(window.needed_stop, min(self._leading, n_slices)))
        return window.needed_slices

    def _index(
        self, stream: _Stream, grid: VolumeGeometry, echo_times: list[float]
    ) -> list[dict[int, ImageRef]]:
        """Images by echo (ascending TE, the model's channel order) and slice index on the grid."""
        origin_mm = float(np.dot(grid.origin, grid.slice_direction))
        spacing = grid.spacing[0]
        present: list[dict[int, ImageRef]] = [{} for _ in echo_times]
        for ref in stream.refs:
            echo = echo_times.index(ref.echo_time_ms) if ref.echo_time_ms in echo_times else -1
            if echo < 0:
                continue
            index = round((ref.position_mm - origin_mm) / spacing)
            if 0 <= index < grid.shape[0]:
                present[echo][index] = ref
        return present

    def _load(
        self,
        stream: _Stream,
        grid: VolumeGeometry,
        present: list[dict[int, ImageRef]],
        needed: range,
        n_echoes: int,
    ) -> DeviceVolume:
        if stream.volume is None:
            stream.volume = self._new_volume(n_echoes, grid.shape)
            leading = min(self._leading, grid.shape[0])
            stream.leading = np.zeros((n_echoes, leading, *grid.shape[1:]), dtype=np.uint16)
        volume = stream.volume
        by_file: dict[Path, list[tuple[int, int, int | None]]] = defaultdict(list)
        for echo in range(n_echoes):
            for k in needed:
                if (echo, k) not in stream.loaded:
                    ref = present[echo][k]
                    by_file[ref.path].append((echo, k, ref.frame))
        for path, wanted in by_file.items():
            pixels = self._reader(path, [frame for _, _, frame in wanted])
            for (echo, k, _), image in zip(wanted, pixels, strict=True):
                volume.put(echo, k, image)
                if stream.leading is not None and k < stream.leading.shape[1]:
                    stream.leading[echo, k] = image
                stream.loaded.add((echo, k))
        return volume

    def _cancel(self, key: str, stream: _Stream, reason: str) -> None:
        logger.info(
            "acquisition %s: cancelling streamed slabs (%s)",
            key,
            reason,
            extra={"event": LogEvent.STREAM_CANCELLED, "stage": "streamer", "acquisition_id": key},
        )
        self._emit(StreamControl(key, StreamAction.CANCEL, reason=reason))
        stream.sent = False
        stream.next_slab = 0
        stream.volume = None
        stream.leading = None
        stream.loaded.clear()
        stream.scale = None


def _same_grid(a: VolumeGeometry, b: VolumeGeometry) -> bool:
    """Same shape, spacing and directions, and origins within ``SAME_GRID_TOLERANCE_MM``."""
    offset = np.asarray(a.origin, dtype=np.float64) - np.asarray(b.origin, dtype=np.float64)
    return (a.shape, a.spacing, a.row_direction, a.column_direction, a.slice_direction) == (
        b.shape,
        b.spacing,
        b.row_direction,
        b.column_direction,
        b.slice_direction,
    ) and float(np.linalg.norm(offset)) < SAME_GRID_TOLERANCE_MM
