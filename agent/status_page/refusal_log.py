"""The status page's log of refused requests: one line each, never a credential, never a flood.

A scanner on the hospital network, or a kiosk with a wrong token retrying every second, would otherwise write
thousands of identical lines into the journal and push out the lines that matter. The counter
``sct_agent_page_refused_total{reason}`` counts every refusal; the log says who and why, rate-limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Final

logger = logging.getLogger("agent.status_page.http_server")

#: Refusal log lines: one per (client address, reason) per interval, at most this many per interval in all.
LOG_INTERVAL_S: Final = 60.0
MAX_LOG_LINES_PER_INTERVAL: Final = 30
_MAX_LOG_KEYS: Final = 1024
_MAX_LOGGED_PATH: Final = 120


def printable(path: str) -> str:
    """A request path fit for a log line: bounded, control and non-ASCII characters escaped."""
    text = "".join(
        c if c.isascii() and c.isprintable() else f"\\x{ord(c):02x}" for c in path[:_MAX_LOGGED_PATH]
    )
    return text + ("..." if len(path) > _MAX_LOGGED_PATH else "")


class RefusalLog:
    """One warning line per refused request, rate-limited so that a scan of the network cannot flood the journal.

    Per (client address, reason) one line per ``LOG_INTERVAL_S``, the next one saying how many were left out;
    at most ``MAX_LOG_LINES_PER_INTERVAL`` lines per interval in all, then one summary line. The counter
    ``sct_agent_page_refused_total`` counts every one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: OrderedDict[tuple[str, str], list[float]] = (
            OrderedDict()
        )  # key -> [last logged, left out]
        self._window_start = time.monotonic()
        self._lines = 0
        self._left_out = 0

    def refused(self, client: str, method: str, path: str, reason: str, why: str, status: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._roll(now)
            key = (client, reason)
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < LOG_INTERVAL_S:
                entry[1] += 1
                return
            if self._lines >= MAX_LOG_LINES_PER_INTERVAL:
                self._left_out += 1
                return
            self._lines += 1
            earlier = int(entry[1]) if entry is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > _MAX_LOG_KEYS:
                self._keys.popitem(last=False)
        tail = f"; {earlier} more like it from this address not logged" if earlier else ""
        code = f" ({status})" if status else ""
        # A request without credentials is the first step of every basic-auth login: not a warning.
        level = logging.INFO if reason == "no_credentials" else logging.WARNING
        logger.log(
            level,
            "status page refused %s %s %s: %s%s%s",
            client,
            method or "-",
            printable(path) or "-",
            why,
            code,
            tail,
            extra={"event": "page_refused", "outcome": reason},
        )

    def flush(self) -> None:
        """Say how many lines the overall budget left out, once its interval is over."""
        with self._lock:
            self._roll(time.monotonic())

    def _roll(self, now: float) -> None:
        if now - self._window_start < LOG_INTERVAL_S:
            return
        if self._left_out:
            logger.warning(
                "status page: %d more refused requests not logged in the last %.0f s "
                "(every one is counted in sct_agent_page_refused_total)",
                self._left_out,
                now - self._window_start,
                extra={"event": "page_refused"},
            )
        self._window_start, self._lines, self._left_out = now, 0, 0
