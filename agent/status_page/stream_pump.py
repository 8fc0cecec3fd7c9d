"""An event stream's pump: the route's iterator runs on a thread of its own, never on the connection's thread.

Why a thread per stream: the route's iterator blocks until the next event (seconds, by contract at most a
keep-alive interval). Were it run by the connection's thread, neither a client that went away nor a server that
stops would be noticed before the iterator next yields. With the pump, the connection's thread waits on a short
queue and looks at its socket and the stop flag every ``STREAM_POLL_S``; the iterator is closed on the pump
thread, the only one that may close a generator it is running, when it next yields.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
from collections.abc import Iterator
from typing import Final

from agent.status_page.http_messages import EventStream

logger = logging.getLogger("agent.status_page.http_server")

#: How often an idle stream checks its client and the stop flag (and the accept loop checks deadlines).
STREAM_POLL_S: Final = 0.25
#: Chunks a stream's pump may run ahead of a slow client before it waits.
STREAM_QUEUE_CHUNKS: Final = 16


def client_gone(sock: socket.socket) -> bool:
    """An event-stream client sends nothing after its request: a readable socket means it closed (or misbehaves)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class StreamPump:
    """Runs a route's event iterator on a thread of its own, so that the writer never waits inside a route."""

    def __init__(self, stream: EventStream, client: str) -> None:
        self._stream = stream
        self.chunks: queue.Queue[bytes] = queue.Queue(STREAM_QUEUE_CHUNKS)
        self.cancelled = threading.Event()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"status-page-stream-{client}", daemon=True)

    def _run(self) -> None:
        iterator: Iterator[bytes] | None = None
        try:
            iterator = self._stream.open()
            for chunk in iterator:
                if not isinstance(chunk, bytes):
                    raise TypeError(f"an event stream yields bytes; got {type(chunk).__name__}")
                while not self.cancelled.is_set():
                    try:
                        self.chunks.put(chunk, timeout=STREAM_POLL_S)
                        break
                    except queue.Full:
                        continue
                if self.cancelled.is_set():
                    break
        except Exception:
            logger.exception("status page event stream failed")
        finally:
            self.ended.set()
            close = getattr(iterator, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    logger.exception("status page event stream did not close cleanly")
