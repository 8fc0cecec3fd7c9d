"""The publisher stage: one thread owns the ZeroMQ PUB socket and sends what the pipeline submits.

ZeroMQ sockets are not thread-safe, so only this stage's thread creates, binds, uses and closes the socket (and
its monitor); other threads talk to it through a bounded queue. ``submit`` blocks while that queue is full: that
is the back-pressure DESIGN.md §1 asks for. The thread itself never waits on the network: a PUB socket drops a
message for a subscriber whose queue (``send_hwm`` messages) is full and keeps serving the others, so a slow or
dead robot can never stall the pipeline. Such a subscriber sees a gap in the sequence numbers (see
``agent/wire.py``) and must resynchronise.

libzmq's PUB socket drops silently: ``dropped`` counts only sends the socket refused outright (``zmq.Again``),
which for PUB is rare; per-subscriber losses are visible to subscribers, through sequence gaps, not here.

Payload frames are sent with ``copy=False``: libzmq reads the record's array in place and the publisher keeps a
reference until it is sent, so a volume is never copied on its way out.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from agent.records import Publication, SctSlab, SctVolume
from agent.wire import TOPIC_SLAB, TOPIC_STATUS, TOPIC_VOLUME, encode, encode_heartbeat

logger = logging.getLogger(__name__)

#: How long ``stop`` lets queued messages drain to connected subscribers after the last send (ms).
STOP_LINGER_MS: Final = 500
#: How often the idle thread looks at the socket monitor for subscribers coming and going (s).
MONITOR_POLL_S: Final = 0.05
#: How long ``start`` waits for the thread to report that it bound the socket (s).
START_TIMEOUT_S: Final = 10.0
#: Monitor events that change the subscriber count.
_MONITOR_EVENTS: Final = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
#: Bytes of random publisher id: a restart is recognisable because the id changes.
PUBLISHER_ID_BYTES: Final = 8


class PublishError(RuntimeError):
    """The publisher cannot do what was asked: bind its endpoint, accept an item, or stop in time."""

    def __init__(self, message: str, *, endpoint: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


@dataclass(frozen=True, slots=True)
class _Stop:
    """Queued by ``stop`` behind everything already submitted."""


_STOP: Final = _Stop()


class Publisher:
    """Publishes status events, sCT slabs and volumes on a PUB socket, with heartbeats when idle.

    ``on_sent(item, seq, sent_at)`` and ``on_subscribers(count)`` run on the publisher thread; they must be quick
    and must not call back into the publisher. Their exceptions are logged and counted in ``errors``.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_s: float = 1.0,
        send_hwm: int = 8,
        queue_depth: int = 64,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        on_sent: Callable[[Publication, int, float], None] | None = None,
        on_subscribers: Callable[[int], None] | None = None,
        on_dropped: Callable[[str], None] | None = None,
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
        self._heartbeat_s = heartbeat_s
        self._send_hwm = send_hwm
        self._given_context = context
        self._on_sent = on_sent
        self._on_subscribers = on_subscribers
        self._on_dropped = on_dropped
        self._queue: queue.Queue[Publication | _Stop] = queue.Queue(maxsize=queue_depth)
        self._submit_lock = threading.Lock()
        self._accepting = False
        self._stop_queued = False
        self._started = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sct-publisher", daemon=True)
        self._bound_endpoint: str | None = None
        self._last_send = time.monotonic()
        #: Random per publisher start; subscribers see a new id after a restart and count afresh.
        self.publisher_id = secrets.token_hex(PUBLISHER_ID_BYTES)
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
                except queue.Full:
                    logger.error("publisher queue still full after %.1f s; cannot ask it to stop", timeout)
        if not self._thread.is_alive():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise PublishError(
                f"publisher thread on {self._bound_endpoint or self._requested_endpoint} did not stop "
                f"within {timeout} s",
                endpoint=self._requested_endpoint,
            )

    # ------------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        context = self._given_context or zmq.Context()
        socket: zmq.Socket[bytes] | None = None
        monitor: zmq.Socket[bytes] | None = None
        try:
            socket = context.socket(zmq.PUB)
            socket.setsockopt(zmq.SNDHWM, self._send_hwm)
            socket.setsockopt(zmq.LINGER, STOP_LINGER_MS)
            try:
                socket.bind(self._requested_endpoint)
            except zmq.ZMQError as error:
                self._start_error = error
                return
            monitor = socket.get_monitor_socket(_MONITOR_EVENTS)
            last = socket.getsockopt(zmq.LAST_ENDPOINT)
            self._bound_endpoint = last.decode() if isinstance(last, bytes) else str(last)
            self._last_send = time.monotonic()
            self._ready.set()
            logger.info("publisher %s bound to %s", self.publisher_id, self._bound_endpoint)
            self._loop(socket, monitor)
        except Exception as error:
            # Nothing above should raise; if it does, say so loudly rather than let the thread vanish.
            self._errors += 1
            logger.exception("publisher thread failed: %s", error)
            if not self._ready.is_set():
                self._start_error = error
        finally:
            self._ready.set()
            self._close(context, socket, monitor)

    def _loop(self, socket: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
        while True:
            due = self._last_send + self._heartbeat_s - time.monotonic()
            try:
                item = self._queue.get(timeout=max(0.0, min(MONITOR_POLL_S, due)))
            except queue.Empty:
                item = None
            self._drain_monitor(monitor)
            if isinstance(item, _Stop):
                return
            if item is not None:
                self._publish(socket, item)
            elif time.monotonic() - self._last_send >= self._heartbeat_s:
                self._send_heartbeat(socket)

    def _publish(self, socket: zmq.Socket[bytes], item: Publication) -> None:
        seq = self._seq + 1
        sent_at = time.time()
        try:
            frames = encode(item, seq, self.publisher_id, sent_at)
        except Exception as error:
            # A bad record must not cost the next one: log it, count it, keep the sequence unbroken.
            self._errors += 1
            logger.exception("cannot encode %s: %s", type(item).__name__, error)
            return
        if not self._send(socket, frames, seq, _topic_of(item)):
            return
        if self._on_sent is not None:
            try:
                self._on_sent(item, seq, sent_at)
            except Exception as error:
                self._errors += 1
                logger.exception("publisher on_sent callback failed: %s", error)

    def _send_heartbeat(self, socket: zmq.Socket[bytes]) -> None:
        seq = self._seq + 1
        if self._send(socket, encode_heartbeat(seq, self.publisher_id, time.time()), seq, "heartbeat"):
            self._heartbeats += 1

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

    def _drain_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        count = self._subscribers
        while True:
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_ACCEPTED:
                count += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
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

    def _close(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        socket: zmq.Socket[bytes] | None,
        monitor: zmq.Socket[bytes] | None,
    ) -> None:
        try:
            if socket is not None and monitor is not None:
                socket.disable_monitor()
            if monitor is not None:
                monitor.close(linger=0)
            if socket is not None:
                socket.close(linger=STOP_LINGER_MS)
            if self._given_context is None:
                context.term()
        except Exception as error:
            self._errors += 1
            logger.exception("publisher could not close its socket cleanly: %s", error)


def _topic_of(item: Publication) -> str:
    if isinstance(item, SctSlab):
        return TOPIC_SLAB.decode()
    if isinstance(item, SctVolume):
        return TOPIC_VOLUME.decode()
    return TOPIC_STATUS.decode()
