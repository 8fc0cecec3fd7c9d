"""The status page's HTTP server: read-only, authenticated off loopback, bounded in every resource a client holds.

Routes (``Route``) see only requests that passed authentication (:mod:`agent.status_page.access`); the server
owns everything else a browser on a hospital network meets: TLS, the methods (GET and HEAD; anything else 405
with ``Allow``, its body never read), the security headers on every response, the limits, and the refused
requests, each logged on one rate-limited line (client address, method, path without its query, why; never a
credential) and counted in ``sct_agent_page_refused_total{reason}``.

Why the standard library's ``http.server`` and not a framework: the page is a handful of GET routes and one
event stream, and every dependency on a medical edge box is one more thing to patch. What ``http.server`` lacks
is added here:

- Limits. A request line of at most ``MAX_REQUEST_LINE`` bytes (else 414), header lines of at most
  ``MAX_HEADER_LINE`` and ``MAX_HEADER_BYTES`` in all (else 431), at most ``MAX_QUERY_FIELDS`` query parameters.
  Each socket read or write times out after ``SOCKET_TIMEOUT_S``, and the whole request head (the TLS handshake,
  the wait for a request on a kept-alive connection, the request line and headers) must arrive within
  ``REQUEST_HEAD_TIMEOUT_S``: the accept loop shuts down a connection past that deadline, so a client that
  trickles one byte every few seconds cannot hold a thread. At most ``max_clients`` event streams (else 503 with
  ``Retry-After``) and ``max_clients + MAX_OTHER_CONNECTIONS`` connections (beyond, closed at once).
- TLS handshakes run on the connection's own thread, never on the accept loop, so a stalled handshake delays
  nobody else.
- Event streams (server-sent events). Each stream has a pump thread that runs the route's iterator and a
  writer, the connection's thread, which writes each chunk as it comes (the socket is unbuffered) and, while it
  waits, notices a client that went away (its socket turns readable: an SSE client sends nothing) and a server
  that stops, within ``STREAM_POLL_S``. The iterator is closed on the pump thread, the one that runs it, once it
  next yields. So ``stop()`` never waits on a route: it shuts every connection down and joins the threads within
  ``STOP_JOIN_S``.
- On an unauthenticated loopback page, a ``Host`` that is not a loopback name is refused: a web page in a
  browser on this machine could otherwise read the page through DNS rebinding.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

from agent.ops.config import StatusPageConfig
from agent.ops.metrics import AgentMetrics
from agent.status_page.access import Authenticator, server_tls_context
from agent.status_page.http_handler import REQUEST_HEAD_TIMEOUT_S, PageHandler, client_name
from agent.status_page.http_messages import EventStream, PageRequest, PageResponse, Route
from agent.status_page.refusal_log import RefusalLog
from agent.status_page.stream_pump import STREAM_POLL_S
from sct_core.errors import SctError

__all__ = ["EventStream", "PageRequest", "PageResponse", "Route", "StatusPageError", "StatusPageServer"]

logger = logging.getLogger(__name__)

#: Connections besides the event streams (page loads, images, a browser's parallel connections).
MAX_OTHER_CONNECTIONS: Final = 32
#: What ``stop()`` waits, at most, for the connection and pump threads.
STOP_JOIN_S: Final = 5.0


class StatusPageError(SctError, OSError):
    """The status page could not be served on its address (port taken, address not local, name not resolvable)."""

    def __init__(self, code: int, message: str, *, address: str) -> None:
        super().__init__(
            message, attribute="status_page.listen", found=address, expected="a free local address"
        )
        self.errno = code
        self.strerror = message


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class Connection:
    sock: socket.socket
    thread: threading.Thread | None = None
    #: monotonic time by which the request head must have arrived; None while a request is being answered.
    deadline: float | None = None
    streaming: bool = False
    pumps: list[threading.Thread] = field(default_factory=list)


class StatusPageServer:
    """The page's HTTP(S) server on ``status_page.listen``: ``start()``, ``url``, ``stop()``.

    ``start()`` checks the TLS files and credentials (ConfigError naming the key) and binds (StatusPageError
    naming the address); with ``listen = ""`` it does nothing and ``url`` is "".
    """

    def __init__(self, config: StatusPageConfig, route: Route, metrics: AgentMetrics) -> None:
        self.config = config
        self.route = route
        self.metrics = metrics
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self._connections: dict[int, Connection] = {}
        self._streams = 0
        self.refusals = RefusalLog()
        self.tls: ssl.SSLContext | None = None
        self.auth: Authenticator | None = None

    # --- lifecycle

    def start(self) -> None:
        if self._httpd is not None:
            raise RuntimeError("the status page server is already started")
        config = self.config
        if not config.enabled:
            logger.info("status page off (status_page.listen = '')")
            return
        self.tls = server_tls_context(config)
        self.auth = Authenticator(config)
        self.stopping.clear()
        host, port = config.host, config.port
        address = _host_port(host, port)
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            self._httpd = _HttpServer(sockaddr, family, self)
        except OSError as error:
            code = error.errno if error.errno is not None else 0
            why = error.strerror or str(error)
            raise StatusPageError(
                code, f"cannot serve the status page on {address}: {why}", address=address
            ) from error
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": STREAM_POLL_S},
            name=f"status-page-{self._httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        logger.info(
            "status page at %s (auth %s, %s)",
            self.url,
            config.auth,
            "TLS" if self.tls else "plain HTTP on loopback",
        )

    def stop(self) -> None:
        """Close the listening socket and every connection (event streams end at once); join the threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)
        with self.lock:
            connections = list(self._connections.values())
        for connection in connections:
            _shut(connection.sock)
        deadline = time.monotonic() + STOP_JOIN_S
        for connection in connections:
            for thread in (connection.thread, *connection.pumps):
                if thread is not None:
                    thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for c in connections for t in (c.thread, *c.pumps) if t is not None and t.is_alive()]
        if alive:
            logger.warning("status page stopped; %d thread(s) still ending: %s", len(alive), ", ".join(alive))
        self.metrics.set_page_event_streams(0)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:9110/`` or ``https://host:port/`` with the port actually bound; "" when not serving."""
        if self._httpd is None:
            return ""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{_host_port(self.config.host, int(self._httpd.server_address[1]))}/"

    # --- connections (called by the accept loop and the connection threads)

    def _admit(self, sock: socket.socket, client: str) -> Connection | None:
        limit = self.config.max_clients + MAX_OTHER_CONNECTIONS
        with self.lock:
            if len(self._connections) < limit and not self.stopping.is_set():
                connection = Connection(sock, deadline=time.monotonic() + REQUEST_HEAD_TIMEOUT_S)
                self._connections[id(connection)] = connection
                return connection
        self.refuse(
            client, "", "", "busy", f"more than {limit} connections open", HTTPStatus.SERVICE_UNAVAILABLE
        )
        if self.tls is None:
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(_CANNED_BUSY)
        return None

    def _release(self, connection: Connection) -> None:
        with self.lock:
            self._connections.pop(id(connection), None)

    def _reap(self) -> None:
        """Shut down connections whose request head is late (the accept loop calls this every STREAM_POLL_S)."""
        now = time.monotonic()
        with self.lock:
            late = [c for c in self._connections.values() if c.deadline is not None and c.deadline < now]
            for connection in late:
                connection.deadline = None
        for connection in late:
            _shut(connection.sock)
        self.refusals.flush()

    def open_stream(self) -> bool:
        with self.lock:
            if self._streams >= self.config.max_clients:
                return False
            self._streams += 1
            count = self._streams
        self.metrics.set_page_event_streams(count)
        return True

    def close_stream(self) -> None:
        with self.lock:
            self._streams -= 1
            count = self._streams
        if not self.stopping.is_set():
            self.metrics.set_page_event_streams(count)

    def refuse(self, client: str, method: str, path: str, reason: str, why: str, status: int) -> None:
        """Count and log one refused request."""
        self.metrics.page_refused(reason)
        self.refusals.refused(client, method, path, reason, why, status)


_CANNED_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 24\r\n"
    b"Retry-After: 5\r\nConnection: close\r\n\r\ntoo many connections\r\n\r\n"
)


def _shut(sock: socket.socket) -> None:
    """Shut a connection down from another thread; its blocked reads and writes return at once.

    ``socket.socket.shutdown`` is called unbound so that an SSLSocket is shut at the TCP level, not unwrapped
    under the feet of the thread using it.
    """
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _HttpServer(http.server.HTTPServer):
    """The accept loop: admits a connection or turns it away, starts its thread, reaps late request heads."""

    request_queue_size = 64

    def __init__(
        self, address: tuple[object, ...], family: socket.AddressFamily, owner: StatusPageServer
    ) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, PageHandler)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for this host's name (socket.getfqdn): seconds on a hospital network
        # whose resolver does not answer, for a name nothing uses.
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        client = client_name(client_address)
        connection = self.owner._admit(request, client)
        if connection is None:
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self._serve_connection,
            args=(connection, request, client_address),
            name=f"status-page-connection-{client}",
            daemon=True,
        )
        connection.thread = thread
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (resource limits): this connection only is lost
            self.owner._release(connection)
            raise

    def _serve_connection(
        self, connection: Connection, request: socket.socket, client_address: object
    ) -> None:
        try:
            PageHandler(request, client_address, self, connection)
        except Exception:  # a bug must cost one connection, not the server
            logger.exception("status page connection from %s failed", client_name(client_address))
        finally:
            self.owner._release(connection)
            self.shutdown_request(connection.sock)

    def service_actions(self) -> None:
        self.owner._reap()

    def handle_error(self, request: object, client_address: object) -> None:  # pragma: no cover - not reached
        logger.exception("status page connection from %s failed", client_name(client_address))
