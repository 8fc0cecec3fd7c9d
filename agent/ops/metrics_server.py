"""The HTTP endpoint Prometheus scrapes: one agent's registry, on the address the configuration names.

prometheus_client's own server is used, with two guards it lacks: a scrape connection that stays silent cannot
hang ``close()`` (each request handler times out), and an address that cannot be bound raises
:class:`MetricsServerError` naming ``host:port`` (an ``OSError`` keeping the errno), so start-up says which
setting to change.
"""

from __future__ import annotations

import errno
import socket
import threading
from types import TracebackType
from typing import Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import start_http_server

from agent.ops.metrics import AgentMetrics
from sct_core.errors import SctError


class MetricsServerError(SctError, OSError):
    """The metrics endpoint could not be started (port taken, address not local, name not resolvable)."""

    def __init__(self, code: int, message: str, *, address: str) -> None:
        super().__init__(
            message, attribute="metrics.host, metrics.port", found=address, expected="a free local address"
        )
        self.errno = code  # what an OSError caller looks at
        self.strerror = message


#: How long a scrape connection may stay silent before its handler gives up, so that ``close()`` (which joins the
#: handler threads) cannot hang on a client that connects and sends nothing.
REQUEST_TIMEOUT_S: Final = 10.0
#: How long ``close()`` waits for the serving thread to end.
_JOIN_TIMEOUT_S: Final = 5.0


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    """``/metrics`` served over HTTP from a daemon thread; ``close()`` stops it and joins its threads."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self._host = host
        self._port = int(httpd.server_address[1])
        self._closed = False

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port actually bound (the one the system picked when asked for port 0)."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{_host_port(self._host, self._port)}/metrics"

    def close(self) -> None:
        """Stop serving, close the socket and join the serving thread and any request threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._thread.join(_JOIN_TIMEOUT_S)
        # ThreadingMixIn.server_close joins the request threads (block_on_close), bounded by REQUEST_TIMEOUT_S.
        self._httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _handler_with_timeout(timeout_s: float) -> type[WSGIRequestHandler]:
    """A quiet request handler that gives up on a client silent for ``timeout_s``, without a traceback."""

    class TimedMetricsHandler(WSGIRequestHandler):
        timeout = timeout_s

        def handle(self) -> None:
            try:
                super().handle()
            except TimeoutError:
                self.close_connection = True  # a client that connected and sent nothing: drop it

        def log_message(self, format: str, *args: object) -> None:
            """Log nothing: one line per scrape would drown the agent's own log."""

    return TimedMetricsHandler


def serve(
    metrics: AgentMetrics,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> MetricsServer:
    """Serve ``metrics`` on ``host:port`` (port 0: any free port; read ``.port``).

    Raises ``MetricsServerError`` (an ``OSError`` keeping the errno) naming ``host:port`` when the address cannot
    be bound, e.g. because another process holds the port.
    """
    try:
        httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        code = exc.errno if exc.errno is not None else errno.EADDRNOTAVAIL
        why = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror):
            why = f"cannot resolve host: {why}"
        raise MetricsServerError(
            code, f"cannot serve metrics on {_host_port(host, port)}: {why}", address=_host_port(host, port)
        ) from exc
    # start_http_server has no timeout option; the server reads its handler class per request, so swap it in.
    httpd.RequestHandlerClass = _handler_with_timeout(request_timeout_s)
    thread.name = f"metrics-server-{httpd.server_address[1]}"
    return MetricsServer(httpd, thread, host)
