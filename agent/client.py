"""The subscriber library a navigation robot integrates: connect, receive, get whole sCT volumes with geometry.

    with SctClient("tcp://edge-agent:5556") as client:
        while True:
            volume = client.receive_volume(timeout_s=5.0)
            if volume is not None:
                robot.load(volume.hu, volume.geometry.affine)  # int16 HU, voxel (slice,row,col) -> LPS mm

The client subscribes to every topic (a sequence number counts all of them, so only then does a skipped number
mean a lost message), checks every payload's sha256, records sequence gaps, and rebuilds each volume from its
slabs as they arrive. When the ``sct.volume`` message comes it hands over a :class:`ReceivedVolume` saying
whether the slabs alone made the whole volume and whether they equal the volume message byte for byte. The
volume message is what a late joiner or a subscriber that lost slabs relies on; the snapshot protocol of
DESIGN.md §5 will add resynchronisation for the rest.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt
import zmq

from agent.wire import ALL_TOPICS, Message, SlabMessage, VolumeMessage, WireError, decode
from engines.phantom.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

#: Volumes whose slabs are being collected at once; the oldest is forgotten beyond this (bounded memory).
MAX_ASSEMBLIES: Final = 4
#: Finished volumes kept in ``completed_volumes`` until popped; the oldest is dropped beyond this.
DEFAULT_KEEP_VOLUMES: Final = 4
#: Gaps kept in ``gaps`` (the most recent); ``gap_count`` counts them all.
MAX_GAPS_KEPT: Final = 1024


class Gap(NamedTuple):
    """Sequence numbers ``expected`` up to ``got - 1`` never arrived (``got < expected``: out of order)."""

    expected: int
    got: int


@dataclass(frozen=True, slots=True, eq=False)
class ReceivedVolume:
    """A finished synthetic CT volume as the robot gets it.

    ``hu`` is the volume message's payload (read-only int16 HU, ``[slice, row, column]``); ``geometry.affine``
    maps voxel indices to DICOM LPS mm. ``complete_from_slabs`` says every slab arrived and together they
    covered the volume; ``matches_volume_message`` says that assembly equals the volume message byte for byte
    (always False when slabs were missed: there was nothing whole to compare).
    """

    acquisition_id: str
    hu: npt.NDArray[np.int16]
    geometry: VolumeGeometry
    model_id: str
    model_version: str
    protocol_id: str
    sha256: str
    slab_count: int
    slabs_received: int
    complete_from_slabs: bool
    matches_volume_message: bool
    publisher_id: str
    seq: int
    received_at: float


class _Assembly:
    """The slabs of one volume received so far, written into a full-volume array."""

    def __init__(self, first: SlabMessage) -> None:
        self.geometry = first.geometry
        self.slab_count = first.slab_count
        self.hu = np.zeros(first.geometry.shape, dtype=np.int16)
        self.covered = np.zeros(first.geometry.shape[0], dtype=bool)
        self.indices: set[int] = set()

    def add(self, slab: SlabMessage) -> None:
        self.hu[slab.start : slab.start + slab.size] = slab.hu
        self.covered[slab.start : slab.start + slab.size] = True
        self.indices.add(slab.slab_index)

    def fits(self, slab: SlabMessage) -> bool:
        return slab.geometry == self.geometry and slab.slab_count == self.slab_count

    def complete(self) -> bool:
        return bool(self.covered.all()) and self.indices == set(range(self.slab_count))


class SctClient:
    """A SUB socket on the publisher's endpoint, with checking, gap tracking and volume reassembly.

    Not thread-safe (it owns a ZeroMQ socket): use it from one thread.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        rcvhwm: int = 0,
        keep_volumes: int = DEFAULT_KEEP_VOLUMES,
        on_volume: Callable[[ReceivedVolume], None] | None = None,
    ) -> None:
        """``rcvhwm`` 0 (the default) never drops on the robot's side; a positive value bounds its memory."""
        if rcvhwm < 0:
            raise ValueError(f"SctClient rcvhwm: found {rcvhwm}; expected 0 (unbounded) or a positive count")
        if keep_volumes < 1:
            raise ValueError(f"SctClient keep_volumes: found {keep_volumes}; expected >= 1")
        self._endpoint = endpoint
        self._own_context = context is None
        self._context: zmq.Context[zmq.Socket[bytes]] = context if context is not None else zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        try:
            socket = self._context.socket(zmq.SUB)
            socket.setsockopt(zmq.RCVHWM, rcvhwm)
            socket.setsockopt(zmq.LINGER, 0)
            for topic in ALL_TOPICS:
                socket.setsockopt(zmq.SUBSCRIBE, topic)
            self._socket = socket
            socket.connect(endpoint)
        except BaseException:
            self.close()
            raise
        self._on_volume = on_volume
        self._assemblies: OrderedDict[str, _Assembly] = OrderedDict()
        #: Finished volumes, oldest first; take them with :meth:`pop_volume` (bounded by ``keep_volumes``).
        self.completed_volumes: deque[ReceivedVolume] = deque(maxlen=keep_volumes)
        #: Sequence gaps seen (the most recent ``MAX_GAPS_KEPT``).
        self.gaps: list[Gap] = []
        self.gap_count = 0
        #: The publisher being followed and the last sequence number seen from it.
        self.publisher_id: str | None = None
        self.last_seq: int | None = None
        #: Messages refused (malformed, unknown schema, checksum mismatch) and the latest reason.
        self.rejected = 0
        self.last_error: WireError | None = None
        self._last_received: float | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SctClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (and the context, if the client made it). Safe to call twice."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._own_context and not self._context.closed:
            self._context.term()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def seconds_since_last_message(self) -> float | None:
        """Seconds since any message (heartbeats included) arrived; None before the first."""
        if self._last_received is None:
            return None
        return time.monotonic() - self._last_received

    # ---------------------------------------------------------------------------------------- receiving

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """The next valid message, or None after ``timeout_s`` seconds (None: wait for ever).

        Invalid messages (malformed, unknown schema major, checksum mismatch) are logged, counted in
        ``rejected`` and skipped; the next valid message then shows the loss as a sequence gap.
        """
        socket = self._require_socket()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_ms = None if deadline is None else max(0, round((deadline - time.monotonic()) * 1000))
            if not socket.poll(wait_ms):
                return None
            frames = socket.recv_multipart(copy=False)
            self._last_received = time.monotonic()
            try:
                message = decode(frames)
            except WireError as error:
                self.rejected += 1
                self.last_error = error
                logger.warning("rejected a message from %s: %s", self._endpoint, error)
                continue
            self._track(message)
            if isinstance(message, SlabMessage):
                self._add_slab(message)
            elif isinstance(message, VolumeMessage):
                self._finish(message)
            return message

    def wait_for(self, predicate: Callable[[Message], bool], timeout_s: float) -> Message | None:
        """Receive until a message satisfies ``predicate``; None if none does within ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and predicate(message):
                return message
        return None

    def receive_volume(self, timeout_s: float) -> ReceivedVolume | None:
        """Receive until a volume is finished; None if none is within ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while not self.completed_volumes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.receive(remaining) is None:
                break
        return self.pop_volume()

    def pop_volume(self) -> ReceivedVolume | None:
        """The oldest finished volume not yet taken, or None."""
        return self.completed_volumes.popleft() if self.completed_volumes else None

    # ------------------------------------------------------------------------------------------ internals

    def _require_socket(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            raise RuntimeError(f"SctClient on {self._endpoint} is closed")
        return self._socket

    def _track(self, message: Message) -> None:
        if message.publisher_id != self.publisher_id:
            if self.publisher_id is not None:
                logger.info("publisher changed from %s to %s", self.publisher_id, message.publisher_id)
            # A new publisher (or a restart): what it sends starts a new count, and half-built volumes of the
            # old one will never be finished.
            self.publisher_id = message.publisher_id
            self._assemblies.clear()
        elif self.last_seq is not None and message.seq != self.last_seq + 1:
            gap = Gap(expected=self.last_seq + 1, got=message.seq)
            self.gap_count += 1
            self.gaps.append(gap)
            del self.gaps[:-MAX_GAPS_KEPT]
            logger.warning("sequence gap from %s: expected %d, got %d", self.publisher_id, *gap)
        self.last_seq = message.seq

    def _add_slab(self, slab: SlabMessage) -> None:
        assembly = self._assemblies.get(slab.acquisition_id)
        if assembly is None or not assembly.fits(slab):
            assembly = _Assembly(slab)
            self._assemblies[slab.acquisition_id] = assembly
            while len(self._assemblies) > MAX_ASSEMBLIES:
                self._assemblies.popitem(last=False)
        self._assemblies.move_to_end(slab.acquisition_id)
        assembly.add(slab)

    def _finish(self, volume: VolumeMessage) -> None:
        assembly = self._assemblies.pop(volume.acquisition_id, None)
        complete = (
            assembly is not None
            and assembly.geometry == volume.geometry
            and assembly.slab_count == volume.stitched_from_slabs
            and assembly.complete()
        )
        matches = complete and assembly is not None and np.array_equal(assembly.hu, volume.hu)
        if complete and not matches:
            logger.error(
                "volume %s: slabs and volume message differ; using the volume message", volume.acquisition_id
            )
        received = ReceivedVolume(
            acquisition_id=volume.acquisition_id,
            hu=volume.hu,
            geometry=volume.geometry,
            model_id=volume.model_id,
            model_version=volume.model_version,
            protocol_id=volume.protocol_id,
            sha256=volume.sha256,
            slab_count=volume.stitched_from_slabs,
            slabs_received=0 if assembly is None else len(assembly.indices),
            complete_from_slabs=complete,
            matches_volume_message=matches,
            publisher_id=volume.publisher_id,
            seq=volume.seq,
            received_at=time.time(),
        )
        self.completed_volumes.append(received)
        if self._on_volume is not None:
            self._on_volume(received)
