"""One connection to the status page: its requests one after the other (HTTP/1.1 keep-alive), or one event stream.

What ``http.server``'s request handler lacks for a page on a hospital network is added here (the why is in
:mod:`agent.status_page.http_server`): bounded request lines and headers, the request head's deadline (enforced
by the accept loop), GET and HEAD only, bodies never read, the security headers on every response, requests
checked by :class:`~agent.status_page.access.Authenticator` before a route sees them, and credentials removed
from what a route sees.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import logging
import queue
import socket
import ssl
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from agent.ops.config import is_loopback_host
from agent.status_page.access import TOKEN_QUERY, AccessDecision
from agent.status_page.http_messages import EventStream, PageRequest, PageResponse
from agent.status_page.refusal_log import printable
from agent.status_page.stream_pump import STREAM_POLL_S, StreamPump, client_gone

if TYPE_CHECKING:
    from agent.status_page.http_server import Connection, StatusPageServer

logger = logging.getLogger("agent.status_page.http_server")

MAX_REQUEST_LINE: Final = 8192
MAX_HEADER_LINE: Final = 8192
MAX_HEADER_BYTES: Final = 32768
MAX_QUERY_FIELDS: Final = 32
#: Each read or write on a connection; a client that reads nothing of a stream for this long is dropped.
SOCKET_TIMEOUT_S: Final = 10.0
#: From accepting a connection (or finishing a response on a kept-alive one) to the end of the request headers.
REQUEST_HEAD_TIMEOUT_S: Final = 10.0
RETRY_AFTER_S: Final = 5
#: One year: browsers remember to use HTTPS only; no includeSubDomains (a hospital's other hosts are not ours).
HSTS_MAX_AGE_S: Final = 31_536_000
ALLOWED_METHODS: Final = ("GET", "HEAD")
#: Only this origin's files: no inline script or style, no framing, no plug-ins, no forms.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
SECURITY_HEADERS: Final = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
#: Headers a route may not set: the server's own (security, framing of the message, cookies).
_SERVER_HEADERS: Final = frozenset(name.lower() for name, _ in SECURITY_HEADERS) | {
    "strict-transport-security",
    "content-length",
    "content-type",
    "connection",
    "set-cookie",
    "transfer-encoding",
}
#: Request headers routes never see: credentials.
_CREDENTIAL_HEADERS: Final = frozenset({"authorization", "cookie"})


def client_name(client_address: object) -> str:
    if isinstance(client_address, tuple) and client_address:
        return str(client_address[0])
    return str(client_address)


class _HeaderBudget:
    """The request's file while its headers are read: each line and all of them bounded (else 431)."""

    def __init__(self, rfile: object) -> None:
        self._rfile = rfile
        self._left = MAX_HEADER_BYTES

    def readline(self, limit: int = -1) -> bytes:
        size = min(MAX_HEADER_LINE, self._left) + 1
        if limit >= 0:
            size = min(size, limit)
        line: bytes = self._rfile.readline(size)  # type: ignore[attr-defined]
        if len(line) > MAX_HEADER_LINE or len(line) > self._left:
            raise http.client.LineTooLong(
                f"header line or headers over {MAX_HEADER_LINE}/{MAX_HEADER_BYTES} bytes"
            )
        self._left -= len(line)
        return line


class PageHandler(http.server.BaseHTTPRequestHandler):
    """One connection: requests one after the other (HTTP/1.1 keep-alive), or one event stream."""

    protocol_version = "HTTP/1.1"
    server_version = "sct-agent"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S
    server: http.server.HTTPServer

    def __init__(
        self,
        request: socket.socket,
        client_address: object,
        server: http.server.HTTPServer,
        connection: Connection,
    ) -> None:
        self.connection_entry = connection
        self.owner: StatusPageServer = server.owner  # type: ignore[attr-defined]
        self.client = client_name(client_address)
        self.handshake_failed = False
        self.log_path = ""
        self.sent_headers: set[str] = set()
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        self.request.settimeout(SOCKET_TIMEOUT_S)
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.owner.tls is not None:
            try:
                self.request = self.owner.tls.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError) as error:
                self.handshake_failed = True
                why = getattr(error, "reason", None) or type(error).__name__
                self.owner.refuse(self.client, "", "", "tls", f"TLS handshake failed ({why})", 0)
            else:
                self.connection_entry.sock = self.request
        super().setup()

    def handle(self) -> None:
        if self.handshake_failed:
            return
        super().handle()

    def handle_one_request(self) -> None:
        with self.owner.lock:
            self.connection_entry.deadline = time.monotonic() + REQUEST_HEAD_TIMEOUT_S
        self.sent_headers = set()
        self.log_path = ""
        self.command, self.request_version, self.requestline = "", "HTTP/1.1", ""
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.send_error(
                    HTTPStatus.REQUEST_URI_TOO_LONG, f"request line over {MAX_REQUEST_LINE} bytes"
                )
                return
            rfile = self.rfile
            self.rfile = _HeaderBudget(rfile)  # type: ignore[assignment]
            try:
                parsed = self.parse_request()
            finally:
                self.rfile = rfile
            with self.owner.lock:
                self.connection_entry.deadline = None
            if not parsed:
                return
            if self.request_version == "HTTP/0.9":
                self.close_connection = True
                self.owner.refuse(self.client, self.command, "", "bad_request", "HTTP/0.9 request", 0)
                return
            self._serve()
            self.wfile.flush()
        except (OSError, ssl.SSLError):  # timed out, reset, shut down by the reaper or by stop()
            self.close_connection = True

    # --- what http.server calls

    def handle_expect_100(self) -> bool:
        return True  # no body is ever read: never invite one

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (malformed request line, headers too long or too many, bad version)."""
        self.close_connection = True
        if not self.request_version.startswith("HTTP/1."):
            self.request_version = "HTTP/1.0"  # a malformed request line still gets a status line and headers
        why = message or HTTPStatus(code).phrase
        self.owner.refuse(self.client, self.command, self.log_path, "bad_request", why, code)
        body = f"{code} {HTTPStatus(code).phrase}: {why}\n".encode()
        self._respond(code, "text/plain; charset=utf-8", body, head=self.command == "HEAD")

    def send_header(self, keyword: str, value: str) -> None:
        self.sent_headers.add(keyword.lower())
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        if self.owner.tls is not None:
            self.send_header("Strict-Transport-Security", f"max-age={HSTS_MAX_AGE_S}")
        if "cache-control" not in self.sent_headers:
            self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def version_string(self) -> str:
        """No version in the Server header: a scanner learns nothing to look up."""
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Nothing per request: one line per page load would drown the agent's log (refusals are logged)."""

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("status page %s: " + format, self.client, *args)

    # --- serving

    def _respond(
        self,
        status: int,
        content_type: str,
        body: bytes,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _refuse(self, decision: AccessDecision, message: str) -> None:
        self.owner.refuse(
            self.client, self.command, self.log_path, decision.refusal, decision.why, decision.status
        )
        body = f"{decision.status} {HTTPStatus(decision.status).phrase}: {message}\n".encode()
        self._respond(
            decision.status, "text/plain; charset=utf-8", body, decision.headers, head=self.command == "HEAD"
        )

    def _serve(self) -> None:
        target = urlsplit(self.path)
        raw_path = target.path or "/"
        self.log_path = raw_path
        head = self.command == "HEAD"
        if (
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
            or "Transfer-Encoding" in self.headers
        ):
            self.close_connection = True  # a body is never read: the connection cannot carry another request
        if self.command not in ALLOWED_METHODS:
            self.close_connection = True
            self._refuse(
                AccessDecision(
                    "method",
                    f"method {self.command[:16]} (the page is read-only)",
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    (("Allow", ", ".join(ALLOWED_METHODS)),),
                ),
                "the status page is read-only: GET and HEAD only",
            )
            return
        request = self._request(raw_path, target.query)
        if isinstance(request, AccessDecision):
            self.close_connection = True
            self._refuse(request, request.why)
            return
        assert self.owner.auth is not None
        decision = self.owner.auth.check(request.headers, request.query, self.client)
        if not decision.allowed:
            unauthorized = decision.status == HTTPStatus.UNAUTHORIZED
            self._refuse(decision, _REFUSAL_TEXT[self.owner.auth.mode] if unauthorized else decision.why)
            return
        if decision.set_cookie:
            self._redirect_without_token(raw_path, target.query, decision.set_cookie, head)
            return
        routed = PageRequest(
            request.path,
            {k: v for k, v in request.query.items() if k != TOKEN_QUERY},
            {k: v for k, v in request.headers.items() if k not in _CREDENTIAL_HEADERS},
            self.client,
        )
        try:
            result = self.owner.route(routed)
        except Exception:
            logger.exception("status page route %s failed", printable(routed.path))
            self.owner.metrics.page_request("failed")
            self.close_connection = True
            self._respond(500, "text/plain; charset=utf-8", b"500 Internal Server Error\n", head=head)
            return
        if result is None:
            self.owner.metrics.page_request("not_found")
            self._respond(404, "text/plain; charset=utf-8", b"404 Not Found\n", head=head)
        elif isinstance(result, PageResponse):
            self.owner.metrics.page_request("served")
            extra = tuple((n, v) for n, v in result.headers if n.lower() not in _SERVER_HEADERS)
            self._respond(result.status, result.content_type, result.body, extra, head=head)
        else:
            self._stream(result, head)

    def _request(self, raw_path: str, raw_query: str) -> PageRequest | AccessDecision:
        """The request as a route would see it (credentials still in), or why it is malformed (400)."""

        def bad(why: str) -> AccessDecision:
            return AccessDecision("bad_request", why, HTTPStatus.BAD_REQUEST)

        try:
            path = unquote(raw_path, errors="strict")
            fields = parse_qs(
                raw_query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS, errors="strict"
            )
        except UnicodeDecodeError:
            return bad("path or query not UTF-8")
        except ValueError:
            return bad(f"more than {MAX_QUERY_FIELDS} query parameters")
        if not path.startswith("/") or "\0" in path or "\\" in path or ".." in path.split("/"):
            return bad("path not absolute, or with '..', a backslash or NUL")
        headers = {name.lower(): value for name, value in reversed(self.headers.items())}
        if self.owner.auth is not None and self.owner.auth.mode == "none" and not self._local_host(headers):
            return bad("Host header not a loopback name on an unauthenticated page (DNS rebinding?)")
        return PageRequest(path, {k: v[0] for k, v in fields.items()}, headers, self.client)

    def _local_host(self, headers: Mapping[str, str]) -> bool:
        host = headers.get("host")
        if host is None:
            return True  # HTTP/1.0: no Host; a browser always sends one
        if host.startswith("["):
            name = host[1:].partition("]")[0]
        else:
            name = host.rsplit(":", 1)[0] if ":" in host else host
        return is_loopback_host(name) or name == self.owner.config.host

    def _redirect_without_token(self, raw_path: str, raw_query: str, cookie: str, head: bool) -> None:
        """303 to the same URL without ``token``, setting the cookie: the token leaves the address bar."""
        kept = [(k, v) for k, v in parse_qs(raw_query, keep_blank_values=True).items() if k != TOKEN_QUERY]
        # Relative to this host, never "//other-host": the path as the client sent it, with one leading slash.
        location = "/" + quote(raw_path, safe="/%:@!$&'()*+,;=-._~").lstrip("/")
        if kept:
            location += "?" + urlencode([(k, v[0]) for k, v in kept])
        self.owner.metrics.page_request("served")
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", location)
        self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, stream: EventStream, head: bool) -> None:
        if not self.owner.open_stream():
            self._refuse(
                AccessDecision(
                    "busy",
                    f"more than status_page.max_clients = {self.owner.config.max_clients} event streams",
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    (("Retry-After", str(RETRY_AFTER_S)),),
                ),
                "too many pages open; try again shortly",
            )
            return
        try:
            self.owner.metrics.page_request("served")
            self.close_connection = True
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("X-Accel-Buffering", "no")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            if not head:
                self._pump(stream)
        finally:
            self.owner.close_stream()

    def _pump(self, stream: EventStream) -> None:
        pump = StreamPump(stream, self.client)
        self.connection_entry.pumps.append(pump.thread)
        pump.thread.start()
        try:
            while not self.owner.stopping.is_set():
                try:
                    chunk = pump.chunks.get(timeout=STREAM_POLL_S)
                except queue.Empty:
                    if pump.ended.is_set() and pump.chunks.empty():
                        return
                    if client_gone(self.request):
                        return
                    continue
                self.wfile.write(chunk)
                self.wfile.flush()
        except (OSError, ssl.SSLError):
            return  # the client went away, or stop() shut the connection down
        finally:
            pump.cancelled.set()


_REFUSAL_TEXT: Final = {
    "basic": "this page needs a user name and password",
    "token": "this page needs its access token: send 'Authorization: Bearer TOKEN', or open /?token=TOKEN once",
}
