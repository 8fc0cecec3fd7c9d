"""What a status page route takes and returns (re-exported by :mod:`agent.status_page.http_server`).

A route is a plain function of a :class:`PageRequest`; it never sees the socket, the credentials or anything the
server decides (status of refused requests, security headers, limits), so it cannot get them wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PageRequest:
    """An authenticated GET or HEAD, as a route sees it (no credentials: no Authorization, no Cookie header)."""

    path: str  # URL path, percent-decoded, without the query
    query: Mapping[str, str]  # first value of each query parameter (the kiosk's ``token`` removed)
    headers: Mapping[str, str]  # lower-case names
    client: str  # peer address (for logs: never a patient datum)


@dataclass(frozen=True, slots=True)
class PageResponse:
    status: int
    content_type: str  # e.g. "text/html; charset=utf-8", "image/png", "application/json"
    body: bytes
    #: Extra headers, e.g. ("Cache-Control", "max-age=3600") for a static file (the default is no-store); the
    #: server's own headers (security, Content-Type/-Length, Connection, Set-Cookie) cannot be set here.
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class EventStream:
    """A server-sent-events response: ``open()`` returns an iterator of complete SSE chunks (bytes such as
    b"event: board\\ndata: {...}\\n\\n", or b": keep-alive\\n\\n"); the server writes each as it comes and ends the
    response when the iterator ends, the client goes away, or the server stops (it then calls the iterator's
    ``close()`` if it has one). The iterator must yield at least every few seconds (a keep-alive) so a dead client
    is noticed."""

    open: Callable[[], Iterator[bytes]]


Route = Callable[[PageRequest], PageResponse | EventStream | None]  # None -> 404
