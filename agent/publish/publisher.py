"""The publisher stage: one thread owns the ZeroMQ PUB and snapshot sockets and sends what the pipeline submits.

ZeroMQ sockets are not thread-safe, so only this stage's thread creates, binds, uses and closes the socket
(and its monitor); other threads talk to it through a bounded queue. ``submit`` blocks while that queue is
full: that is the pipeline's back-pressure (docs/architecture.md). The thread itself never waits on the
network: a PUB socket drops a message for a subscriber whose queue (``send_hwm`` messages) is full and keeps
serving the others, so a slow or dead robot can never stall the pipeline. Such a subscriber sees a gap in the
sequence numbers (see ``agent/publish/wire.py``) and must resynchronise.

libzmq's PUB socket drops silently: ``dropped`` counts only sends the socket refused outright (``zmq.Again``),
which for PUB is rare; per-subscriber losses are visible to subscribers, through sequence gaps, and come back
here when such a subscriber asks for a snapshot saying ``reason`` "gap" and how many messages it ``missed``
(``on_snapshot_request``).

Payload frames are sent with ``copy=False``: libzmq reads the record's array in place and the publisher keeps a
reference until it is sent, so a volume is never copied on its way out.

Beside the PUB socket the thread serves the Clone pattern's snapshots on a ROUTER socket (``snapshot_endpoint``;
see agent/publish/snapshot_server.py) from a :class:`~agent.publish.snapshot_store.SnapshotStore` it keeps as it publishes. It
sleeps in one ``zmq.Poller`` over the ROUTER socket, both socket monitors and a wake-up pipe that ``submit``
writes to, so a submitted slab goes out at once and nothing is polled on a timer.

With ``curve`` set both sockets are CURVE servers: traffic is encrypted and a ZAP handler (pyzmq's
``ThreadAuthenticator`` on this context) admits only the public keys in the allow-list folder. A peer that fails
the handshake (no key, wrong key, not on the list) gets nothing; the monitors report it and ``on_rejected``
counts it.

One module on purpose: ZeroMQ sockets belong to the thread that made them, and this module is that thread's
whole life (bind, CURVE and ZAP, monitors, the poller, sending, snapshots, closing); split, the question "which
thread may touch this socket?" would need answering across files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from agent.publish.curve_keys import CurveServer, apply_server
from agent.publish.snapshot_server import RETRY_S, SnapshotServer
from agent.publish.snapshot_store import SnapshotStore
from agent.publish.wire import (
    TOPIC_CONFIDENCE,
    TOPIC_SLAB,
    TOPIC_STATUS,
    TOPIC_VOLUME,
    encode,
    encode_confidence,
    encode_heartbeat,
)
from agent.records import Publication, SctSlab, SctVolume
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

#: How long ``stop`` lets queued messages drain to connected subscribers after the last send (ms).
STOP_LINGER_MS: Final = 500
#: The ZAP domain both sockets authenticate in; the ZAP handler admits allow-listed keys for this domain only.
ZAP_DOMAIN: Final = b"sct-edge"
#: Finished volumes a snapshot replays by default.
DEFAULT_SNAPSHOT_VOLUMES: Final = 2
#: Messages queued per snapshot peer before ROUTER says "try later"; payloads are shared, not copied.
SNAPSHOT_HWM: Final = 1000
#: How long ``start`` waits for the thread to report that it bound the socket (s).
START_TIMEOUT_S: Final = 10.0
#: Monitor events: subscribers coming and going, and peers failing the security handshake.
_HANDSHAKE_FAILURES: Final[dict[int, str]] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake",
}
_MONITOR_EVENTS: Final = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
#: Bytes of random publisher id: a restart is recognisable because the id changes.
PUBLISHER_ID_BYTES: Final = 8


class PublishError(SctError, RuntimeError):
    """The publisher cannot do what was asked: bind its endpoint, accept an item, or stop in time."""

    def __init__(self, message: str, *, endpoint: str, found: object = None, expected: str = "") -> None:
        super().__init__(message, attribute=f"publisher {endpoint}", found=found, expected=expected)
        self.endpoint = endpoint


@dataclass(frozen=True, slots=True)
class _Stop:
    """Queued by ``stop`` behind everything already submitted."""


_STOP: Final = _Stop()


class Publisher:
    """Publishes status events, sCT slabs and volumes on a PUB socket, with heartbeats when idle, and serves
    snapshots on a ROUTER socket.

    ``on_sent(item, seq, sent_at)``, ``on_subscribers(count)``, ``on_rejected(socket, reason)``,
    ``on_snapshot(items, nbytes)``, ``on_snapshot_failed(reason)`` and ``on_snapshot_request(reason, missed)`` run on
    the publisher thread; they must be quick and must not call back into
    the publisher. Their exceptions are logged and counted in ``errors``.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        snapshot_endpoint: str | None = None,
        snapshot_volumes: int = DEFAULT_SNAPSHOT_VOLUMES,
        curve: CurveServer | None = None,
        heartbeat_s: float = 1.0,
        send_hwm: int = 32,
        queue_depth: int = 64,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        on_sent: Callable[[Publication, int, float], None] | None = None,
        on_subscribers: Callable[[int], None] | None = None,
        on_dropped: Callable[[str], None] | None = None,
        on_rejected: Callable[[str, str], None] | None = None,
        on_snapshot: Callable[[int, int], None] | None = None,
        on_snapshot_failed: Callable[[str], None] | None = None,
        on_snapshot_request: Callable[[str, int], None] | None = None,
    ) -> None:
        if not heartbeat_s > 0:
            raise ValueError(
                f"Publisher heartbeat_s: found {heartbeat_s}; expected a positive number of seconds"
            )
        if send_hwm < 1:
            raise ValueError(f"Publisher send_hwm: found {send_hwm}; expected >= 1 message per subscriber")
        if queue_depth < 1:
            raise ValueError(f"Publisher queue_depth: found {queue_depth}; expected >= 1")
        self._requested_endpoint = endpoint
        self._requested_snapshot = snapshot_endpoint
        self._curve = curve
        self._store = SnapshotStore(snapshot_volumes)
        self._heartbeat_s = heartbeat_s
        self._send_hwm = send_hwm
        self._given_context = context
        self._on_sent = on_sent
        self._on_subscribers = on_subscribers
        self._on_dropped = on_dropped
        self._on_rejected = on_rejected
        self._on_snapshot = on_snapshot
        self._on_snapshot_failed = on_snapshot_failed
        self._on_snapshot_request = on_snapshot_request
        self._queue: queue.Queue[Publication | _Stop] = queue.Queue(maxsize=queue_depth)
        self._submit_lock = threading.Lock()
        self._accepting = False
        self._stop_queued = False
        self._started = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sct-publisher", daemon=True)
        self._bound_endpoint: str | None = None
        self._bound_snapshot: str | None = None
        self._last_send = time.monotonic()
        #: ``submit`` writes a byte here so the thread, asleep in its poller, wakes for the new item at once.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        #: Random per publisher start; subscribers see a new id after a restart and count afresh.
        self.publisher_id = secrets.token_hex(PUBLISHER_ID_BYTES)
        self._snapshots = SnapshotServer(
            self._store,
            self.publisher_id,
            heartbeat_s,
            on_served=self._snapshot_served,
            on_refused=self._snapshot_failed,
            on_requested=self._snapshot_requested,
        )
        self._rejected = 0
        self._seq = 0
        self._dropped = 0
        self._errors = 0
        self._heartbeats = 0
        self._subscribers = 0

    # ----------------------------------------------------------------------------------------- public API

    @property
    def endpoint(self) -> str:
        """The endpoint actually bound (``tcp://127.0.0.1:0`` becomes the port the system chose)."""
        if self._bound_endpoint is None:
            raise PublishError(
                f"publisher on {self._requested_endpoint} is not bound yet; call start() first",
                endpoint=self._requested_endpoint,
            )
        return self._bound_endpoint

    @property
    def snapshot_endpoint(self) -> str | None:
        """The snapshot endpoint actually bound; None when the publisher serves no snapshots."""
        return self._bound_snapshot

    @property
    def secure(self) -> bool:
        """Both sockets are CURVE servers with a ZAP allow-list."""
        return self._curve is not None

    @property
    def rejected(self) -> int:
        """Peers that failed the security handshake (no key, wrong key, not on the allow-list)."""
        return self._rejected

    @property
    def store(self) -> SnapshotStore:
        """The snapshot state (read it only while the publisher is stopped, or for rough monitoring)."""
        return self._store

    @property
    def sequence(self) -> int:
        """The sequence number of the last message sent (heartbeats included); 0 before the first."""
        return self._seq

    @property
    def dropped(self) -> int:
        """Messages the socket refused (``zmq.Again``) or could not send; their sequence numbers are skipped."""
        return self._dropped

    @property
    def errors(self) -> int:
        """Exceptions caught on the publisher thread (encoding, sending, callbacks)."""
        return self._errors

    @property
    def heartbeats(self) -> int:
        """Heartbeats sent."""
        return self._heartbeats

    @property
    def subscribers(self) -> int:
        """Subscribers connected, as the socket monitor last reported."""
        return self._subscribers

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the thread and wait until it has bound the socket; raise :class:`PublishError` if it cannot."""
        if self._started:
            raise PublishError(
                f"publisher on {self._requested_endpoint} was already started; make a new one",
                endpoint=self._requested_endpoint,
            )
        self._started = True
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise PublishError(
                f"publisher did not bind {self._requested_endpoint} within {START_TIMEOUT_S} s",
                endpoint=self._requested_endpoint,
            )
        if self._start_error is not None:
            self._thread.join()
            raise PublishError(
                f"cannot bind publisher to {self._requested_endpoint}: {self._start_error}",
                endpoint=self._requested_endpoint,
            ) from self._start_error
        with self._submit_lock:
            self._accepting = True

    def submit(self, item: Publication, timeout: float | None = None) -> None:
        """Queue ``item`` for sending, waiting while the queue is full (back-pressure). Thread-safe.

        Raises :class:`PublishError` if the publisher is not running, or if ``timeout`` seconds pass with the
        queue still full.
        """
        with self._submit_lock:
            if not self._accepting:
                raise PublishError(
                    f"publisher on {self._requested_endpoint} is not running; cannot submit "
                    f"{type(item).__name__}",
                    endpoint=self._requested_endpoint,
                )
            try:
                self._queue.put(item, timeout=timeout)
            except queue.Full:
                raise PublishError(
                    f"publisher queue ({self._queue.maxsize} items) still full after {timeout} s",
                    endpoint=self._requested_endpoint,
                ) from None
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe already holds unread wake-ups: the thread will wake anyway
        except OSError as error:
            logger.debug("publisher wake-up pipe closed: %s", error)

    def stop(self, timeout: float = 5.0) -> None:
        """Send everything already submitted, close the socket (short linger) and join the thread.

        Raises :class:`PublishError` if the thread has not finished within ``timeout`` seconds.
        """
        with self._submit_lock:
            self._accepting = False
            if self._thread.is_alive() and not self._stop_queued:
                try:
                    self._queue.put(_STOP, timeout=timeout)
                    self._stop_queued = True
                    self._wake()
                except queue.Full:
                    logger.error("publisher queue still full after %.1f s; cannot ask it to stop", timeout)
        if not self._thread.is_alive():
            self._close_pipe_once()
            return
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_pipe_once()
        else:
            raise PublishError(
                f"publisher thread on {self._bound_endpoint or self._requested_endpoint} did not stop "
                f"within {timeout} s",
                endpoint=self._requested_endpoint,
            )

    # ------------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        context = self._given_context or zmq.Context()
        sockets: list[zmq.Socket[bytes]] = []
        monitors: list[zmq.Socket[bytes]] = []
        authenticator: ThreadAuthenticator | None = None
        try:
            if self._curve is not None:
                # The ZAP handler must be up before the first peer connects: without one, libzmq admits every
                # CURVE client whose handshake is well-formed.
                authenticator = ThreadAuthenticator(context, log=logging.getLogger("agent.zap"))
                authenticator.start()
                authenticator.configure_curve(
                    domain=ZAP_DOMAIN.decode(), location=str(self._curve.allowed_keys_folder)
                )
            socket = self._socket(context, zmq.PUB, sockets)
            socket.setsockopt(zmq.SNDHWM, self._send_hwm)
            router: zmq.Socket[bytes] | None = None
            if self._requested_snapshot is not None:
                router = self._socket(context, zmq.ROUTER, sockets)
                router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                router.setsockopt(zmq.SNDHWM, SNAPSHOT_HWM)
            try:
                socket.bind(self._requested_endpoint)
                if router is not None:
                    assert self._requested_snapshot is not None
                    router.bind(self._requested_snapshot)
            except zmq.ZMQError as error:
                self._start_error = error
                return
            monitors = [s.get_monitor_socket(_MONITOR_EVENTS) for s in sockets]
            self._bound_endpoint = _last_endpoint(socket)
            self._bound_snapshot = _last_endpoint(router) if router is not None else None
            self._last_send = time.monotonic()
            self._ready.set()
            logger.info(
                "publisher %s bound to %s, snapshots on %s, %s",
                self.publisher_id,
                self._bound_endpoint,
                self._bound_snapshot or "(none)",
                "CURVE with ZAP allow-list" if self._curve is not None else "plain (no encryption)",
            )
            self._loop(socket, router, monitors)
        except Exception as error:
            # Nothing above should raise; if it does, say so loudly rather than let the thread vanish.
            self._errors += 1
            logger.exception("publisher thread failed: %s", error)
            if not self._ready.is_set():
                self._start_error = error
        finally:
            self._ready.set()
            self._close(context, sockets, monitors, authenticator)

    def _socket(
        self, context: zmq.Context[zmq.Socket[bytes]], kind: int, sockets: list[zmq.Socket[bytes]]
    ) -> zmq.Socket[bytes]:
        socket = context.socket(kind)
        sockets.append(socket)
        socket.setsockopt(zmq.LINGER, STOP_LINGER_MS)
        if self._curve is not None:
            apply_server(socket, self._curve, ZAP_DOMAIN)
        return socket

    def _loop(
        self,
        socket: zmq.Socket[bytes],
        router: zmq.Socket[bytes] | None,
        monitors: list[zmq.Socket[bytes]],
    ) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_read, zmq.POLLIN)
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        if router is not None:
            poller.register(router, zmq.POLLIN)
        while True:
            due = self._last_send + self._heartbeat_s - time.monotonic()
            if self._snapshots.busy:
                due = min(due, RETRY_S)
            ready = dict(poller.poll(max(0, round(due * 1000))))
            if self._wake_read in ready:
                self._drain_wake()
            for monitor, watched in zip(monitors, ("publish", "snapshot"), strict=False):
                if monitor in ready:
                    self._drain_monitor(monitor, watched)
            # Everything submitted so far goes out before any snapshot is taken: a snapshot then reflects
            # the newest sequence number and no request waits behind a burst of slabs for long.
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    return
                self._publish(socket, item)
            if router is not None:
                if router in ready:
                    self._serve_requests(router)
                if self._snapshots.busy:
                    self._snapshots.pump(router)
            if time.monotonic() - self._last_send >= self._heartbeat_s:
                self._send_heartbeat(socket)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _serve_requests(self, router: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._snapshots.on_request(frames, self._seq)
            # Sent at once where the peer can take it: a burst of requests (twenty robots reconnecting after a
            # network outage) then counts only the peers that really stall against MAX_SESSIONS, not all of them.
            self._snapshots.pump(router)

    def _snapshot_served(self, items: int, nbytes: int) -> None:
        logger.debug("snapshot served: %d messages, %d payload bytes", items, nbytes)
        if self._on_snapshot is not None:
            try:
                self._on_snapshot(items, nbytes)
            except Exception as error:
                self._errors += 1
                logger.exception("publisher on_snapshot callback failed: %s", error)

    def _snapshot_requested(self, reason: str, missed: int) -> None:
        if reason == "gap":
            # The one place per-subscriber loss becomes visible here: libzmq's PUB drops for a full subscriber
            # silently, and the subscriber reports what it lost when it asks to resynchronise.
            logger.warning("a subscriber lost %d message(s) and resynchronises", missed)
        if self._on_snapshot_request is not None:
            try:
                self._on_snapshot_request(reason, missed)
            except Exception as error:
                self._errors += 1
                logger.exception("publisher on_snapshot_request callback failed: %s", error)

    def _snapshot_failed(self, reason: str) -> None:
        if self._on_snapshot_failed is not None:
            try:
                self._on_snapshot_failed(reason)
            except Exception as error:
                self._errors += 1
                logger.exception("publisher on_snapshot_failed callback failed: %s", error)

    def _publish(self, socket: zmq.Socket[bytes], item: Publication) -> None:
        seq = self._seq + 1
        sent_at = time.time()
        try:
            frames = encode(item, seq, self.publisher_id, sent_at)
            # The confidence companion takes the data message's seq, not a number of its own (schema 1.4).
            companion = (
                encode_confidence(item, seq, self.publisher_id, sent_at)
                if isinstance(item, SctSlab | SctVolume)
                else None
            )
        except Exception as error:
            # A bad record must not cost the next one: log it, count it, keep the sequence unbroken.
            self._errors += 1
            logger.exception("cannot encode %s: %s", type(item).__name__, error)
            return
        # The store keeps the message whether or not this send succeeds: a subscriber that misses it (here or
        # in its own queue) gets it back from a snapshot.
        self._store.record(item, seq, frames, companion)
        if not self._send(socket, frames, seq, _topic_of(item)):
            return
        if companion is not None:
            # Right behind its data message, so a subscriber finds it next; a data message that could not go
            # out takes its companion with it (the gap it leaves is healed by a snapshot holding both).
            self._send_companion(socket, companion, seq)
        if self._on_sent is not None:
            try:
                self._on_sent(item, seq, sent_at)
            except Exception as error:
                self._errors += 1
                logger.exception("publisher on_sent callback failed: %s", error)

    def _send_heartbeat(self, socket: zmq.Socket[bytes]) -> None:
        seq = self._seq + 1
        frames = encode_heartbeat(seq, self.publisher_id, time.time(), self._heartbeat_s)
        if self._send(socket, frames, seq, "heartbeat"):
            self._heartbeats += 1

    def _send_companion(self, socket: zmq.Socket[bytes], frames: list[bytes | memoryview], seq: int) -> None:
        """Send a confidence message with the seq of the data message before it; the sequence does not move."""
        self._last_send = time.monotonic()
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._count_drop(TOPIC_CONFIDENCE.decode(), seq, "socket refused it (high-water mark)")
        except zmq.ZMQError as error:
            self._errors += 1
            self._count_drop(TOPIC_CONFIDENCE.decode(), seq, str(error))

    def _send(
        self, socket: zmq.Socket[bytes], frames: list[bytes | memoryview], seq: int, topic: str
    ) -> bool:
        """Send without blocking. The sequence number is used up either way, so a loss shows as a gap."""
        self._seq = seq
        self._last_send = time.monotonic()
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._count_drop(topic, seq, "socket refused it (high-water mark)")
            return False
        except zmq.ZMQError as error:
            self._errors += 1
            self._count_drop(topic, seq, str(error))
            return False
        return True

    def _count_drop(self, topic: str, seq: int, why: str) -> None:
        self._dropped += 1
        logger.debug("dropped %s seq %d: %s", topic, seq, why)
        if self._on_dropped is not None:
            try:
                self._on_dropped(topic)
            except Exception as error:
                self._errors += 1
                logger.exception("publisher on_dropped callback failed: %s", error)

    def _drain_monitor(self, monitor: zmq.Socket[bytes], watched: str) -> None:
        count = self._subscribers
        while True:
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = event["event"]
            if kind in _HANDSHAKE_FAILURES:
                self._count_rejected(watched, _HANDSHAKE_FAILURES[kind], event)
            elif watched != "publish":
                continue
            elif kind == zmq.EVENT_ACCEPTED:
                count += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                count = max(0, count - 1)
        if count == self._subscribers:
            return
        self._subscribers = count
        logger.info("publisher %s: %d subscriber(s)", self.publisher_id, count)
        if self._on_subscribers is not None:
            try:
                self._on_subscribers(count)
            except Exception as error:
                self._errors += 1
                logger.exception("publisher on_subscribers callback failed: %s", error)

    def _count_rejected(self, watched: str, reason: str, event: Mapping[str, Any]) -> None:
        self._rejected += 1
        # The peer's address is the operating-room network's business, not patient data: log it for IT.
        logger.warning(
            "%s socket refused a peer (%s handshake failure, code %s) from %s",
            watched,
            reason,
            event.get("value"),
            event.get("endpoint"),
        )
        if self._on_rejected is not None:
            try:
                self._on_rejected(watched, reason)
            except Exception as error:
                self._errors += 1
                logger.exception("publisher on_rejected callback failed: %s", error)

    def _close(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        sockets: list[zmq.Socket[bytes]],
        monitors: list[zmq.Socket[bytes]],
        authenticator: ThreadAuthenticator | None,
    ) -> None:
        try:
            for socket in sockets[: len(monitors)]:
                socket.disable_monitor()
            for monitor in monitors:
                monitor.close(linger=0)
            for socket in sockets:
                socket.close(linger=STOP_LINGER_MS)
            if authenticator is not None:
                authenticator.stop()
            if self._given_context is None:
                context.term()
        except Exception as error:
            self._errors += 1
            logger.exception("publisher could not close its sockets cleanly: %s", error)

    def _close_pipe_once(self) -> None:
        with self._submit_lock:
            if self._wake_read >= 0:
                self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        """Only once the thread is gone and ``submit`` refuses: a closed fd number may be reused at once."""
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_read = self._wake_write = -1


def _last_endpoint(socket: zmq.Socket[bytes]) -> str:
    last = socket.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)


def _topic_of(item: Publication) -> str:
    if isinstance(item, SctSlab):
        return TOPIC_SLAB.decode()
    if isinstance(item, SctVolume):
        return TOPIC_VOLUME.decode()
    return TOPIC_STATUS.decode()
