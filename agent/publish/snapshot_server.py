"""Serving snapshots on the ROUTER socket, without ever letting one subscriber stall the publisher thread.

A request is answered from the :class:`~agent.publish.snapshot_store.SnapshotStore` as it is at that instant, followed
by ``snapshot.end`` carrying the publisher's current sequence number: every message up to that number is
either in the reply or no longer needed (superseded by a volume, or cancelled). Because the store and the
sequence counter belong to the publisher thread, nothing can slip between the two.

The reply is queued as a *session* and pushed with ``ROUTER_MANDATORY`` and ``NOBLOCK``: a peer whose pipe is
full (``zmq.Again``) keeps its place and is retried on the next turn of the loop; a peer that went away
(``EHOSTUNREACH``) or made no progress for ``stall_s`` is dropped. Every request that gets no complete
snapshot is reported to ``on_refused`` with a bounded reason: "busy" and "malformed" when refused, "stalled"
and "gone" when its reply was abandoned. Payload frames are the stored buffers, sent
zero-copy, so a session costs headers, not volumes.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import zmq

from agent.publish.snapshot_store import Frames, SnapshotStore
from agent.publish.wire import (
    CONFIDENCE_MINOR,
    WireError,
    decode_snapshot_request,
    encode_snapshot_end,
    encode_snapshot_error,
    schema_minor,
)

logger = logging.getLogger(__name__)

#: Snapshot replies in progress at once; a request beyond this is refused with ``snapshot.error``.
MAX_SESSIONS: Final = 16
#: A session that cannot send anything for this long is abandoned (the subscriber will ask again).
STALL_S: Final = 30.0
#: How soon the publisher loop comes back to a session whose peer's pipe was full (s).
RETRY_S: Final = 0.01


@dataclass(slots=True)
class _Session:
    pending: deque[Frames]
    items: int
    nbytes: int
    refusal: bool = False
    last_progress: float = field(default_factory=time.monotonic)


class SnapshotServer:
    """Owned by the publisher thread, like the socket it is handed."""

    def __init__(
        self,
        store: SnapshotStore,
        publisher_id: str,
        heartbeat_s: float,
        *,
        max_sessions: int = MAX_SESSIONS,
        stall_s: float = STALL_S,
        on_served: Callable[[int, int], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        on_requested: Callable[[str, int], None] | None = None,
    ) -> None:
        """``on_requested(reason, missed)`` is told why each well-formed request came (the subscriber's word:
        "" when it did not say), and for a gap how many broadcast messages it lost."""
        self._store = store
        self._publisher_id = publisher_id
        self._heartbeat_s = heartbeat_s
        self._max_sessions = max_sessions
        self._stall_s = stall_s
        self._on_served = on_served
        self._on_refused = on_refused
        self._on_requested = on_requested
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()

    @property
    def busy(self) -> bool:
        """Sessions are waiting to send: the loop must come back within :data:`RETRY_S`."""
        return bool(self._sessions)

    def on_request(self, frames: list[bytes], current_seq: int) -> None:
        """Queue the reply to one request (``frames[0]`` is the ROUTER's peer identity)."""
        identity, body = frames[0], frames[1:]
        now = time.time()
        try:
            request = decode_snapshot_request(body)
        except WireError as error:
            self._refuse(identity, current_seq, f"bad snapshot request: {error}", "malformed")
            return
        if self._on_requested is not None:
            self._on_requested(request.reason, request.missed)
        if identity not in self._sessions and len(self._sessions) >= self._max_sessions:
            self._refuse(identity, current_seq, f"busy: {self._max_sessions} snapshots in progress", "busy")
            return
        stored = self._store.messages()
        # Confidence companions only to a client of 1.4 or later: an older one refuses the unknown topic, and
        # would then find its reply short of ``items`` and ask again for ever.
        confidence = schema_minor(request.schema) >= CONFIDENCE_MINOR
        pending: deque[Frames] = deque(frames for m in stored for frames in m.replay(confidence=confidence))
        items = len(pending)
        pending.append(
            list(
                encode_snapshot_end(
                    current_seq, self._publisher_id, now, items=items, heartbeat_s=self._heartbeat_s
                )
            )
        )
        nbytes = sum(m.nbytes + (m.companion_nbytes if confidence else 0) for m in stored)
        # A repeated request from the same peer replaces its unfinished reply: it has given up on that one.
        self._sessions.pop(identity, None)
        self._sessions[identity] = _Session(pending, items, nbytes)

    def pump(self, socket: zmq.Socket[bytes]) -> None:
        """Send what every session's peer can take now; drop finished, vanished and stalled sessions."""
        now = time.monotonic()
        for identity in list(self._sessions):
            session = self._sessions[identity]
            outcome = self._send_some(socket, identity, session)
            if outcome == "done":
                del self._sessions[identity]
                if session.refusal:
                    continue
                if self._on_served is not None:
                    self._on_served(session.items, session.nbytes)
            elif outcome == "gone":
                del self._sessions[identity]
                logger.info("snapshot peer went away before its reply was sent")
                self._report("gone")
            elif now - session.last_progress > self._stall_s:
                del self._sessions[identity]
                logger.warning("snapshot peer took nothing for %.0f s; reply abandoned", self._stall_s)
                self._report("stalled")

    def _send_some(self, socket: zmq.Socket[bytes], identity: bytes, session: _Session) -> str:
        while session.pending:
            try:
                socket.send_multipart([identity, *session.pending[0]], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return "wait"
            except zmq.ZMQError as error:
                if error.errno == errno.EHOSTUNREACH:
                    return "gone"
                raise
            session.pending.popleft()
            session.last_progress = time.monotonic()
        return "done"

    def _report(self, label: str) -> None:
        if self._on_refused is not None:
            self._on_refused(label)

    def _refuse(self, identity: bytes, current_seq: int, error: str, label: str) -> None:
        logger.warning("snapshot request refused: %s", error)
        self._report(label)
        reply = encode_snapshot_error(current_seq, self._publisher_id, time.time(), error)
        self._sessions.pop(identity, None)
        self._sessions[identity] = _Session(deque([list(reply)]), 0, 0, refusal=True)
