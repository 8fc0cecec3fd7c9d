"""The subscriber library a navigation robot integrates: connect, receive, get whole sCT volumes with geometry.

    keys = curve_client(Path("server.key"), Path("robot-or1.key_secret"))  # off loopback
    with SctClient("tcp://edge-agent:5556", snapshot_endpoint="tcp://edge-agent:5557", curve=keys) as client:
        while True:
            volume = client.receive_volume(timeout_s=5.0)
            if volume is not None:
                robot.load(volume.hu, volume.geometry.affine)  # int16 HU, voxel (slice,row,col) -> LPS mm

This is the client half of the Clone pattern (ZeroMQ guide, chapter 5; docs/protocol.md is the specification):

1. subscribe to every topic first (a sequence number counts all of them, so only then does a skipped number
   mean a lost message), so nothing sent from now on is missed;
2. ask the snapshot socket for the current state: the latest finished volumes and every slab of the series in
   flight, ending with the sequence number it reflects;
3. drop broadcast messages at or below that number (the snapshot already had them), and expect the next one;
4. on a gap in the sequence numbers, or a new ``publisher_id`` (the agent restarted), throw away half-built
   volumes and ask for a snapshot again (resynchronise) instead of ever using a volume with a hole in it;
5. when nothing, not even a heartbeat, arrives for ``heartbeat_liveness`` heartbeat intervals, treat the
   publisher as lost: close both sockets, connect afresh and resynchronise.

Since schema 1.4 a slab or volume of a model with a confidence output is followed by its ``confidence`` message,
with the same sequence number; the data message's header announces it (its sha256). The client expects it next,
writes it into the volume's confidence array, and treats its absence as a loss (resynchronise). A finished volume
whose confidence was announced is handed over once the confidence has arrived, with the regions flagged.

Every payload's sha256 is checked; a message that fails is refused, counted, and shows as a gap. Slabs are
written into a full-volume array as they arrive; when the ``sct.volume`` message comes the client hands over a
:class:`ReceivedVolume` saying whether the slabs alone made the whole volume and whether they equal the volume
message byte for byte. A message is handed to the application once, whether it came live or in a snapshot.

With ``snapshot_endpoint=None`` the client only subscribes: it records gaps but cannot heal them.

One module on purpose: a robot vendor reads the reference client to implement their own, so the whole client
side of the Clone pattern (subscribe, snapshot, gap detection, resync, reconnect, reassembly) is one file.
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

from agent.publish.curve_keys import CurveClient, apply_client
from agent.publish.endpoints import default_snapshot_endpoint
from agent.publish.wire import (
    SUBSCRIBED_TOPICS,
    ConfidenceMessage,
    HeartbeatMessage,
    Message,
    SchemaVersionError,
    SlabMessage,
    SnapshotEnd,
    SnapshotError,
    StatusMessage,
    VolumeMessage,
    WireError,
    decode,
    decode_snapshot_reply,
    encode_snapshot_request,
)
from agent.records import UntrustedRegion
from agent.vocabulary import StatusKind
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

#: Volumes whose slabs are being collected at once; the oldest is forgotten beyond this (bounded memory).
MAX_ASSEMBLIES: Final = 4
#: Finished volumes kept in ``completed_volumes`` until popped; the oldest is dropped beyond this.
DEFAULT_KEEP_VOLUMES: Final = 4
#: Gaps kept in ``gaps`` (the most recent); ``gap_count`` counts them all.
MAX_GAPS_KEPT: Final = 1024
#: Heartbeat intervals without any message after which the publisher counts as lost (the zguide's liveness).
HEARTBEAT_LIVENESS: Final = 3
#: The interval assumed until the publisher states its own (in a heartbeat or a snapshot's end), s.
DEFAULT_HEARTBEAT_S: Final = 1.0
#: How long a snapshot may take before the client gives up on it and connects afresh (s).
DEFAULT_SNAPSHOT_TIMEOUT_S: Final = 10.0
#: The longest pause before asking again after the publisher refused a snapshot (busy), s.
MAX_REFUSAL_PAUSE_S: Final = 30.0
#: (publisher id, seq) pairs remembered so that a message replayed by a snapshot is not handed over twice.
MAX_DELIVERED_KEPT: Final = 8192


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
    #: The volume message came in a snapshot (the subscriber joined, or resynchronised, after it was sent).
    from_snapshot: bool = False
    #: A restarted agent sent it again from its archive; the same acquisition may have been received before.
    republished: bool = False
    #: Schema 1.4: the per-voxel confidence (read-only uint8, the geometry's shape; 255 = as typical as the
    #: model's calibration data), None when the model has no confidence output (nothing was checked).
    confidence: npt.NDArray[np.uint8] | None = None
    confidence_method: str = ""
    #: Voxels with confidence below this are untrusted (None without confidence).
    confidence_threshold: int | None = None
    #: Regions flagged (0: checked and none found; None: not checked) and the regions, largest first.
    flagged: int | None = None
    regions: tuple[UntrustedRegion, ...] = ()


class _Assembly:
    """The slabs of one volume received so far, written into a full-volume array."""

    def __init__(self, first: SlabMessage) -> None:
        self.geometry = first.geometry
        self.slab_count = first.slab_count
        self.hu = np.zeros(first.geometry.shape, dtype=np.int16)
        self.covered = np.zeros(first.geometry.shape[0], dtype=bool)
        self.indices: set[int] = set()
        #: The slabs' confidence (schema 1.4), allocated with the first confidence message.
        self.confidence: npt.NDArray[np.uint8] | None = None

    def add_confidence(self, message: ConfidenceMessage) -> None:
        if self.confidence is None:
            self.confidence = np.zeros(self.geometry.shape, dtype=np.uint8)
        self.confidence[message.start : message.start + message.size] = message.confidence

    def add(self, slab: SlabMessage) -> None:
        self.hu[slab.start : slab.start + slab.size] = slab.hu
        self.covered[slab.start : slab.start + slab.size] = True
        self.indices.add(slab.slab_index)

    def fits(self, slab: SlabMessage) -> bool:
        return slab.geometry == self.geometry and slab.slab_count == self.slab_count

    def complete(self) -> bool:
        return bool(self.covered.all()) and self.indices == set(range(self.slab_count))


class SctClient:
    """A SUB socket on the publisher's endpoint and a DEALER on its snapshot endpoint, with checking, gap
    healing, liveness and volume reassembly.

    Not thread-safe (it owns ZeroMQ sockets): use it from one thread.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        snapshot_endpoint: str | None = "",
        curve: CurveClient | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        rcvhwm: int = 0,
        keep_volumes: int = DEFAULT_KEEP_VOLUMES,
        heartbeat_liveness: int = HEARTBEAT_LIVENESS,
        snapshot_timeout_s: float = DEFAULT_SNAPSHOT_TIMEOUT_S,
        on_volume: Callable[[ReceivedVolume], None] | None = None,
    ) -> None:
        """``rcvhwm`` 0 (the default) never drops on the robot's side; a positive value bounds its memory.

        ``snapshot_endpoint`` "" (the default) is the agent's default beside ``endpoint`` (TCP port + 1, see
        agent.publish.endpoints); None subscribes only (no late-join state, gaps recorded but not healed).
        """
        if rcvhwm < 0:
            raise ValueError(f"SctClient rcvhwm: found {rcvhwm}; expected 0 (unbounded) or a positive count")
        if keep_volumes < 1:
            raise ValueError(f"SctClient keep_volumes: found {keep_volumes}; expected >= 1")
        if heartbeat_liveness < 1:
            raise ValueError(f"SctClient heartbeat_liveness: found {heartbeat_liveness}; expected >= 1")
        if not snapshot_timeout_s > 0:
            raise ValueError(f"SctClient snapshot_timeout_s: found {snapshot_timeout_s}; expected > 0 s")
        self._endpoint = endpoint
        self._snapshot_endpoint = (
            default_snapshot_endpoint(endpoint) if snapshot_endpoint == "" else snapshot_endpoint
        )
        self._curve = curve
        self._rcvhwm = rcvhwm
        self._liveness = heartbeat_liveness
        self._snapshot_timeout_s = snapshot_timeout_s
        self._own_context = context is None
        self._context: zmq.Context[zmq.Socket[bytes]] = context if context is not None else zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._dealer: zmq.Socket[bytes] | None = None
        self._on_volume = on_volume
        self._assemblies: OrderedDict[str, _Assembly] = OrderedDict()
        self._pending: deque[Message] = deque()
        #: (publisher id, seq, topic): a confidence message shares its data message's seq.
        self._delivered: OrderedDict[tuple[str, int, str], None] = OrderedDict()
        #: The confidence message the last data message announced (publisher id, seq, sha256), due next.
        self._companion_due: tuple[str, int, str] | None = None
        #: A finished volume whose confidence was announced, held until it arrives (with ``from_snapshot``).
        self._volume_held: tuple[VolumeMessage, bool] | None = None
        self._syncing = False
        self._refusals = 0
        self._sync_items = 0
        self._sync_deadline = 0.0
        self._sync_from_snapshot = False
        self._heartbeat_s = DEFAULT_HEARTBEAT_S
        self._closed = False
        #: Finished volumes, oldest first; take them with :meth:`pop_volume` (bounded by ``keep_volumes``).
        self.completed_volumes: deque[ReceivedVolume] = deque(maxlen=keep_volumes)
        #: Sequence gaps seen (the most recent ``MAX_GAPS_KEPT``).
        self.gaps: list[Gap] = []
        self.gap_count = 0
        #: Broadcast messages lost in gaps, all told (what the publisher dropped for this subscriber).
        self.missed = 0
        #: The publisher being followed and the last sequence number seen from it.
        self.publisher_id: str | None = None
        self.last_seq: int | None = None
        #: Messages refused (malformed, unknown schema, checksum mismatch) and the latest reason.
        self.rejected = 0
        self.last_error: WireError | None = None
        #: Snapshots received in full, resynchronisations asked for (gap or publisher change), and fresh
        #: connections after the publisher went quiet or a snapshot timed out.
        self.snapshots = 0
        self.resyncs = 0
        self.reconnects = 0
        self._last_received: float | None = None
        try:
            self._connect("join")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SctClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the sockets (and the context, if the client made it). Safe to call twice."""
        self._closed = True
        self._close_sockets()
        if self._own_context and not self._context.closed:
            self._context.term()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def snapshot_endpoint(self) -> str | None:
        return self._snapshot_endpoint

    @property
    def synchronised(self) -> bool:
        """A snapshot has been applied and no gap has been seen since (always True without snapshots)."""
        return not self._syncing

    @property
    def seconds_since_last_message(self) -> float | None:
        """Seconds since any message (heartbeats included) arrived; None before the first."""
        if self._last_received is None:
            return None
        return time.monotonic() - self._last_received

    # ---------------------------------------------------------------------------------------- receiving

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """The next valid message, or None after ``timeout_s`` seconds (None: wait for ever).

        Messages replayed by a snapshot come first, in their original order, then live ones. Invalid messages
        (malformed, unknown schema major, checksum mismatch) are logged, counted in ``rejected`` and skipped;
        the next valid message then shows the loss as a sequence gap, which a snapshot heals.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._pending:
                return self._pending.popleft()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            if self._syncing:
                self._step_snapshot(remaining)
            else:
                self._step_live(remaining)

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

    # ----------------------------------------------------------------------------------- connection state

    def _connect(self, reason: str) -> None:
        """SUB first, so nothing published from here on is missed; then ask for the state so far."""
        socket = self._context.socket(zmq.SUB)
        self._socket = socket
        socket.setsockopt(zmq.RCVHWM, self._rcvhwm)
        socket.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            apply_client(socket, self._curve)
        for topic in SUBSCRIBED_TOPICS:
            socket.setsockopt(zmq.SUBSCRIBE, topic)
        socket.connect(self._endpoint)
        self._last_received = None
        self._live_since = time.monotonic()
        if self._snapshot_endpoint is not None:
            self._request_snapshot(reason)

    def _request_snapshot(self, reason: str, missed: int = 0) -> None:
        """Ask for a snapshot, saying why (``wire.SNAPSHOT_REASONS``): the agent counts the reasons, and for a
        gap the messages lost, which is how IT sees a subscriber that cannot keep up."""
        if self._dealer is not None:
            # A fresh DEALER per request: a late reply to an abandoned request can never be mistaken for this one.
            self._dealer.close(linger=0)
        assert self._snapshot_endpoint is not None
        dealer = self._context.socket(zmq.DEALER)
        self._dealer = dealer
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        if self._curve is not None:
            apply_client(dealer, self._curve)
        dealer.connect(self._snapshot_endpoint)
        dealer.send_multipart(encode_snapshot_request(time.time(), reason=reason, missed=missed))
        self._syncing = True
        self._sync_items = 0
        self._sync_deadline = time.monotonic() + self._snapshot_timeout_s
        self._assemblies.clear()
        self._companion_due = None
        self._volume_held = None

    def resync(
        self, why: str = "asked by the application", *, reason: str = "application", missed: int = 0
    ) -> None:
        """Throw away half-built volumes and ask for a fresh snapshot (what a gap does); no-op without one.
        ``reason`` and ``missed`` go to the agent with the request (see :meth:`_request_snapshot`)."""
        if self._snapshot_endpoint is None:
            return
        self.resyncs += 1
        logger.warning("resynchronising from %s: %s", self._snapshot_endpoint, why)
        self._request_snapshot(reason, missed)

    def _reconnect(self, why: str) -> None:
        self.reconnects += 1
        logger.warning("reconnecting to %s: %s", self._endpoint, why)
        self._close_sockets()
        self._connect("reconnect")

    def _close_sockets(self) -> None:
        for socket in (self._socket, self._dealer):
            if socket is not None:
                socket.close(linger=0)
        self._socket = self._dealer = None

    def _require(self, socket: zmq.Socket[bytes] | None) -> zmq.Socket[bytes]:
        if socket is None or self._closed:
            raise RuntimeError(f"SctClient on {self._endpoint} is closed")
        return socket

    # ------------------------------------------------------------------------------------------ internals

    def _step_snapshot(self, remaining: float | None) -> None:
        dealer = self._require(self._dealer)
        now = time.monotonic()
        wait = self._sync_deadline - now if remaining is None else min(remaining, self._sync_deadline - now)
        if wait <= 0 or not dealer.poll(max(0, round(wait * 1000))):
            if time.monotonic() >= self._sync_deadline:
                self._reconnect(f"no complete snapshot within {self._snapshot_timeout_s} s")
            return
        frames = dealer.recv_multipart(copy=False)
        try:
            reply = decode_snapshot_reply(frames)
        except WireError as error:
            self._refuse(error, "snapshot")
            if isinstance(error, SchemaVersionError):
                raise
            self.resync(f"unusable snapshot message ({error.attribute})", reason="incomplete")
            return
        if isinstance(reply, SnapshotError):
            # Busy or refused: connect afresh after a pause that grows with each refusal in a row (capped), so
            # that many robots retrying do not keep a busy agent busy.
            self._refusals += 1
            pause = min(MAX_REFUSAL_PAUSE_S, self._heartbeat_s * 2 ** (self._refusals - 1))
            logger.warning(
                "snapshot refused by the publisher (%s); asking again in %.1f s", reply.error, pause
            )
            self._sync_deadline = min(self._sync_deadline, time.monotonic() + pause)
            return
        if isinstance(reply, SnapshotEnd):
            self._snapshot_ended(reply)
            return
        self._sync_items += 1
        if not self._companion_in_order(reply):
            self.resync("snapshot lost an announced confidence message", reason="incomplete")
            return
        self._accept(reply, from_snapshot=True)

    def _snapshot_ended(self, reply: SnapshotEnd) -> None:
        if self._companion_due is not None:
            # The reply's last data message announced a confidence message that never came.
            self.resync("snapshot ended before an announced confidence message", reason="incomplete")
            return
        if reply.items != self._sync_items:
            # A message of the reply was lost or refused: this state has a hole in it.
            self.resync(
                f"snapshot announced {reply.items} message(s), {self._sync_items} arrived intact",
                reason="incomplete",
            )
            return
        self._syncing = False
        self._refusals = 0
        self.snapshots += 1
        if reply.publisher_id != self.publisher_id and self.publisher_id is not None:
            logger.info("publisher changed from %s to %s", self.publisher_id, reply.publisher_id)
        self.publisher_id = reply.publisher_id
        self.last_seq = reply.seq
        self._heartbeat_s = reply.heartbeat_s
        logger.info("snapshot applied: %d message(s), up to seq %d", reply.items, reply.seq)

    def _step_live(self, remaining: float | None) -> None:
        socket = self._require(self._socket)
        silent_s = self._liveness * self._heartbeat_s
        quiet_since = self._last_received if self._last_received is not None else self._live_since
        until_lost = max(0.0, quiet_since + silent_s - time.monotonic())
        wait = until_lost if remaining is None else min(remaining, until_lost)
        # Poll even when the deadline has passed: an application that did not call receive for a while finds
        # the messages queued meanwhile, and only an empty queue after the liveness window means a lost link.
        if not socket.poll(round(wait * 1000)):
            if quiet_since + silent_s <= time.monotonic():
                self._reconnect(
                    f"nothing received for {silent_s:.1f} s ({self._liveness} heartbeat intervals)"
                )
            return
        frames = socket.recv_multipart(copy=False)
        self._last_received = time.monotonic()
        try:
            message = decode(frames)
        except WireError as error:
            self._refuse(error, "broadcast")
            if isinstance(error, SchemaVersionError):
                raise
            return
        if isinstance(message, HeartbeatMessage) and message.heartbeat_s is not None:
            self._heartbeat_s = message.heartbeat_s
        if isinstance(message, ConfidenceMessage):
            self._live_companion(message)
            return
        if self._companion_due is not None:
            # Another message came where the announced confidence message was due: it was lost.
            _, seq, _ = self._companion_due
            self._companion_due = None
            self._record_gap(Gap(expected=seq, got=seq + 1), what="confidence message")
            self._volume_held = None
            self.resync(f"confidence message of seq {seq} lost", reason="gap", missed=1)
            if self._snapshot_endpoint is not None:
                return
        if self._snapshot_endpoint is None:
            self._track_without_snapshots(message)
            self._accept(message, from_snapshot=False)
        elif self._in_sequence(message):
            self._accept(message, from_snapshot=False)

    def _live_companion(self, message: ConfidenceMessage) -> None:
        """A confidence message on the SUB socket: applied when it is the one due, dropped otherwise (its data
        message was before the snapshot, or was itself lost and will come back with it from a snapshot)."""
        due = self._companion_due
        if due is not None and due == (message.publisher_id, message.seq, message.sha256):
            self._companion_due = None
            self._accept(message, from_snapshot=False)

    def _companion_in_order(self, message: Message) -> bool:
        """In a snapshot reply: False when a confidence message was due and something else came."""
        due = self._companion_due
        if isinstance(message, ConfidenceMessage):
            if due != (message.publisher_id, message.seq, message.sha256):
                return False
            self._companion_due = None
            return True
        return due is None

    def _in_sequence(self, message: Message) -> bool:
        """True for the next message after the snapshot's number; anything else is dropped or resyncs."""
        if message.publisher_id != self.publisher_id:
            self.resync(
                f"publisher changed from {self.publisher_id} to {message.publisher_id}",
                reason="publisher_changed",
            )
            return False
        assert self.last_seq is not None
        if message.seq <= self.last_seq:
            return False  # the snapshot already reflected it
        if message.seq != self.last_seq + 1:
            gap = Gap(expected=self.last_seq + 1, got=message.seq)
            self._record_gap(gap)
            self.resync(
                f"sequence gap: expected {gap.expected}, got {gap.got}",
                reason="gap",
                missed=gap.got - gap.expected,
            )
            return False
        self.last_seq = message.seq
        return True

    def _refuse(self, error: WireError, where: str) -> None:
        self.rejected += 1
        self.last_error = error
        logger.warning("rejected a %s message from %s: %s", where, self._endpoint, error)

    def _track_without_snapshots(self, message: Message) -> None:
        if message.publisher_id != self.publisher_id:
            if self.publisher_id is not None:
                logger.info("publisher changed from %s to %s", self.publisher_id, message.publisher_id)
            # A new publisher (or a restart): what it sends starts a new count, and half-built volumes of the
            # old one will never be finished.
            self.publisher_id = message.publisher_id
            self._assemblies.clear()
        elif self.last_seq is not None and message.seq != self.last_seq + 1:
            self._record_gap(Gap(expected=self.last_seq + 1, got=message.seq))
        self.last_seq = message.seq

    def _record_gap(self, gap: Gap, *, what: str = "") -> None:
        self.gap_count += 1
        self.missed += max(0, gap.got - gap.expected)
        self.gaps.append(gap)
        del self.gaps[:-MAX_GAPS_KEPT]
        if what:
            logger.warning("%s lost from %s: seq %d", what, self.publisher_id, gap.expected)
        else:
            logger.warning("sequence gap from %s: expected %d, got %d", self.publisher_id, *gap)

    def _accept(self, message: Message, *, from_snapshot: bool) -> None:
        """Apply a message to the volumes being built and hand it over, unless it was handed over before."""
        topic = type(message).__name__
        key = (message.publisher_id, message.seq, topic)
        first_time = key not in self._delivered
        if isinstance(message, SlabMessage | VolumeMessage) and message.confidence_sha256 is not None:
            self._companion_due = (message.publisher_id, message.seq, message.confidence_sha256)
        if isinstance(message, VolumeMessage) and message.confidence_sha256 is not None:
            # Handed over with its confidence, which comes next; a loss on the way brings both back again.
            self._volume_held = (message, from_snapshot)
            return
        if isinstance(message, ConfidenceMessage):
            if message.is_volume:
                self._finish_held(message)
            else:
                assembly = self._assemblies.get(message.acquisition_id)
                if assembly is not None and assembly.geometry == message.geometry:
                    assembly.add_confidence(message)
        if isinstance(message, SlabMessage):
            self._add_slab(message)
        elif (
            isinstance(message, StatusMessage)
            and message.kind == StatusKind.CANCELLED
            and message.acquisition_id
        ):
            # The agent abandoned this stream; its slabs will never make a volume.
            self._assemblies.pop(message.acquisition_id, None)
        elif isinstance(message, VolumeMessage):
            if first_time:
                self._finish(message, from_snapshot=from_snapshot)
            else:
                self._assemblies.pop(message.acquisition_id, None)
        self._hand_over(message, key, first_time)

    def _hand_over(self, message: Message, key: tuple[str, int, str], first_time: bool) -> None:
        if not first_time:
            return
        self._delivered[key] = None
        while len(self._delivered) > MAX_DELIVERED_KEPT:
            self._delivered.popitem(last=False)
        self._pending.append(message)

    def _finish_held(self, confidence: ConfidenceMessage) -> None:
        """The volume held for its confidence is finished with it, and both are handed over."""
        held, self._volume_held = self._volume_held, None
        if held is None or (held[0].publisher_id, held[0].seq) != (confidence.publisher_id, confidence.seq):
            return
        volume, from_snapshot = held
        key = (volume.publisher_id, volume.seq, type(volume).__name__)
        first_time = key not in self._delivered
        if first_time:
            self._finish(volume, from_snapshot=from_snapshot, confidence=confidence)
        else:
            self._assemblies.pop(volume.acquisition_id, None)
        self._hand_over(volume, key, first_time)

    def _add_slab(self, slab: SlabMessage) -> None:
        assembly = self._assemblies.get(slab.acquisition_id)
        if assembly is None or not assembly.fits(slab):
            assembly = _Assembly(slab)
            self._assemblies[slab.acquisition_id] = assembly
            while len(self._assemblies) > MAX_ASSEMBLIES:
                self._assemblies.popitem(last=False)
        self._assemblies.move_to_end(slab.acquisition_id)
        assembly.add(slab)

    def _finish(
        self, volume: VolumeMessage, *, from_snapshot: bool, confidence: ConfidenceMessage | None = None
    ) -> None:
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
            from_snapshot=from_snapshot,
            republished=volume.republished,
            confidence=None if confidence is None else confidence.confidence,
            confidence_method="" if confidence is None else confidence.method,
            confidence_threshold=None if confidence is None else confidence.threshold,
            flagged=None if confidence is None else confidence.flagged,
            regions=() if confidence is None else confidence.regions,
        )
        self.completed_volumes.append(received)
        if self._on_volume is not None:
            self._on_volume(received)
