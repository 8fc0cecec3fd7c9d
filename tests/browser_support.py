"""Headless Chromium driven over the Chrome DevTools Protocol on a pipe, with the standard library only.

Why not playwright: it pins a Chromium build of its own (a download of ~150 MB, or a system browser whose
protocol version it was not released against), a Node.js driver, and a pip package to keep in step with both.
The page test needs four commands (open a tab, set the viewport, evaluate an expression, take a screenshot);
Chromium's ``--remote-debugging-pipe`` speaks them as NUL-terminated JSON on file descriptors 3 and 4, with no
port to pick and nothing to download, against whatever Chromium the distribution ships. CI installs Debian's
``chromium`` package (.ci/run).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

BASH = shutil.which("bash") or "/bin/bash"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)"
)
#: The console beside the scanner.
VIEWPORT = (1920, 1080)
COMMAND_TIMEOUT_S = 60.0


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium process with one tab; ``call`` sends a DevTools command to that tab."""

    def __init__(self, profile: Path, log: Path) -> None:
        assert CHROMIUM is not None
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        flags = [
            "--headless",
            "--no-sandbox",  # CI runs as root; the sandbox needs user namespaces a container may not have
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--mute-audio",
            "--hide-scrollbars",
            "--force-color-profile=srgb",
            f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # The browser reads commands on fd 3 and writes replies on fd 4: bash moves the pipe ends there (dash
        # takes single-digit descriptors only).
        script = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}'
        with log.open("w") as log_file:
            self._process = subprocess.Popen(
                [BASH, "-c", script, CHROMIUM, *flags],
                pass_fds=(to_browser_read, from_browser_write),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._log = log
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="chromium-devtools", daemon=True)
        self._reader.start()
        self._session = ""
        try:
            target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
            attached = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})
            self._session = attached["sessionId"]
            self.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False},
            )
        except BrowserError:
            self.close()
            raise

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._send(method, params or {}, session=self._session)

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the tab (JSON-serialisable values only)."""
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        """Poll ``expression`` until it is truthy; returns its value. ``timeout_s`` bounds a hung test only."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise BrowserError(f"the page never showed {what} within {timeout_s:.0f} s (last value {value!r})")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(BrowserError):
            self._send("Browser.close", {}, timeout_s=10.0)
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_browser)
        self._reader.join(10)
        os.close(self._from_browser)

    # --------------------------------------------------------------------------------------------- protocol

    def _send(
        self,
        method: str,
        params: dict[str, Any],
        *,
        session: str | None = None,
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> dict[str, Any]:
        with self._cond:
            self._next_id += 1
            number = self._next_id
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except OSError as error:
            raise BrowserError(f"{method}: the browser is gone ({error}); see {self._log}") from error
        reply = self._wait(lambda: self._replies.pop(number, None), timeout_s, method)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def _wait(
        self, take: Callable[[], dict[str, Any] | None], timeout_s: float, method: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                reply = take()
                if reply is not None:
                    return reply
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise BrowserError(f"{method}: no reply from the browser; see {self._log}")
                self._cond.wait(min(left, 0.5))

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._cond:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:  # events (no id) are not needed: the test polls the page
                        self._replies[message["id"]] = message
                self._cond.notify_all()
