"""systemd's notify protocol (sd_notify(3)) in a few lines, so the agent needs neither libsystemd nor a package.

With ``Type=notify`` systemd considers the agent started only when it sends ``READY=1`` (after the model is loaded
and the sockets are bound, not when the process exists), and with ``WatchdogSec=`` it restarts an agent whose
pipeline stops sending ``WATCHDOG=1``: a hung thread is caught, not just a dead process.

Outside systemd ``$NOTIFY_SOCKET`` is unset and every call is a cheap no-op returning False, so the same code
runs in a terminal, in tests and in a container.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
_MICROSECONDS_PER_SECOND = 1_000_000
#: A notification is a few bytes on a local socket; if systemd cannot take it within this, it is not listening.
SEND_TIMEOUT_S = 1.0


def _address(value: str) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` for Linux's abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def notify(message: str) -> bool:
    """Send ``message`` (newline-separated ``KEY=value`` lines) to systemd; False when not under systemd.

    A failed send is logged and returns False rather than raising: losing a status line must never stop the
    pipeline, and a missed watchdog ping is exactly what systemd's watchdog is there to notice.
    """
    value = os.environ.get(NOTIFY_SOCKET, "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        logger.warning(
            "%s=%r: only a path or an @abstract name is supported; not notifying", NOTIFY_SOCKET, value
        )
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(message.encode("utf-8"), address)
    except OSError as exc:
        logger.warning("sd_notify to %s=%r failed: %s", NOTIFY_SOCKET, value, exc)
        return False
    return True


def _one_line(text: str) -> str:
    """A STATUS value may not contain a newline: the protocol would read the rest as another assignment."""
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Start-up is done: systemd ends ``Type=notify`` start-up and starts the units ordered after ours."""
    message = "READY=1"
    if status:
        message += f"\nSTATUS={_one_line(status)}"
    return notify(message)


def stopping() -> bool:
    """Shutdown has begun, so systemd does not take a slow drain for a hang."""
    return notify("STOPPING=1")


def watchdog_ping() -> bool:
    """Proof of life; send at least every ``watchdog_interval_s() / 2`` seconds."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """A one-line status that ``systemctl status`` shows (e.g. the series in flight)."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval_s() -> float | None:
    """systemd's watchdog timeout for this process in seconds, or None when there is none.

    None when ``WATCHDOG_USEC`` is unset, not a positive integer, or when ``WATCHDOG_PID`` names another process
    (a child inheriting the environment must not think it is the one being watched).
    """
    usec_text = os.environ.get(WATCHDOG_USEC, "")
    pid_text = os.environ.get(WATCHDOG_PID)
    if pid_text is not None and pid_text.strip() != str(os.getpid()):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        if usec_text:
            logger.warning("%s=%r is not an integer; no watchdog", WATCHDOG_USEC, usec_text)
        return None
    return usec / _MICROSECONDS_PER_SECOND if usec > 0 else None
