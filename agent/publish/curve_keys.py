"""CURVE key files for the publisher and its subscribers: create them, load them, refuse unsafe ones.

The sCT link carries patient images over the operating-room network, so off loopback the publisher encrypts
with CURVE and lets in only subscribers whose public key is on the allow-list (ZAP). The key files use
ZeroMQ's certificate format (``zmq.auth.create_certificates``: ``NAME.key`` holds the public key and may be
handed out, ``NAME.key_secret`` holds both and must stay private), so the C++ tooling of a robot vendor
(czmq's ``zcert``) reads the same files.

A secret key that others can read is no secret: the agent refuses to start with one (docs/agent.md,
Security), naming the file, its mode and the ``chmod`` that fixes it.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import zmq
import zmq.auth

from sct_core.errors import SctError

#: Suffixes zmq.auth gives the two files of a key pair.
PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"
#: Permission bits a secret key file must not have: readable or writable by others.
_OTHERS_ACCESS: Final = stat.S_IROTH | stat.S_IWOTH
SECRET_MODE: Final = 0o600
#: A CURVE key in Z85 text is 40 characters (32 bytes).
Z85_KEY_LENGTH: Final = 40
#: Endpoint schemes that never leave the machine: ipc is guarded by file permissions, inproc by the process.
_LOCAL_SCHEMES: Final = ("ipc://", "inproc://")
_LOOPBACK_NAMES: Final = frozenset({"localhost", "ip6-localhost"})


class KeyFileError(SctError, ValueError):
    """A key file or folder that cannot be used; names it, what was found and what is expected."""

    def __init__(self, what: str, path: Path, found: str, expected: str) -> None:
        super().__init__(
            f"{what} {path}: found {found}, expected {expected}",
            attribute=f"{what} {path}",
            found=found,
            expected=expected,
        )
        self.path = path


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair as Z85 bytes (what ``zmq.CURVE_PUBLICKEY``/``CURVE_SECRETKEY`` take)."""

    public: bytes
    secret: bytes


@dataclass(frozen=True, slots=True)
class CurveServer:
    """What the publisher needs to run CURVE: its own key pair and the subscribers' allow-list folder."""

    keys: KeyPair
    allowed_keys_folder: Path
    #: Public keys found in the folder at start-up (ZAP reads the folder itself; kept for logs and checks).
    allowed: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class CurveClient:
    """What a subscriber needs: the publisher's public key and its own key pair."""

    server_public: bytes
    keys: KeyPair


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints no other machine can reach: ipc, inproc, and tcp on a loopback address.

    Anything else (a LAN address, ``*``, ``0.0.0.0``, an interface or host name) counts as the network. A name
    other than ``localhost`` is not resolved: what it resolves to can change, so it is treated as not loopback.
    """
    if endpoint.startswith(_LOCAL_SCHEMES):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    address = endpoint.removeprefix("tcp://")
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]").split("%", 1)[0]
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, mode 0644) and ``NAME.key_secret`` (mode 0600) in ``folder``.

    Refuses to overwrite an existing pair: replacing a key silently would lock out whoever holds the old one.
    """
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError("key name", folder / name, repr(name), "a plain file name such as 'robot-or1'")
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(
                "key file", path, "an existing file", "a name not used yet (keys are never overwritten)"
            )
    folder.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)
    try:
        public_written, secret_written = zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old_umask)
    Path(secret_written).chmod(SECRET_MODE)
    Path(public_written).chmod(0o644)
    return Path(public_written), Path(secret_written)


def load_secret_key(path: Path, *, what: str = "secret key file") -> KeyPair:
    """The key pair in a ``.key_secret`` file, refused if others may read or write it."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise KeyFileError(
            what, path, error.strerror or "unreadable", "an existing .key_secret file"
        ) from None
    if not stat.S_ISREG(mode):
        raise KeyFileError(what, path, "not a regular file", "a .key_secret file")
    if mode & _OTHERS_ACCESS:
        raise KeyFileError(
            what,
            path,
            f"mode {stat.filemode(mode)} (readable or writable by every user)",
            f"no access for others: chmod 600 {path}",
        )
    public, secret = _load(path, what)
    if secret is None:
        raise KeyFileError(what, path, "no secret-key line", "a .key_secret file made by `sct-agent keys`")
    return KeyPair(public=public, secret=secret)


def load_public_key(path: Path, *, what: str = "public key file") -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    public, _ = _load(path, what)
    return public


def load_allowed_keys(folder: Path) -> tuple[bytes, ...]:
    """Every public key in the allow-list folder (``*.key`` files), refusing an empty or missing folder."""
    if not folder.is_dir():
        raise KeyFileError(
            "allowed subscriber keys folder", folder, "no such folder", "a folder of subscribers' .key files"
        )
    keys = []
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        keys.append(load_public_key(path, what="subscriber public key"))
    if not keys:
        raise KeyFileError(
            "allowed subscriber keys folder",
            folder,
            "no .key files",
            "at least one subscriber public key (create one with `sct-agent keys client NAME`)",
        )
    return tuple(keys)


def curve_server(secret_key_file: Path, allowed_keys_folder: Path) -> CurveServer:
    """Load and check everything the publisher needs for CURVE; raises :class:`KeyFileError`."""
    keys = load_secret_key(secret_key_file, what="publisher secret key file")
    allowed = load_allowed_keys(allowed_keys_folder)
    return CurveServer(keys=keys, allowed_keys_folder=allowed_keys_folder, allowed=allowed)


def curve_client(server_public_file: Path, client_secret_file: Path) -> CurveClient:
    """Load a subscriber's keys; raises :class:`KeyFileError`."""
    return CurveClient(
        server_public=load_public_key(server_public_file, what="publisher public key file"),
        keys=load_secret_key(client_secret_file, what="subscriber secret key file"),
    )


def apply_server(socket: zmq.Socket[bytes], server: CurveServer, zap_domain: bytes) -> None:
    """Make ``socket`` a CURVE server whose peers are checked by the ZAP handler for ``zap_domain``."""
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, server.keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, server.keys.secret)
    socket.setsockopt(zmq.ZAP_DOMAIN, zap_domain)


def apply_client(socket: zmq.Socket[bytes], client: CurveClient) -> None:
    """Make ``socket`` a CURVE client of the publisher whose public key ``client`` holds."""
    socket.setsockopt(zmq.CURVE_SERVERKEY, client.server_public)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, client.keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, client.keys.secret)


def _load(path: Path, what: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeyFileError(what, path, "no such file", "a key file made by `sct-agent keys`")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise KeyFileError(what, path, str(error), 'a ZeroMQ certificate (public-key = "...")') from None
    if public is None or len(public) != Z85_KEY_LENGTH:
        raise KeyFileError(what, path, "no valid public-key line", f"a {Z85_KEY_LENGTH}-character Z85 key")
    if secret is not None and len(secret) != Z85_KEY_LENGTH:
        raise KeyFileError(what, path, "a malformed secret-key line", f"a {Z85_KEY_LENGTH}-character Z85 key")
    return public, secret
