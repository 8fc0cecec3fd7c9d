"""A dependency-free progress bar for long CPU jobs: redraws in place on a terminal, prints lines in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: Minimum seconds between lines when the stream is not a terminal (journald, CI logs).
LOG_INTERVAL_S = 30.0
TTY_INTERVAL_S = 0.5


class Progress:
    def __init__(self, total: int, *, start: int = 0, stream: TextIO | None = None, label: str = "") -> None:
        self.total = total
        self.start = start
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = time.monotonic()
        self._last = 0.0

    def update(self, done: int, **fields: float) -> None:
        now = time.monotonic()
        final = done >= self.total
        if not final and now - self._last < (TTY_INTERVAL_S if self._tty else LOG_INTERVAL_S):
            return
        self._last = now
        rate = (done - self.start) / max(now - self._t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24)
        extra = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
        eta_text = "--:--" if eta == float("inf") else f"{int(eta // 60):02d}:{int(eta % 60):02d}"
        line = f"{self.label}[{bar:<24}] {done}/{self.total} {frac:4.0%} | {extra} | {rate:.2f}/s | ETA {eta_text}"
        if self._tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
