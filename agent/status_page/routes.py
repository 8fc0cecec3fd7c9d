"""What the status page's URLs answer: the page, its two static files, the board as JSON, the live event stream
and the preview PNGs.

The server (:mod:`agent.status_page.http_server`) has already authenticated the request and answers only GET
and HEAD; a route only looks things up. ``/events`` is a server-sent-events stream that sends the whole board
(a few kilobytes) when a browser connects and after every change, at most :data:`MAX_UPDATES_PER_S` times a
second, with a comment line every :data:`KEEPALIVE_S` seconds in between: a browser that reconnects (EventSource
does so by itself) is whole again with its first message, and there is nothing to replay.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Final

from agent.status_page.board import StatusBoard
from agent.status_page.http_server import EventStream, PageRequest, PageResponse, Route
from agent.status_page.preview import PreviewRenderer

#: Board updates sent per second at most; changes in between are coalesced into the next one.
MAX_UPDATES_PER_S: Final = 5.0
#: Seconds between keep-alive comments when nothing changes (the server notices a closed tab on a write).
KEEPALIVE_S: Final = 2.0
#: How long the browser waits before reconnecting a dropped stream, ms (sent as the SSE ``retry`` field).
RECONNECT_MS: Final = 1000

_ASSETS: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
}
_PREVIEW: Final = re.compile(r"^/preview/([0-9a-f]{1,64})\.png$")
_NO_STORE: Final = (("Cache-Control", "no-store"),)


def load_assets() -> Mapping[str, bytes]:
    """The page's files, read once (they ship in the package, next to this module)."""
    folder = resources.files("agent.status_page") / "assets"
    return {name: (folder / name).read_bytes() for name, _ in set(_ASSETS.values())}


def page_route(board: StatusBoard, previews: PreviewRenderer) -> Route:
    """The :data:`~agent.status_page.http_server.Route` of the status page."""
    assets = load_assets()

    def route(request: PageRequest) -> PageResponse | EventStream | None:
        path = request.path
        if path in _ASSETS:
            name, content_type = _ASSETS[path]
            return PageResponse(200, content_type, assets[name], _NO_STORE)
        if path == "/state.json":
            _, document = board.snapshot_json()
            return PageResponse(200, "application/json", document, _NO_STORE)
        if path == "/events":
            return EventStream(lambda: BoardEvents(board))
        match = _PREVIEW.match(path)
        if match is not None:
            png = previews.png(match.group(1))
            return None if png is None else PageResponse(200, "image/png", png, _NO_STORE)
        return None

    return route


class BoardEvents(Iterator[bytes]):
    """One browser's event stream: the board on connect and after each change, keep-alives in between.

    ``close`` may come from another thread (the server stopping) while ``__next__`` sleeps on the board: it
    wakes the board so the sleep ends at once.
    """

    def __init__(
        self,
        board: StatusBoard,
        *,
        keepalive_s: float = KEEPALIVE_S,
        max_updates_per_s: float = MAX_UPDATES_PER_S,
    ) -> None:
        self._board = board
        self._keepalive_s = keepalive_s
        self._interval_s = 1.0 / max_updates_per_s
        self._sent = -1
        self._sent_at = 0.0
        self._closed = False

    def __iter__(self) -> BoardEvents:
        return self

    def __next__(self) -> bytes:
        if self._closed or self._board.closed:
            raise StopIteration
        if self._sent < 0:
            return self._state(first=True)
        # Coalesce: at most one update per interval, whatever the board does meanwhile.
        pause = self._sent_at + self._interval_s - time.monotonic()
        if pause > 0:
            self._board.wait(2**62, pause, stop=lambda: self._closed)
        version = self._board.wait(self._sent, self._keepalive_s, stop=lambda: self._closed)
        if self._closed or self._board.closed:
            raise StopIteration
        if version == self._sent:
            return b": keep-alive\n\n"
        return self._state(first=False)

    def close(self) -> None:
        self._closed = True
        self._board.wake()

    def _state(self, *, first: bool) -> bytes:
        version, document = self._board.snapshot_json()
        self._sent, self._sent_at = version, time.monotonic()
        head = f"retry: {RECONNECT_MS}\n" if first else ""
        return f"{head}id: {version}\nevent: board\ndata: ".encode() + document + b"\n\n"
