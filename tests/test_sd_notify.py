"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's, by path and in the abstract namespace."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ops import sd_notify

#: A datagram on a local socket arrives at once; this only bounds a test that would otherwise hang.
RECEIVE_TIMEOUT_S = 5.0


class Listener:
    """The receiving end of ``$NOTIFY_SOCKET``, as systemd holds it."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> str:
        return self.sock.recv(4096).decode("utf-8")

    def assert_nothing_sent(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.settimeout(RECEIVE_TIMEOUT_S)


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECEIVE_TIMEOUT_S)
    return sock


@pytest.fixture
def path_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    # A short folder of its own: AF_UNIX paths are limited to 107 bytes and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn") as folder:
        path = str(Path(folder) / "notify")
        with _bound(path) as sock:
            monkeypatch.setenv(sd_notify.NOTIFY_SOCKET, path)
            yield Listener(sock, path)


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    name = f"sct-agent-test-{uuid.uuid4().hex}"
    with _bound("\0" + name) as sock:
        monkeypatch.setenv(sd_notify.NOTIFY_SOCKET, "@" + name)
        yield Listener(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    fixture_name = f"{request.param}_listener"
    result: Listener = request.getfixturevalue(fixture_name)
    return result


def test_not_under_systemd_sends_nothing_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sd_notify.NOTIFY_SOCKET, raising=False)
    assert sd_notify.notify("READY=1") is False
    assert sd_notify.ready("up") is False
    assert sd_notify.watchdog_ping() is False


def test_ready_with_status(listener: Listener) -> None:
    assert sd_notify.ready("watching /srv/mri-export") is True
    assert listener.receive() == "READY=1\nSTATUS=watching /srv/mri-export"


def test_ready_without_status(listener: Listener) -> None:
    assert sd_notify.ready() is True
    assert listener.receive() == "READY=1"


def test_stopping_watchdog_and_status(listener: Listener) -> None:
    assert sd_notify.stopping()
    assert listener.receive() == "STOPPING=1"
    assert sd_notify.watchdog_ping()
    assert listener.receive() == "WATCHDOG=1"
    assert sd_notify.status("series 3 of 4")
    assert listener.receive() == "STATUS=series 3 of 4"


def test_status_newlines_cannot_inject_assignments(listener: Listener) -> None:
    assert sd_notify.status("line one\nREADY=1")
    assert listener.receive() == "STATUS=line one READY=1"


def test_notify_sends_the_message_verbatim_in_utf8(listener: Listener) -> None:
    assert sd_notify.notify("STATUS=µ ±\nEXTEND_TIMEOUT_USEC=5000000")
    assert listener.receive() == "STATUS=µ ±\nEXTEND_TIMEOUT_USEC=5000000"


def test_socket_gone_returns_false_without_raising(
    path_listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    path_listener.sock.close()
    Path(path_listener.env_value).unlink()
    assert sd_notify.watchdog_ping() is False
    assert path_listener.env_value in caplog.text


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_unsupported_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv(sd_notify.NOTIFY_SOCKET, value)
    assert sd_notify.ready() is False
    assert repr(value) in caplog.text


def test_nothing_else_is_sent(listener: Listener) -> None:
    assert sd_notify.stopping()
    assert listener.receive() == "STOPPING=1"
    listener.assert_nothing_sent()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("thirty", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in ((sd_notify.WATCHDOG_USEC, usec), (sd_notify.WATCHDOG_PID, pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
            monkeypatch.setenv(name, pids.get(value, value))
    assert sd_notify.watchdog_interval_s() == expected
