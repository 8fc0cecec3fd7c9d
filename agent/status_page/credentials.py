"""The status page's credential files: the users file of salted password hashes, the token file, the cookie.

Written by ``sct-agent page-user`` and ``sct-agent page-token``, read by :mod:`agent.status_page.access`.

The users file holds one ``name:pbkdf2_sha256$ITERATIONS$SALT$HASH`` line per person (salted PBKDF2-SHA256,
base64 without padding; ``#`` comments and blank lines allowed), never a password. 600 000 iterations is
OWASP's 2023 figure for PBKDF2-HMAC-SHA256; each entry keeps its own count, so the figure can be raised without
breaking entries made before. The token file holds one line: a random token (32 bytes, URL-safe: it travels in
a URL once). Both are written atomically (a temporary file in the same folder, then a rename), mode 0600, keeping
the owner of the file they replace, so the agent never reads half a file or a file others can read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Final

from agent.ops.config import ConfigError

#: The realm browsers show in their password prompt.
REALM: Final = "sct-agent status page"
HASH_SCHEME: Final = "pbkdf2_sha256"
#: OWASP's 2023 figure for PBKDF2-HMAC-SHA256; stored in each entry, so it can be raised without breaking old ones.
PBKDF2_ITERATIONS: Final = 600_000
#: Entries with fewer iterations are refused (a hash made weak by hand or by another tool).
MIN_PBKDF2_ITERATIONS: Final = 100_000
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
MIN_PASSWORD_LENGTH: Final = 8
MAX_USER_NAME_LENGTH: Final = 64
#: Random bytes of a token made by ``sct-agent page-token`` (43 URL-safe characters).
TOKEN_BYTES: Final = 32
MIN_TOKEN_LENGTH: Final = 32
#: The mode the secret files are made with.
PRIVATE_MODE: Final = 0o600
_COOKIE_LABEL: Final = b"sct-agent status page cookie v1"
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")
_TOKEN_CHARACTERS = re.compile(r"[A-Za-z0-9_~.-]+")


def write_private_file(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600, keeping the owner of the file it replaces."""
    old: os.stat_result | None
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            if old is not None and os.geteuid() == 0:
                os.fchown(handle.fileno(), old.st_uid, old.st_gid)
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------ passwords


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (base64, no padding) of ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations, HASH_BYTES)
    return f"{HASH_SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches an entry of :func:`hash_password`; False for a malformed entry."""
    parsed = _parse_hash(encoded)
    if parsed is None:
        return False
    iterations, salt, expected = parsed
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parse_hash(encoded: str) -> tuple[int, bytes, bytes] | None:
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != HASH_SCHEME or not parts[1].isdigit():
        return None
    try:
        salt, digest = _unb64(parts[2]), _unb64(parts[3])
    except (binascii.Error, ValueError):
        return None
    iterations = int(parts[1])
    if iterations < MIN_PBKDF2_ITERATIONS or len(salt) < SALT_BYTES or len(digest) != HASH_BYTES:
        return None
    return iterations, salt, digest


def check_user_name(name: str) -> str:
    """A name for the users file: letters, digits and ``._@-``, at most 64 characters (no ``:``, no spaces)."""
    if len(name) > MAX_USER_NAME_LENGTH or not _USER_NAME.fullmatch(name):
        raise ValueError(
            f"user name {name!r}: expected 1 to {MAX_USER_NAME_LENGTH} letters, digits or ._@- starting with a "
            f"letter or digit"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(
            f"password: found {len(password)} characters, expected at least {MIN_PASSWORD_LENGTH}"
        )
    if password != password.strip() or "\n" in password:
        raise ValueError("password: expected no leading or trailing space and no line break")
    return password


_USERS_EXPECTED: Final = (
    "lines 'name:pbkdf2_sha256$ITERATIONS$SALT$HASH' (made by `sct-agent page-user NAME`)"
)


def parse_users(key: str, path: Path, text: str) -> dict[str, str]:
    """Name -> stored hash from a users file's text; ConfigError naming the line of a malformed entry.

    Blank lines and ``#`` comments are allowed. A line's content is never put in the error: it holds a hash.
    """
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep or not _USER_NAME.fullmatch(name) or _parse_hash(encoded) is None:
            raise ConfigError(key, str(path), _USERS_EXPECTED, what=f"a malformed entry on line {number} of ")
        if name in users:
            raise ConfigError(
                key, str(path), "each name once", what=f"user {name!r} again on line {number} of "
            )
        users[name] = encoded
    if not users:
        raise ConfigError(
            key, str(path), "at least one user (`sct-agent page-user NAME`)", what="no users in "
        )
    return users


def set_user(path: Path, name: str, password: str) -> bool:
    """Add ``name`` to the users file, or change its password; True when added. Other lines are kept as they are.

    The file is created (mode 0600) when missing and replaced atomically, so the agent never reads half of it.
    """
    entry = f"{check_user_name(name)}:{hash_password(check_password(password))}"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    if not lines:
        lines = [f"# {REALM}: users for auth = 'basic'. Edit with `sct-agent page-user NAME`."]
    found = False
    for index, line in enumerate(lines):
        if line.strip().partition(":")[0] == name and not line.lstrip().startswith("#"):
            lines[index] = entry
            found = True
    if not found:
        lines.append(entry)
    write_private_file(path, "\n".join(lines) + "\n")
    return not found


def remove_user(path: Path, name: str) -> bool:
    """Remove ``name`` from the users file; False when it was not there."""
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.lstrip().startswith("#") or line.strip().partition(":")[0] != name]
    if len(kept) == len(lines):
        return False
    write_private_file(path, "\n".join(kept) + "\n")
    return True


# --------------------------------------------------------------------------------------------------- tokens


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def create_token_file(path: Path, *, replace: bool = False) -> str:
    """Write a new random token to ``path`` (mode 0600) and return it; an existing file only with ``replace``."""
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; replacing the token ends every kiosk's access (use --replace)")
    token = new_token()
    write_private_file(path, token + "\n")
    return token


def parse_token(key: str, path: Path, text: str) -> str:
    """The token in a token file's text: one line of at least 32 URL-safe characters (never shown in errors)."""
    token = text.strip()
    if len(token) < MIN_TOKEN_LENGTH or not _TOKEN_CHARACTERS.fullmatch(token):
        raise ConfigError(
            key,
            str(path),
            f"one line of at least {MIN_TOKEN_LENGTH} URL-safe characters (make one with `sct-agent page-token`)",
            what=f"{len(token)} characters, not a usable token, in ",
        )
    return token


def cookie_value(token: str) -> str:
    """What the kiosk cookie holds for ``token``: an HMAC of a fixed label, which does not give the token away."""
    return _b64(hmac.new(token.encode("utf-8"), _COOKIE_LABEL, hashlib.sha256).digest())
