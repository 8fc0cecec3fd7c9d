"""The status page's HTTP server and its access control, with a real server on loopback and real clients.

Every test starts ``StatusPageServer`` on a free loopback port and talks to it with ``http.client`` (or a raw
socket where a client must misbehave); TLS uses a real self-signed certificate made by the ``openssl`` command at
test time and verified by the client. Refusals are checked three ways: the status and headers the client gets,
the ``sct_agent_page_refused_total`` counter, and the log line.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import logging
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agent_support import agent_config, write_test_model, write_test_protocol

from agent.ops.config import AgentConfig, ConfigError, StatusPageConfig
from agent.ops.config_loader import load_config
from agent.ops.metrics import AgentMetrics
from agent.ops.preflight import Status, check_status_page
from agent.service import AgentService
from agent.status_page import http_handler, http_server
from agent.status_page.access import COOKIE_NAME, COOKIE_NAME_TLS, MAX_FAILURES
from agent.status_page.credentials import create_token_file, set_user
from agent.status_page.http_server import EventStream, PageRequest, PageResponse, StatusPageServer

#: Generous bounds for waits on events that happen in milliseconds; a test never asserts how fast.
WAIT_S = 20.0
PAGE = b"<!doctype html><title>status</title><h1>sct-agent</h1>"


# --------------------------------------------------------------------------------------------- test doubles


@dataclass
class Routes:
    """The routes a page would have: a page, an event stream, nothing else; records what reached them."""

    seen: list[PageRequest] = field(default_factory=list)
    events: int = 3
    streams_closed: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    release: threading.Event = field(default_factory=threading.Event)

    def __call__(self, request: PageRequest) -> PageResponse | EventStream | None:
        self.seen.append(request)
        if request.path == "/":
            return PageResponse(200, "text/html; charset=utf-8", PAGE)
        if request.path == "/static/app.js":
            return PageResponse(
                200, "text/javascript", b"1;", (("Cache-Control", "max-age=60"), ("X-Frame-Options", "ALLOW"))
            )
        if request.path == "/events":
            return EventStream(self._events)
        if request.path == "/boom":
            raise RuntimeError("a route bug")
        return None

    def _events(self) -> Iterator[bytes]:
        try:
            for number in range(1, self.events + 1):
                yield f"event: board\ndata: {number}\n\n".encode()
            while not self.release.wait(0.2):
                yield b": keep-alive\n\n"
        finally:
            self.streams_closed.release()


def refused(metrics: AgentMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("sct_agent_page_refused_total", {"reason": reason})
    assert value is not None
    return value


def requests(metrics: AgentMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("sct_agent_page_requests_total", {"outcome": outcome})
    assert value is not None
    return value


def open_streams(metrics: AgentMetrics) -> float:
    value = metrics.registry.get_sample_value("sct_agent_page_event_streams")
    assert value is not None
    return value


@dataclass
class Served:
    server: StatusPageServer
    metrics: AgentMetrics
    routes: Routes
    tls: ssl.SSLContext | None

    @property
    def port(self) -> int:
        return int(self.server.url.rstrip("/").rsplit(":", 1)[1])

    def connect(self) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection("localhost", self.port, timeout=WAIT_S, context=self.tls)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None
    ) -> tuple[http.client.HTTPResponse, bytes]:
        connection = self.connect()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response, response.read()
        finally:
            connection.close()


@contextmanager
def serve(
    config: StatusPageConfig, routes: Routes | None = None, cafile: Path | None = None
) -> Iterator[Served]:
    metrics = AgentMetrics()
    routes = routes or Routes()
    server = StatusPageServer(config, routes, metrics)
    server.start()
    client_tls = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    try:
        yield Served(server, metrics, routes, client_tls)
    finally:
        routes.release.set()
        server.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real self-signed certificate for localhost and 127.0.0.1, and its key (mode 0600), made by openssl."""
    folder = tmp_path_factory.mktemp("tls")
    return make_certificate(folder, "page")


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    return cert, key


def token_config(
    tmp_path: Path, certificate: tuple[Path, Path] | None = None
) -> tuple[StatusPageConfig, str]:
    token_file = tmp_path / "page-token"
    token = create_token_file(token_file)
    cert, key = certificate if certificate is not None else (None, None)
    config = StatusPageConfig(
        listen="127.0.0.1:0", auth="token", token_file=token_file, tls_certificate=cert, tls_key=key
    )
    return config, token


def basic(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


# --------------------------------------------------------------------------------------------------- serving


def test_loopback_without_auth_serves_with_the_security_headers() -> None:
    with serve(StatusPageConfig(listen="127.0.0.1:0")) as page:
        assert page.server.url == f"http://127.0.0.1:{page.port}/"
        response, body = page.get("/", {"Authorization": "Bearer x", "Cookie": "a=b"})
        assert (response.status, body) == (200, PAGE)
        assert response.getheader("Content-Type") == "text/html; charset=utf-8"
        csp = response.getheader("Content-Security-Policy") or ""
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert response.getheader("Referrer-Policy") == "no-referrer"
        assert response.getheader("X-Frame-Options") == "DENY"
        assert response.getheader("Cache-Control") == "no-store"
        assert response.getheader("Strict-Transport-Security") is None  # plain HTTP: HSTS would mean nothing
        assert response.getheader("Server") == "sct-agent"
        # A route never sees credentials.
        assert "authorization" not in page.routes.seen[-1].headers
        assert "cookie" not in page.routes.seen[-1].headers
        assert page.routes.seen[-1].client == "127.0.0.1"

        head, head_body = page.get("/", method="HEAD")
        assert (head.status, head_body, head.getheader("Content-Length")) == (200, b"", str(len(PAGE)))

        static, _ = page.get("/static/app.js")
        assert static.getheader("Cache-Control") == "max-age=60"  # a route may let a static file be cached
        assert static.getheader("X-Frame-Options") == "DENY"  # but not change a security header

        missing, _ = page.get("/nothing-here")
        assert missing.status == 404
        failing, _ = page.get("/boom")
        assert failing.status == 500
        assert requests(page.metrics, "served") == 3
        assert requests(page.metrics, "not_found") == 1
        assert requests(page.metrics, "failed") == 1


def test_the_path_is_decoded_and_the_query_given_to_the_route() -> None:
    with serve(StatusPageConfig(listen="127.0.0.1:0")) as page:
        page.get("/a%20b?series=7&series=8&empty=")
        seen = page.routes.seen[-1]
        assert seen.path == "/a b"
        assert dict(seen.query) == {"series": "7", "empty": ""}
        for bad in ("/../etc/passwd", "/a/%2e%2e/b", "/%ff"):
            response, _ = page.get(bad)
            assert response.status == 400, bad
        assert refused(page.metrics, "bad_request") == 3


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head_the_rest_refused_with_405_counted_and_logged(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    with serve(StatusPageConfig(listen="127.0.0.1:0")) as page:
        caplog.set_level(logging.INFO, logger="agent.status_page")
        response, _ = page.get("/?q=secret-in-query", method=method, body=b"x" * 100)
        assert response.status == 405
        assert response.getheader("Allow") == "GET, HEAD"
        assert response.getheader("Connection") == "close"  # the body was not read: the connection ends
        assert refused(page.metrics, "method") == 1
        assert page.routes.seen == []
        (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert f"127.0.0.1 {method} /: method {method}" in line
        assert "secret-in-query" not in line


def test_a_dns_rebinding_host_is_refused_on_an_unauthenticated_page() -> None:
    with serve(StatusPageConfig(listen="127.0.0.1:0")) as page:
        response, _ = page.get("/", {"Host": "attacker.example:9110"})
        assert response.status == 400
        for host in (f"localhost:{page.port}", f"127.0.0.1:{page.port}", "[::1]"):
            ok, _ = page.get("/", {"Host": host})
            assert ok.status == 200, host
        assert refused(page.metrics, "bad_request") == 1


# ------------------------------------------------------------------------------------------------ basic auth


def test_basic_auth_lets_in_the_right_password_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    users = tmp_path / "page-users"
    set_user(users, "technologist", "correct horse battery")
    set_user(users, "physicist", "another secret value")
    config = StatusPageConfig(listen="127.0.0.1:0", auth="basic", basic_users_file=users)
    with serve(config) as page:
        caplog.set_level(logging.INFO, logger="agent.status_page")
        ok, body = page.get("/", basic("technologist", "correct horse battery"))
        assert (ok.status, body) == (200, PAGE)
        again, _ = page.get(
            "/", basic("technologist", "correct horse battery")
        )  # remembered: no second PBKDF2
        assert again.status == 200

        missing, _ = page.get("/")
        assert missing.status == 401
        assert missing.getheader("WWW-Authenticate") == 'Basic realm="sct-agent status page", charset="UTF-8"'
        wrong, _ = page.get("/", basic("technologist", "wrong password!"))
        unknown, _ = page.get("/", basic("nobody", "correct horse battery"))
        other_scheme, _ = page.get("/", {"Authorization": "Bearer correct horse battery"})
        garbage, _ = page.get("/", {"Authorization": "Basic !!!not-base64"})
        assert {r.status for r in (wrong, unknown, other_scheme, garbage)} == {401}

        assert refused(page.metrics, "no_credentials") == 1
        assert refused(page.metrics, "bad_credentials") == 4
        assert len(page.routes.seen) == 2
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "status page refused 127.0.0.1 GET /: no credentials (401)" in text
        assert "wrong user name or password (401)" in text
        assert "correct horse" not in text and "wrong password" not in text and "nobody" not in text


def test_wrong_passwords_from_one_address_are_throttled(tmp_path: Path) -> None:
    users = tmp_path / "page-users"
    set_user(users, "technologist", "correct horse battery")
    config = StatusPageConfig(listen="127.0.0.1:0", auth="basic", basic_users_file=users)
    with serve(config) as page:
        for _ in range(MAX_FAILURES):
            wrong, _ = page.get("/", basic("technologist", "guess guess"))
            assert wrong.status == 401
        throttled, _ = page.get("/", basic("technologist", "correct horse battery"))
        assert throttled.status == 429
        assert int(throttled.getheader("Retry-After") or "0") >= 1
        assert refused(page.metrics, "throttled") == 1
        assert refused(page.metrics, "bad_credentials") == MAX_FAILURES


def test_a_new_user_is_let_in_without_a_restart(tmp_path: Path) -> None:
    users = tmp_path / "page-users"
    set_user(users, "technologist", "correct horse battery")
    config = StatusPageConfig(listen="127.0.0.1:0", auth="basic", basic_users_file=users)
    with serve(config) as page:
        assert page.get("/", basic("physicist", "a new password"))[0].status == 401
        set_user(users, "physicist", "a new password")
        assert page.get("/", basic("physicist", "a new password"))[0].status == 200
        users.chmod(0o644)  # made readable by others while running: nobody is let in until it is fixed
        assert page.get("/", basic("physicist", "a new password"))[0].status == 401


# ----------------------------------------------------------------------------------------------------- token


def test_a_bearer_token_is_let_in_and_a_wrong_or_missing_one_refused(tmp_path: Path) -> None:
    config, token = token_config(tmp_path)
    with serve(config) as page:
        ok, body = page.get("/", {"Authorization": f"Bearer {token}"})
        assert (ok.status, body) == (200, PAGE)
        wrong, _ = page.get("/", {"Authorization": f"Bearer {token[:-1]}x"})
        missing, _ = page.get("/")
        assert (wrong.status, missing.status) == (401, 401)
        assert missing.getheader("WWW-Authenticate") == 'Bearer realm="sct-agent status page"'
        assert refused(page.metrics, "bad_credentials") == 1
        assert refused(page.metrics, "no_credentials") == 1


def test_a_kiosk_opens_the_token_url_once_and_carries_on_with_a_cookie(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    config, token = token_config(tmp_path, certificate)
    with serve(config, cafile=certificate[0]) as page:
        assert page.server.url == f"https://127.0.0.1:{page.port}/"
        redirect, body = page.get(f"/board?series=7&token={token}")
        assert (redirect.status, body) == (303, b"")
        assert redirect.getheader("Location") == "/board?series=7"
        cookie = redirect.getheader("Set-Cookie") or ""
        name, _, rest = cookie.partition("=")
        value = rest.split(";")[0]
        assert name == COOKIE_NAME_TLS
        assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/"} <= {p.strip() for p in rest.split(";")[1:]}
        assert token not in cookie  # the cookie does not hold the token
        assert page.routes.seen == []  # the redirect is the server's

        ok, body = page.get("/board?series=7", {"Cookie": f"other=1; {name}={value}"})
        assert (ok.status, body) == (404, b"404 Not Found\n")  # let in (no such route here)
        assert page.routes.seen[-1].query == {"series": "7"}
        page_ok, _ = page.get("/", {"Cookie": f"{name}={value}"})
        assert page_ok.status == 200
        assert page_ok.getheader("Strict-Transport-Security") == "max-age=31536000"

        forged, _ = page.get("/", {"Cookie": f"{name}={token}"})  # the token itself is not a cookie
        assert forged.status == 401
        wrong_url, _ = page.get("/?token=not-the-token")
        assert wrong_url.status == 401
        assert wrong_url.getheader("Set-Cookie") is None

        create_token_file(config.token_file or Path(), replace=True)  # a new token ends the old cookies
        old, _ = page.get("/", {"Cookie": f"{name}={value}"})
        assert old.status == 401


def test_the_token_redirect_never_leaves_the_host(tmp_path: Path) -> None:
    config, token = token_config(tmp_path)
    with serve(config) as page:
        redirect, _ = page.get(f"//attacker.example/x?token={token}")
        assert redirect.status == 303
        assert redirect.getheader("Location") == "/attacker.example/x"
        assert (redirect.getheader("Set-Cookie") or "").startswith(f"{COOKIE_NAME}=")
        assert "Secure" not in (redirect.getheader("Set-Cookie") or "")  # plain HTTP on loopback


# ------------------------------------------------------------------------------------------------------ TLS


def test_tls_serves_a_verified_certificate_and_refuses_plain_http(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    config, token = token_config(tmp_path, certificate)
    with serve(config, cafile=certificate[0]) as page:
        ok, _ = page.get("/", {"Authorization": f"Bearer {token}"})
        assert ok.status == 200
        plain = http.client.HTTPConnection("127.0.0.1", page.port, timeout=WAIT_S)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/")
            plain.getresponse().read()
        plain.close()
        page.server.stop()  # joins the connection threads, so the refusal is counted by now
        assert refused(page.metrics, "tls") == 1


def test_tls_and_auth_are_required_off_loopback(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    token_file = tmp_path / "token"
    create_token_file(token_file)
    with pytest.raises(ConfigError) as no_tls:
        StatusPageConfig(listen="0.0.0.0:9110", auth="token", token_file=token_file)
    assert no_tls.value.attribute == "status_page.tls_certificate"
    assert "reachable from other machines, so the page needs TLS" in str(no_tls.value)
    cert, key = certificate
    with pytest.raises(ConfigError) as no_auth:
        StatusPageConfig(listen="10.1.2.3:9110", tls_certificate=cert, tls_key=key)
    assert no_auth.value.attribute == "status_page.auth"
    assert "'basic' or 'token'" in str(no_auth.value)
    StatusPageConfig(
        listen="0.0.0.0:9110", auth="token", token_file=token_file, tls_certificate=cert, tls_key=key
    )
    StatusPageConfig(listen="localhost:9110")  # loopback: neither needed


@pytest.mark.parametrize("which", ["token_file", "tls_key", "basic_users_file"])
def test_a_credential_file_others_can_read_is_refused_naming_the_mode(
    tmp_path: Path, certificate: tuple[Path, Path], which: str
) -> None:
    folder = tmp_path / "tls"
    folder.mkdir()
    cert, key = make_certificate(folder, "own")
    config, _ = token_config(tmp_path, (cert, key))
    if which == "basic_users_file":
        set_user(tmp_path / "users", "technologist", "correct horse battery")
        config = StatusPageConfig(
            listen="127.0.0.1:0",
            auth="basic",
            basic_users_file=tmp_path / "users",
            tls_certificate=cert,
            tls_key=key,
        )
    path = getattr(config, which)
    path.chmod(0o644)
    server = StatusPageServer(config, Routes(), AgentMetrics())
    with pytest.raises(ConfigError) as error:
        server.start()
    message = str(error.value)
    assert error.value.attribute == f"status_page.{which}"
    assert f"found mode 0644 (-rw-r--r--) on '{path}'" in message
    assert f"mode 0600 or 0400 (no access for group or others: chmod 600 {path})" in message
    assert server.url == ""


def test_a_certificate_and_key_that_do_not_load_are_refused_with_ssls_reason(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, _ = certificate
    _, other_key = make_certificate(tmp_path, "other")
    token_file = tmp_path / "token"
    create_token_file(token_file)
    mismatched = StatusPageConfig(
        listen="127.0.0.1:0", auth="token", token_file=token_file, tls_certificate=cert, tls_key=other_key
    )
    with pytest.raises(ConfigError) as error:
        StatusPageServer(mismatched, Routes(), AgentMetrics()).start()
    assert error.value.attribute == "status_page.tls_key"
    assert f"a key that does not load with the certificate: '{other_key}'" in str(error.value)
    assert "ssl: KEY_VALUES_MISMATCH" in str(error.value)

    not_a_cert = StatusPageConfig(
        listen="127.0.0.1:0",
        auth="token",
        token_file=token_file,
        tls_certificate=other_key,
        tls_key=other_key,
    )
    with pytest.raises(ConfigError) as error:
        StatusPageServer(not_a_cert, Routes(), AgentMetrics()).start()
    assert error.value.attribute == "status_page.tls_certificate"
    assert "NO_CERTIFICATE_OR_CRL_FOUND" in str(error.value)

    missing = StatusPageConfig(
        listen="127.0.0.1:0",
        auth="token",
        token_file=tmp_path / "absent",
        tls_certificate=cert,
        tls_key=certificate[1],
    )
    with pytest.raises(ConfigError) as error:
        StatusPageServer(missing, Routes(), AgentMetrics()).start()
    assert error.value.attribute == "status_page.token_file"
    assert "No such file or directory" in str(error.value)


# --------------------------------------------------------------------------------------------- event streams


def read_event(response: http.client.HTTPResponse) -> bytes:
    lines: list[bytes] = []
    while True:
        line = response.fp.readline()
        if not line:
            return b"".join(lines)
        if line == b"\n":
            return b"".join(lines)
        lines.append(line)


def hang_up(stream: tuple[http.client.HTTPConnection, http.client.HTTPResponse]) -> None:
    """Close the client's side for real (the response holds the socket open after the connection's close)."""
    connection, response = stream
    response.close()
    connection.close()


def open_stream(page: Served) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = page.connect()
    connection.request("GET", "/events")
    return connection, connection.getresponse()


def test_an_event_stream_sends_each_event_and_stop_ends_it() -> None:
    routes = Routes(events=4)
    with serve(StatusPageConfig(listen="127.0.0.1:0"), routes) as page:
        connection, response = open_stream(page)
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        assert response.getheader("Cache-Control") == "no-store"
        assert [read_event(response) for _ in range(4)] == [
            f"event: board\ndata: {n}\n".encode() for n in range(1, 5)
        ]
        assert read_event(response) == b": keep-alive\n"
        assert open_streams(page.metrics) == 1
        page.server.stop()  # the iterator is still running: stop must not wait for it
        assert response.read() == b""  # the client sees the end of the stream
        hang_up((connection, response))
        routes.release.set()
        assert routes.streams_closed.acquire(timeout=WAIT_S)  # and the route's iterator was closed
        assert open_streams(page.metrics) == 0


def test_a_client_that_goes_away_closes_its_stream() -> None:
    routes = Routes()
    with serve(StatusPageConfig(listen="127.0.0.1:0"), routes) as page:
        connection, response = open_stream(page)
        read_event(response)
        hang_up((connection, response))
        assert routes.streams_closed.acquire(timeout=WAIT_S)
        ok, _ = page.get("/")
        assert ok.status == 200


def test_max_clients_bounds_the_event_streams(caplog: pytest.LogCaptureFixture) -> None:
    with serve(StatusPageConfig(listen="127.0.0.1:0", max_clients=2)) as page:
        first, second = open_stream(page), open_stream(page)
        for _, response in (first, second):
            assert read_event(response) == b"event: board\ndata: 1\n"
        busy, body = page.get("/events")
        assert busy.status == 503
        assert busy.getheader("Retry-After") == "5"
        assert b"too many pages open" in body
        assert refused(page.metrics, "busy") == 1
        assert open_streams(page.metrics) == 2
        ok, _ = page.get("/")  # pages still load
        assert ok.status == 200
        hang_up(first)
        assert page.routes.streams_closed.acquire(timeout=WAIT_S)
        third = open_stream(page)
        assert read_event(third[1]) == b"event: board\ndata: 1\n"
        hang_up(second)
        hang_up(third)


# ---------------------------------------------------------------------------------------------------- limits


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_oversized_request_lines_and_headers_are_refused() -> None:
    with serve(StatusPageConfig(listen="127.0.0.1:0")) as page:
        long_line = raw_exchange(page.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert long_line.startswith(b"HTTP/1.1 414 ")
        big_header = raw_exchange(
            page.port, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"
        )
        assert big_header.startswith(b"HTTP/1.1 431 ")
        many = b"".join(b"X-H%d: %s\r\n" % (n, b"c" * 1000) for n in range(40))
        too_many = raw_exchange(page.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n")
        assert too_many.startswith(b"HTTP/1.1 431 ")
        garbage = raw_exchange(page.port, b"\x16\x03\x01 hello\r\n\r\n")
        assert b" 400 " in garbage.split(b"\r\n")[0]
        assert b"Content-Security-Policy" in garbage
        assert refused(page.metrics, "bad_request") == 4


def test_a_client_that_trickles_its_request_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_handler, "REQUEST_HEAD_TIMEOUT_S", 0.5)
    monkeypatch.setattr(http_server, "REQUEST_HEAD_TIMEOUT_S", 0.5)
    with serve(StatusPageConfig(listen="127.0.0.1:0")) as page:
        with socket.create_connection(("127.0.0.1", page.port), timeout=WAIT_S) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
            assert sock.recv(1024) == b""  # the server closed it
        ok, _ = page.get("/")
        assert ok.status == 200


def test_repeated_refusals_from_one_address_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with serve(StatusPageConfig(listen="127.0.0.1:0")) as page:
        caplog.set_level(logging.INFO, logger="agent.status_page")
        for n in range(20):
            page.get(f"/admin/{n}", method="POST")
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert lines == [
            "status page refused 127.0.0.1 POST /admin/0: method POST (the page is read-only) (405)"
        ]
        assert refused(page.metrics, "method") == 20


def test_stop_is_safe_before_start_and_twice_and_listen_off_serves_nothing() -> None:
    server = StatusPageServer(StatusPageConfig(listen=""), Routes(), AgentMetrics())
    server.stop()
    server.start()
    assert server.url == ""
    server.stop()
    server.stop()


def test_a_port_in_use_is_refused_naming_the_address() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = StatusPageServer(StatusPageConfig(listen=f"127.0.0.1:{port}"), Routes(), AgentMetrics())
        with pytest.raises(http_server.StatusPageError) as error:
            server.start()
        assert f"127.0.0.1:{port}" in str(error.value)
        assert error.value.attribute == "status_page.listen"


# ------------------------------------------------------------------------ configuration, commands, doctor


def test_the_section_loads_from_toml_with_paths_relative_to_the_file_and_from_the_environment(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site" / "agent.toml"
    path.parent.mkdir()
    path.write_text(
        '[status_page]\nlisten = "0.0.0.0:9443"\ntls_certificate = "tls/page.crt"\ntls_key = "tls/page.key"\n'
        'auth = "token"\ntoken_file = "page-token"\nmax_clients = 4\n'
    )
    config = load_config(path, environ={}).status_page
    assert config.tls_certificate == tmp_path / "site" / "tls" / "page.crt"
    assert config.token_file == tmp_path / "site" / "page-token"
    assert (config.host, config.port, config.max_clients) == ("0.0.0.0", 9443, 4)
    off = load_config(path, environ={"SCT_AGENT_STATUS_PAGE_LISTEN": ""}).status_page
    assert not off.enabled
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={"SCT_AGENT_STATUS_PAGE_AUTH": "none"})
    assert "environment variable SCT_AGENT_STATUS_PAGE_AUTH" in str(error.value)
    assert "reachable from other machines" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={"SCT_AGENT_STATUS_PAGE_LISTEN": "9110"})
    assert "status_page.listen" in str(error.value) and "'' = no status page" in str(error.value)


def sct_agent(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], input=stdin, capture_output=True, text=True, check=False
    )


def test_page_user_writes_a_private_file_of_salted_hashes_that_the_server_accepts(tmp_path: Path) -> None:
    users = tmp_path / "page-users"
    made = sct_agent("page-user", "technologist", "--file", str(users), stdin="correct horse battery\n")
    assert made.returncode == 0, made.stderr
    assert "Added technologist" in made.stdout and 'auth = "basic"' in made.stdout
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    text = users.read_text()
    assert "correct horse" not in text
    (entry,) = [line for line in text.splitlines() if line.startswith("technologist:")]
    assert entry.startswith("technologist:pbkdf2_sha256$600000$")
    changed = sct_agent("page-user", "technologist", "--file", str(users), stdin="a second password\n")
    assert "Changed the password of technologist" in changed.stdout
    assert sct_agent("page-user", "physicist", "--file", str(users), stdin="short\n").returncode == 1
    assert sct_agent("page-user", "bad:name", "--file", str(users), stdin="long enough pw\n").returncode == 1
    config = StatusPageConfig(listen="127.0.0.1:0", auth="basic", basic_users_file=users)
    with serve(config) as page:
        assert page.get("/", basic("technologist", "a second password"))[0].status == 200
        assert page.get("/", basic("technologist", "correct horse battery"))[0].status == 401
    removed = sct_agent("page-user", "technologist", "--file", str(users), "--delete")
    assert removed.returncode == 0
    assert "technologist:" not in users.read_text()


def test_page_token_writes_a_private_random_token_and_never_overwrites_by_accident(tmp_path: Path) -> None:
    token_file = tmp_path / "page-token"
    made = sct_agent("page-token", "--file", str(token_file))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 43 and f"/?token={token}" in made.stdout
    again = sct_agent("page-token", "--file", str(token_file))
    assert again.returncode == 1 and "--replace" in again.stderr
    assert token_file.read_text().strip() == token
    replaced = sct_agent("page-token", "--file", str(token_file), "--replace")
    assert replaced.returncode == 0 and token_file.read_text().strip() != token


def test_doctor_checks_the_page_files_as_the_server_loads_them(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    config, _ = token_config(tmp_path, certificate)
    agent_config = dataclasses.replace(AgentConfig(), status_page=config)
    lines = {check.attribute: check for check in check_status_page(agent_config)}
    assert {check.status for check in lines.values()} == {Status.OK}
    assert set(lines) == {
        "status_page.listen",
        "status_page.tls_certificate",
        "status_page.tls_key",
        "status_page.token_file",
    }
    assert config.token_file is not None
    config.token_file.chmod(0o640)
    (failed,) = check_status_page(agent_config)
    assert (failed.status, failed.attribute) == (Status.FAIL, "status_page.token_file")
    assert "found mode 0640 (-rw-r-----)" in failed.message
    off = dataclasses.replace(AgentConfig(), status_page=StatusPageConfig(listen=""))
    assert [c.status for c in check_status_page(off)] == [Status.OK]


def test_connections_beyond_the_bound_are_turned_away_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_server, "MAX_OTHER_CONNECTIONS", 0)
    with serve(StatusPageConfig(listen="127.0.0.1:0", max_clients=1)) as page:
        with socket.create_connection(("127.0.0.1", page.port), timeout=WAIT_S) as idle:
            idle.sendall(b"GET / HTTP/1.1\r\n")  # holds the one connection allowed
            turned_away = raw_exchange(page.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert turned_away.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"Retry-After: 5\r\n" in turned_away
        assert refused(page.metrics, "busy") == 1


def test_head_on_an_event_stream_sends_its_headers_without_running_it() -> None:
    routes = Routes()
    with serve(StatusPageConfig(listen="127.0.0.1:0"), routes) as page:
        response, body = page.get("/events", method="HEAD")
        assert (response.status, body) == (200, b"")
        assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        assert not routes.streams_closed.acquire(blocking=False)  # the iterator was never opened


def test_an_ipv6_loopback_address_is_served() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with serve(StatusPageConfig(listen="[::1]:0")) as page:
        assert page.server.url == f"http://[::1]:{page.port}/"
        connection = http.client.HTTPConnection("::1", page.port, timeout=WAIT_S)
        connection.request("GET", "/")
        assert connection.getresponse().status == 200
        connection.close()


def test_the_agent_refuses_an_unsafe_page_key_before_it_loads_the_engine(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    """A page key others can read stops ``AgentService.start`` at its first step, naming the key and the mode,
    before minutes of engine warm-up: the technologist's page never runs on a key anyone could have copied."""
    cert, key = make_certificate(tmp_path, "loose")
    key.chmod(0o644)
    root = tmp_path / "agent"
    config = agent_config(root, write_test_protocol(root / "protocols"), write_test_model(root / "model"))
    page, _ = token_config(tmp_path, (cert, key))
    service = AgentService(dataclasses.replace(config, status_page=page))
    with pytest.raises(ConfigError, match=r"status_page\.tls_key.*0644") as refused:
        service.start()
    assert "chmod 600" in str(refused.value)
    assert service.manifest is None  # stopped before the model was even read
