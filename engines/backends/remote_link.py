"""How an agent reaches a remote inference server: address, security, patience, and what it does when the server
fails. The settings of the ``triton`` backend (engines.backends.triton_client), from the agent's ``[triton]``
configuration section; and the observer the agent's metrics listen through (engines/ never imports agent/).

Faults are classed so each gets the right reaction: a server that is down, too slow or at capacity is retried with
backoff (it may come back within the window's patience); a refusal (wrong token or certificate, a request the
server rejects) or another model is not retried, because asking again gives the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol

from sct_core.errors import SctError


class RemoteOutcome(StrEnum):
    """How one remote call ended: the ``outcome`` label of the agent's remote-call metric."""

    OK = "ok"
    #: Not reachable, or closed the connection (down, restarting, network).
    UNAVAILABLE = "unavailable"
    #: No answer within ``timeout_s`` (a slow or overloaded server).
    TIMEOUT = "timeout"
    #: The server's queue is full: it refused the request at once.
    CAPACITY = "capacity"
    #: Token, certificate or request refused; not retried.
    REFUSED = "refused"
    #: The server computes with another model than the manifest's; not retried.
    MISMATCH = "mismatch"
    #: Anything else the server or the client library raised.
    ERROR = "error"


#: Outcomes worth another attempt after a backoff.
RETRIED: Final = frozenset({RemoteOutcome.UNAVAILABLE, RemoteOutcome.TIMEOUT, RemoteOutcome.CAPACITY})


class RemoteCallObserver(Protocol):
    """What the agent's metrics are told; every method must return at once (it is called on the engine thread)."""

    def remote_call(self, outcome: str, seconds: float) -> None:
        """One call ended with ``outcome`` (a :class:`RemoteOutcome` value) after ``seconds``."""

    def remote_fallback(self) -> None:
        """One window was computed by the local engine because the server failed."""

    def remote_connected(self, up: bool) -> None:
        """The server was reached and its model verified (True), or lost (False)."""


@dataclass(frozen=True, slots=True)
class RemoteLink:
    """Settings of the link to one Triton server; see docs/scale-out.md for each."""

    #: ``host:port`` of the server's gRPC endpoint.
    url: str
    #: Patience for one window: a call without an answer by then counts as a timeout.
    timeout_s: float = 60.0
    #: Calls per window before the window counts as failed (1 = no retry).
    attempts: int = 3
    #: Wait before the second attempt; doubled before each further one.
    backoff_s: float = 0.5
    #: Local backend to compute a window with when the server fails ("" = none: the series fails); ``auto``
    #: picks as the agent would without a server.
    fallback: str = ""
    #: After a failure with a fallback, the server is tried again after this long (doubling up to ``max_retry_s``).
    retry_s: float = 5.0
    max_retry_s: float = 120.0
    #: TLS: the CA that signed the server's certificate (None = plaintext, for a server on this host only).
    tls_ca_file: Path | None = None
    #: TLS client certificate and key, for a server that requires mutual TLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: Agent and server on one host: windows through system shared memory instead of gRPC messages.
    shared_memory: bool = False
    #: File holding the access token the server requires (``sct-agent serve --token-file``); None = none.
    token_file: Path | None = None
    #: Told every call, fallback and connection change (the agent's metrics); None in tools and tests.
    observer: RemoteCallObserver | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        host, sep, port = self.url.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise RemoteLinkError(
                "triton.url", self.url, "host:port of the server's gRPC endpoint, e.g. gpu-1:8001"
            )
        if self.timeout_s <= 0:
            raise RemoteLinkError("triton.timeout_s", self.timeout_s, "a number of seconds > 0")
        if self.attempts < 1:
            raise RemoteLinkError("triton.attempts", self.attempts, "1 or more")
        if self.backoff_s < 0 or self.retry_s <= 0 or self.max_retry_s < self.retry_s:
            raise RemoteLinkError(
                "triton.backoff_s/retry_s/max_retry_s",
                (self.backoff_s, self.retry_s, self.max_retry_s),
                "backoff_s >= 0, retry_s > 0 and max_retry_s >= retry_s",
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise RemoteLinkError(
                "triton.tls_cert_file/tls_key_file",
                (self.tls_cert_file, self.tls_key_file),
                "both (mutual TLS) or neither",
            )
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise RemoteLinkError(
                "triton.tls_ca_file",
                None,
                "the CA of the server's certificate when a client certificate is set",
            )

    @property
    def tls(self) -> bool:
        return self.tls_ca_file is not None

    def token(self) -> str | None:
        """The access token, read when the link connects (a rotated file is picked up at the next reconnect)."""
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RemoteLinkError(
                "triton.token_file",
                str(self.token_file),
                f"a readable file holding the token ({exc.strerror})",
            ) from None
        if not token:
            raise RemoteLinkError(
                "triton.token_file", str(self.token_file), "a file holding a non-empty token"
            )
        return token


class RemoteLinkError(SctError, ValueError):
    """A link setting that cannot work (malformed address, missing certificate or token file)."""

    def __init__(self, attribute: str, found: object, expected: str) -> None:
        super().__init__(
            f"{attribute}: found {found!r}, expected {expected}",
            attribute=attribute,
            found=found,
            expected=expected,
        )


class RemoteInferenceError(SctError, RuntimeError):
    """A window the server did not compute, after every attempt the link allows; ``outcome`` says why."""

    def __init__(self, message: str, *, outcome: RemoteOutcome, server: str) -> None:
        super().__init__(message, attribute="triton.url", found=server, expected="a server that answers")
        self.outcome = outcome
