"""Where the snapshot socket is when nobody said: one rule, shared by the agent's config and every client.

docs/protocol.md §1: the snapshot (ROUTER) endpoint is the broadcast (PUB) endpoint's TCP port + 1, or the
broadcast endpoint with ``.snapshot`` appended for ipc and inproc. No dependencies, so the config loader and
the client library can both import it cheaply.
"""

from __future__ import annotations


def default_snapshot_endpoint(endpoint: str) -> str:
    """The snapshot endpoint beside ``endpoint``; TCP port 0 (any free port) stays 0."""
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint.rpartition(":")
        if sep and port.isdigit() and host != "tcp":
            number = int(port)
            return f"{host}:{number + 1 if number else 0}"
    return endpoint + ".snapshot"
