"""Who may read the status page, and over what: TLS, HTTP basic auth, a bearer token and its kiosk cookie.

The page shows no patient data, but it shows what the scanner is doing and it runs on a box beside the
scanner, so off loopback it is served only over TLS and only to people who prove who they are
(:class:`~agent.ops.config.StatusPageConfig` refuses anything else at start-up). Everything here is the Python
standard library (``ssl``, ``hmac``, ``hashlib``, ``secrets``): no dependency to track for security fixes.

Files. The users file, the token file and the TLS key are secrets: they must be regular files that neither the
group nor others can read or write (``chmod 600``), or the agent will not start (:func:`check_private_file`
names the key, the file, the mode found and the mode required). The users and token files are re-read when
they change (a ``stat`` per request), so a new user or a new token needs no restart; a file that became unsafe
or unreadable at run time refuses everyone until it is fixed (fail closed), with one error line per change.

Basic auth. The users file holds salted PBKDF2-SHA256 hashes, never a password (its format and the token
file's: :mod:`agent.status_page.credentials`). A browser sends the password with every
request, and one PBKDF2 costs about 0.2 s of a core, so a successful check is remembered for
``VERIFIED_TTL_S`` under an HMAC of the name, the password and the stored hash made with a key that lives only
in this process (a changed password or users file misses the cache). An unknown name costs the same PBKDF2 as a
known one, so the timing does not tell which names exist, and at most ``MAX_CONCURRENT_HASHES`` run at once.

Token. The token file holds one random token (``sct-agent page-token``: 32 random bytes, URL-safe). A client
sends ``Authorization: Bearer TOKEN``. A kiosk browser cannot set headers, so it opens ``/?token=TOKEN`` once:
the server answers 303 to the same URL without the token, setting a cookie. The cookie's value is an HMAC of a
fixed label keyed with the token, not the token: it cannot be turned back into the token, it survives an agent
restart (the kiosk keeps working), and replacing the token file ends every cookie made with the old token. The
cookie is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends it),
``Path=/``, a session cookie (gone when the browser closes; the kiosk's start URL carries the token again), and
under TLS ``Secure`` with the ``__Host-`` name prefix (the browser sends it only over HTTPS, to this host). The
redirect keeps the token out of the address bar, the history and the page's own links; ``Referrer-Policy:
no-referrer`` keeps it from leaving in a Referer header; the server logs paths without their query.

Comparisons of tokens and cookies are constant-time (``hmac.compare_digest`` of SHA-256 digests, so not even
the length leaks). Wrong credentials from one address are throttled: after ``MAX_FAILURES`` within
``FAILURE_WINDOW_S`` every request from it gets 429 until the window ends, without a PBKDF2, so a password
guesser neither guesses fast nor burns the CPU the inference needs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import ssl
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Final, Generic, TypeVar

from agent.ops.config import ConfigError, StatusPageConfig
from agent.status_page.credentials import (
    REALM,
    cookie_value,
    hash_password,
    parse_token,
    parse_users,
    verify_password,
)
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

#: The query parameter a kiosk opens the page with once.
TOKEN_QUERY: Final = "token"
COOKIE_NAME: Final = "sct_page"
#: Under TLS: the browser sends a ``__Host-`` cookie only over HTTPS, to the host that set it, for every path.
COOKIE_NAME_TLS: Final = "__Host-sct_page"
#: Permission bits a secret file must not have: any access for its group or others.
_GROUP_OR_OTHERS: Final = stat.S_IRWXG | stat.S_IRWXO
#: A successful basic-auth check is remembered this long, for this many (name, password) pairs.
VERIFIED_TTL_S: Final = 600.0
VERIFIED_CACHE_SIZE: Final = 64
#: PBKDF2 runs at once, at most; a check waits up to ``HASH_WAIT_S`` for a turn, else the request is refused busy.
MAX_CONCURRENT_HASHES: Final = 2
HASH_WAIT_S: Final = 5.0
#: Wrong credentials from one address: at most this many per window, then 429 until the window ends.
MAX_FAILURES: Final = 10
FAILURE_WINDOW_S: Final = 60.0
#: Addresses the throttle remembers; beyond it the oldest are forgotten (a scan from a whole subnet).
MAX_TRACKED_CLIENTS: Final = 4096


def check_private_file(key: str, path: Path) -> os.stat_result:
    """``path`` exists, is a regular file this user can read, and neither its group nor others may touch it."""
    info = check_regular_file(key, path)
    if info.st_mode & _GROUP_OR_OTHERS:
        mode = stat.S_IMODE(info.st_mode)
        raise ConfigError(
            key,
            str(path),
            f"mode 0600 or 0400 (no access for group or others: chmod 600 {path})",
            what=f"mode {mode:04o} ({stat.filemode(info.st_mode)}) on ",
        )
    return info


def check_regular_file(key: str, path: Path) -> os.stat_result:
    """``path`` exists, is a regular file (not a folder, a device or a FIFO), and this user can read it."""
    try:
        info = path.stat()
    except OSError as error:
        raise ConfigError(key, str(path), "an existing file", note=error.strerror) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(key, str(path), "a regular file", what="something other than a regular file: ")
    if not os.access(path, os.R_OK):
        raise ConfigError(
            key,
            str(path),
            f"a file the service user can read (uid {os.geteuid()}; chown it to the service user)",
            what="a file this user cannot read: ",
        )
    return info


# ---------------------------------------------------------------------------------------------------- TLS


class _EncryptedKeyError(SctError):
    """Raised from ssl's password callback: the agent starts unattended, so there is nobody to ask."""


def _no_password() -> str:
    raise _EncryptedKeyError(
        "the TLS key is encrypted", attribute="status_page.tls_key", found="encrypted", expected="unencrypted"
    )


def server_tls_context(config: StatusPageConfig) -> ssl.SSLContext | None:
    """The TLS context the page is served with (TLS 1.2 or later), or None for plain HTTP.

    Raises ConfigError naming the key and the file: missing, unsafe, not a PEM certificate, an encrypted key, or
    a key that is not the certificate's (with ssl's reason).
    """
    if config.tls_certificate is None or config.tls_key is None:
        return None
    certificate, key = config.tls_certificate, config.tls_key
    check_regular_file("status_page.tls_certificate", certificate)
    check_private_file("status_page.tls_key", key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(certificate))
    except ssl.SSLError as error:
        raise ConfigError(
            "status_page.tls_certificate",
            str(certificate),
            "a PEM certificate (-----BEGIN CERTIFICATE-----)",
            note=f"ssl: {error.reason or error}",
            what="a file that is not a certificate: ",
        ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(certificate), str(key), password=_no_password)
    except _EncryptedKeyError:
        raise ConfigError(
            "status_page.tls_key",
            str(key),
            f"an unencrypted PEM key (the agent starts unattended: openssl pkey -in {key} -out NEW_KEY)",
            what="an encrypted key: ",
        ) from None
    except ssl.SSLError as error:
        raise ConfigError(
            "status_page.tls_key",
            str(key),
            f"the PEM private key of {certificate}",
            note=f"ssl: {error.reason or 'PEM lib'} ({error})",
            what="a key that does not load with the certificate: ",
        ) from None
    return context


def _same(presented: str, expected: str) -> bool:
    """Constant-time equality that leaks neither content nor length."""
    return hmac.compare_digest(
        hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest(),
        hashlib.sha256(expected.encode("utf-8")).digest(),
    )


# --------------------------------------------------------------------------------------- re-read on change

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """A secret file, checked and parsed at start (raising ConfigError) and again whenever it changes.

    A change is noticed by ``stat`` (inode, size, mtime, mode). A file that became unsafe or malformed yields
    None (refuse everyone) and one error line per change, never a traceback per request.
    """

    def __init__(self, key: str, path: Path, parse: Callable[[str, Path, str], T]) -> None:
        self._key, self._path, self._parse = key, path, parse
        self._lock = threading.Lock()
        self._signature, self._value = self._load()
        self._reported: tuple[int, ...] | None = None

    def _load(self) -> tuple[tuple[int, ...], T]:
        info = check_private_file(self._key, self._path)
        try:
            text = self._path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(
                self._key, str(self._path), "a readable UTF-8 text file", note=str(error)
            ) from None
        return _signature(info), self._parse(self._key, self._path, text)

    def current(self) -> T | None:
        try:
            signature = _signature(self._path.stat())
        except OSError:
            signature = ()
        if signature == self._signature:
            return self._value
        with self._lock:
            if signature == self._signature:
                return self._value
            try:
                self._signature, self._value = self._load()
            except ConfigError as error:
                if signature != self._reported:
                    self._reported = signature
                    logger.error("status page refuses every request until %s is fixed: %s", self._key, error)
                return None
            logger.info("status page: %s changed and was read again", self._key)
            return self._value


def _signature(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode)


# ----------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """What the server does with a request: let it in, or refuse it with a status, a reason and headers.

    ``refusal`` is one of ``agent.ops.metrics.PAGE_REFUSALS`` ("" = let in); ``why`` goes in the log line and never
    holds a credential. ``set_cookie`` is set when a token came in the URL: the server redirects to the URL
    without it, setting this cookie.
    """

    refusal: str = ""
    why: str = ""
    status: int = HTTPStatus.OK
    headers: tuple[tuple[str, str], ...] = ()
    set_cookie: str = ""

    @property
    def allowed(self) -> bool:
        return not self.refusal


LET_IN: Final = AccessDecision()


class FailureThrottle:
    """Wrong credentials per client address in a fixed window; bounded, thread-safe."""

    def __init__(self, limit: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S) -> None:
        self._limit, self._window_s = limit, window_s
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            start, count = self._windows.get(client, (now, 0))
            left = start + self._window_s - now
            return left if count >= self._limit and left > 0 else 0.0

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            start, count = self._windows.pop(client, (now, 0))
            if now - start >= self._window_s:
                start, count = now, 0
            self._windows[client] = (start, count + 1)
            while len(self._windows) > MAX_TRACKED_CLIENTS:
                self._windows.popitem(last=False)


class Authenticator:
    """Decides, per request, whether the client proved who it is (``status_page.auth``); thread-safe.

    Built at start: raises ConfigError when the users or token file is missing, unsafe or malformed.
    """

    def __init__(self, config: StatusPageConfig) -> None:
        self.mode = config.auth
        self.cookie_name = COOKIE_NAME_TLS if config.tls else COOKIE_NAME
        self._secure = config.tls
        self._throttle = FailureThrottle()
        self._users: WatchedFile[dict[str, str]] | None = None
        self._token: WatchedFile[str] | None = None
        if self.mode == "basic":
            assert config.basic_users_file is not None  # StatusPageConfig checks it
            self._users = WatchedFile("status_page.basic_users_file", config.basic_users_file, parse_users)
        elif self.mode == "token":
            assert config.token_file is not None  # StatusPageConfig checks it
            self._token = WatchedFile("status_page.token_file", config.token_file, parse_token)
        self._cache_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._hash_slots = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)
        #: Verified against when the name is unknown, so an unknown name costs what a known one does.
        self._decoy = hash_password(secrets.token_urlsafe(16))

    @property
    def challenge(self) -> tuple[tuple[str, str], ...]:
        """The ``WWW-Authenticate`` header of a 401: a browser prompts for basic; token clients know the scheme."""
        if self.mode == "basic":
            return (("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),)
        return (("WWW-Authenticate", f'Bearer realm="{REALM}"'),)

    def check(self, headers: Mapping[str, str], query: Mapping[str, str], client: str) -> AccessDecision:
        """Let in, or refuse (401, 429, 503) with the reason; ``headers`` have lower-case names."""
        if self.mode == "none":
            return LET_IN
        wait = self._throttle.retry_after(client)
        if wait > 0:
            return AccessDecision(
                "throttled",
                f"more than {MAX_FAILURES} wrong credentials in {FAILURE_WINDOW_S:.0f} s from this address",
                HTTPStatus.TOO_MANY_REQUESTS,
                (("Retry-After", str(max(1, round(wait)))),),
            )
        decision = self._basic(headers) if self.mode == "basic" else self._bearer(headers, query)
        if decision.refusal == "bad_credentials":
            self._throttle.failed(client)
        return decision

    def _refuse(self, reason: str, why: str) -> AccessDecision:
        return AccessDecision(reason, why, HTTPStatus.UNAUTHORIZED, self.challenge)

    # --- token

    def _bearer(self, headers: Mapping[str, str], query: Mapping[str, str]) -> AccessDecision:  # noqa: PLR0911 - one return per way a credential fails
        assert self._token is not None
        token = self._token.current()
        if token is None:
            return self._refuse("bad_credentials", "the token file is unusable (see the error above)")
        if TOKEN_QUERY in query:
            if not _same(query[TOKEN_QUERY], token):
                return self._refuse("bad_credentials", "wrong token in the URL")
            return AccessDecision(set_cookie=self._cookie(token))
        scheme, _, presented = headers.get("authorization", "").strip().partition(" ")
        if scheme:
            if scheme.lower() != "bearer":
                return self._refuse(
                    "bad_credentials", f"authorization scheme {scheme[:16]!r}, expected Bearer"
                )
            if not _same(presented.strip(), token):
                return self._refuse("bad_credentials", "wrong bearer token")
            return LET_IN
        cookie = _cookie(headers.get("cookie", ""), self.cookie_name)
        if cookie is None:
            return self._refuse("no_credentials", "no token (header, cookie or ?token=)")
        if not _same(cookie, cookie_value(token)):
            return self._refuse("bad_credentials", "a cookie of another token (replaced?)")
        return LET_IN

    def _cookie(self, token: str) -> str:
        secure = "; Secure" if self._secure else ""
        return f"{self.cookie_name}={cookie_value(token)}; Path=/; HttpOnly; SameSite=Strict{secure}"

    # --- basic

    def _basic(self, headers: Mapping[str, str]) -> AccessDecision:  # noqa: PLR0911 - one return per way a credential fails
        assert self._users is not None
        scheme, _, encoded = headers.get("authorization", "").strip().partition(" ")
        if not scheme:
            return self._refuse("no_credentials", "no credentials")
        if scheme.lower() != "basic":
            return self._refuse("bad_credentials", f"authorization scheme {scheme[:16]!r}, expected Basic")
        try:
            name, sep, password = (
                base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, ValueError):
            return self._refuse("bad_credentials", "malformed basic credentials")
        if not sep:
            return self._refuse("bad_credentials", "malformed basic credentials")
        users = self._users.current()
        if users is None:
            return self._refuse("bad_credentials", "the users file is unusable (see the error above)")
        stored = users.get(name)
        key = hmac.new(
            self._cache_key,
            f"{name}\0{password}\0{stored}".encode("utf-8", "surrogateescape"),
            hashlib.sha256,
        ).digest()
        if stored is not None and self._remembered(key):
            return LET_IN
        if not self._hash_slots.acquire(timeout=HASH_WAIT_S):
            return AccessDecision(
                "busy", "password checks are queued", HTTPStatus.SERVICE_UNAVAILABLE, (("Retry-After", "5"),)
            )
        try:
            matches = verify_password(password, stored if stored is not None else self._decoy)
        finally:
            self._hash_slots.release()
        if stored is None or not matches:
            # The name is not logged: a person who typed the password into the name field would put it there.
            return self._refuse("bad_credentials", "wrong user name or password")
        self._remember(key)
        return LET_IN

    def _remembered(self, key: bytes) -> bool:
        with self._cache_lock:
            expiry = self._verified.get(key)
            if expiry is None:
                return False
            if expiry < time.monotonic():
                del self._verified[key]
                return False
            return True

    def _remember(self, key: bytes) -> None:
        with self._cache_lock:
            self._verified[key] = time.monotonic() + VERIFIED_TTL_S
            self._verified.move_to_end(key)
            while len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)


def _cookie(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, None when absent (lenient: browsers differ)."""
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def check_page_access(config: StatusPageConfig) -> None:
    """Load the page's TLS files and credential file once, so that a bad one stops the agent at its first step
    (with the ConfigError naming the key and the file) instead of after the engine's warm-up."""
    if not config.enabled:
        return
    server_tls_context(config)
    if config.auth != "none":
        Authenticator(config)
