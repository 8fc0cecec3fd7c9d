"""Preflight checks of the machine the agent starts on: its ports, the export folder, free space and the systemd
unit (``sct-agent doctor``; the agent's own files are :mod:`agent.ops.preflight`).

Each check does for real what the agent will do, as far as it can without side effects: the ports are bound
with ZeroMQ and a listening socket exactly as the publisher and the metrics server bind them, all held at once
(so two settings naming the same port are caught too) and released; the export folder is listed; free space is
asked of the file system that will hold the files; the installed unit is given to ``systemd-analyze verify``.
Access checks hold for the user who runs the doctor, so IT runs it as the service user.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import shutil
import socket
import stat
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import zmq

from agent.ops.config import MB, AgentConfig, MetricsConfig, WatchConfig
from agent.ops.preflight import Check, Status, current_user, nearest_existing, user_name

#: File system types (``/proc/self/mounts``) of network shares: a file written by another machine raises no
#: inotify event here, so the ``native`` observer never sees the scanner's files.
NETWORK_FILESYSTEMS: Final = frozenset(
    {
        "cifs",
        "smb3",
        "smbfs",
        "nfs",
        "nfs4",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "fuse.glusterfs",
        "fuse.sshfs",
        "fuse.rclone",
        "fuse.s3fs",
        "davfs",
    }
)
MOUNTS_FILE: Final = Path("/proc/self/mounts")
#: Where systemd looks for an installed unit, in its order of precedence.
INSTALLED_UNITS: Final = (
    Path("/etc/systemd/system/sct-agent.service"),
    Path("/usr/lib/systemd/system/sct-agent.service"),
    Path("/lib/systemd/system/sct-agent.service"),
)
#: The unit as shipped: in a checkout, and where systemd/README.md installs the release.
SHIPPED_UNITS: Final = (
    Path(__file__).resolve().parents[2] / "systemd" / "sct-agent.service",
    Path("/opt/sct-agent/systemd/sct-agent.service"),
)
#: systemd-analyze reads unit files and its own tables only; this bounds a hung call.
VERIFY_TIMEOUT_S: Final = 60.0
#: How long the metrics URL gets to answer when a port is taken and we ask whether an agent holds it.
PROBE_TIMEOUT_S: Final = 2.0
#: The gauge every agent serves on /metrics; its presence says the port belongs to an sct-agent.
READY_METRIC: Final = "sct_agent_ready"
_READY_LINE = re.compile(rf"^{READY_METRIC} (\S+)$", re.MULTILINE)
_NOT_EXECUTABLE = re.compile(r"Command (\S+) is not executable")
#: /run/sct-agent: the unit's RuntimeDirectory=, created by systemd at start, the home of ipc:// endpoints.
RUNTIME_FOLDER: Final = Path("/run/sct-agent")


# ------------------------------------------------------------------------------------------------------ ports


def check_ports(config: AgentConfig) -> list[Check]:
    """The publish and snapshot endpoints and the metrics address can be bound, all at once, by this user."""
    publish = config.publish
    snapshot_attribute = "publish.snapshot_endpoint" + ("" if publish.snapshot_endpoint else " (derived)")
    checks: list[Check] = []
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    held: list[zmq.Socket[bytes] | socket.socket] = []
    probe = _AgentProbe(config.metrics)
    try:
        for attribute, endpoint, kind in (
            ("publish.endpoint", publish.endpoint, zmq.PUB),
            (snapshot_attribute, publish.snapshot, zmq.ROUTER),
        ):
            checks.append(_bind_endpoint(context, held, attribute, endpoint, kind, probe))
        checks.append(_bind_metrics(config.metrics, held, probe))
    finally:
        for sock in held:
            if isinstance(sock, zmq.Socket):
                sock.close(linger=0)
            else:
                sock.close()
        context.term()
    return checks


def _bind_endpoint(
    context: zmq.Context[zmq.Socket[bytes]],
    held: list[zmq.Socket[bytes] | socket.socket],
    attribute: str,
    endpoint: str,
    kind: int,
    probe: _AgentProbe,
) -> Check:
    if endpoint.startswith("inproc://"):
        return Check(
            "ports", Status.OK, attribute, f"{endpoint}: inside the agent's process, nothing to bind"
        )
    if endpoint.startswith("ipc://"):
        path = Path(endpoint.removeprefix("ipc://"))
        if _unix_listener(path):
            return Check(
                "ports",
                Status.FAIL,
                attribute,
                f"{endpoint}: a process is listening on {path} already; expected nobody there. {probe.holder()}",
            )
        if not path.parent.is_dir() and path.is_relative_to(RUNTIME_FOLDER):
            return Check(
                "ports",
                Status.WARN,
                attribute,
                f"{endpoint}: {path.parent} does not exist yet; systemd creates {RUNTIME_FOLDER} when the unit "
                f"starts (RuntimeDirectory=)",
            )
    sock = context.socket(kind)
    held.append(sock)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as error:
        if error.errno == zmq.EADDRINUSE:
            return Check(
                "ports",
                Status.FAIL,
                attribute,
                f"{endpoint} is in use ({error.strerror}); expected a free address. {probe.holder()}",
            )
        return Check(
            "ports",
            Status.FAIL,
            attribute,
            f"{endpoint} cannot be bound ({error.strerror}); expected an address of this machine (one of its IP "
            f"addresses, an interface name or *) and a free port",
        )
    return Check("ports", Status.OK, attribute, f"{endpoint} can be bound")


def _unix_listener(path: Path) -> bool:
    """True when a process accepts connections on the Unix socket ``path`` (ZeroMQ would take the path over)."""
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(PROBE_TIMEOUT_S)
        try:
            client.connect(str(path))
        except OSError:
            return False
    return True


def _bind_metrics(
    metrics: MetricsConfig, held: list[zmq.Socket[bytes] | socket.socket], probe: _AgentProbe
) -> Check:
    attribute = "metrics.listen"
    if not metrics.enabled:
        return Check("ports", Status.OK, attribute, "'' (metrics off): nothing to bind")
    host, port = metrics.host, metrics.port
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        return Check(
            "ports",
            Status.FAIL,
            attribute,
            f"{metrics.listen}: cannot resolve {host!r} ({error.strerror}); "
            f"expected an address of this machine such as 127.0.0.1",
        )
    listener = socket.socket(family, socket.SOCK_STREAM)
    held.append(listener)
    # As prometheus_client's server binds: reusing a port left in TIME_WAIT by a stopped agent is fine.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen()
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return Check(
                "ports",
                Status.FAIL,
                attribute,
                f"{metrics.listen} is in use ({error.strerror}); expected a free address. {probe.holder()}",
            )
        return Check(
            "ports",
            Status.FAIL,
            attribute,
            f"{metrics.listen} cannot be bound ({error.strerror}); expected an address of this machine and a free "
            f"port",
        )
    return Check("ports", Status.OK, attribute, f"{metrics.listen} can be bound")


class _AgentProbe:
    """Whether an sct-agent holds a taken port, told by whether its metrics URL answers; asked at most once."""

    def __init__(self, metrics: MetricsConfig) -> None:
        self._metrics = metrics
        self._answer: str | None = None

    def holder(self) -> str:
        if self._answer is None:
            self._answer = self._ask()
        return self._answer

    def _ask(self) -> str:
        if not self._metrics.enabled:
            return (
                "Metrics are off (metrics.listen = ''), so whether an sct-agent holds it cannot be told from "
                "here; `ss -ltnp` names the process"
            )
        host, port = self._metrics.host, self._metrics.port
        if port == 0:
            return "metrics.listen has port 0, so no agent can be asked; `ss -ltnp` names the process"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host != "::" else "::1"
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
                body = response.read(1 << 20).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException, ValueError):  # whatever holds it may not speak HTTP
            body = ""
        ready = _READY_LINE.search(body)
        if ready is None:
            return (
                f"No sct-agent answers at {url}, so another program holds it: `ss -ltnp` names it; stop it or "
                f"choose another port"
            )
        return (
            f"An sct-agent answers at {url} ({READY_METRIC} {ready.group(1)}): the agent seems to be running "
            f"already (systemctl status sct-agent); stop it before starting another"
        )


# ---------------------------------------------------------------------------------------------- export folder


def check_export_folder(watch: WatchConfig, mounts: str | None = None) -> list[Check]:
    """The export folder exists, is a folder this user can list, and the observer suits its file system."""
    folder = watch.folder
    attribute = "watch.folder"
    who = current_user()
    if not folder.exists():
        return [
            Check(
                "export folder",
                Status.FAIL,
                attribute,
                f"{folder} does not exist; expected the scanner's export folder, mounted before the agent starts "
                f"(the agent would create an empty folder and wait there for files that never come, and the "
                f"unit's ReadOnlyPaths= needs it)",
            )
        ]
    if not folder.is_dir():
        return [
            Check("export folder", Status.FAIL, attribute, f"{folder} is not a folder; expected a folder")
        ]
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
        listable = os.access(folder, os.R_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)
        if not listable:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as error:
        info = folder.stat()
        return [
            Check(
                "export folder",
                Status.FAIL,
                attribute,
                f"{folder} cannot be listed by {who} ({error.strerror}; mode {stat.filemode(info.st_mode)}, "
                f"owner {user_name(info.st_uid)}, group id {info.st_gid}); expected read and search (r-x) access "
                f"for the service user, e.g. through its group (SupplementaryGroups= in a drop-in)",
            )
        ]
    point, fstype = mount_of(folder.resolve(), MOUNTS_FILE.read_text() if mounts is None else mounts)
    checks = [
        Check(
            "export folder",
            Status.OK,
            attribute,
            f"{folder} can be listed by {who}; {fstype} mounted at {point}",
        )
    ]
    network = fstype in NETWORK_FILESYSTEMS
    if network and watch.observer == "native":
        checks.append(
            Check(
                "export folder",
                Status.WARN,
                "watch.observer",
                f"'native' on a {fstype} network share ({point}): inotify gets no events for files another "
                f"machine writes there, so only the start-up scan would find them; expected 'polling'",
            )
        )
    else:
        suits = "a network share, rescanned" if network else "a local file system"
        checks.append(
            Check("export folder", Status.OK, "watch.observer", f"{watch.observer!r} suits {suits}")
        )
    return checks


def mount_of(path: Path, mounts: str) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding ``path``, from ``/proc/self/mounts`` text."""
    target = str(path)
    best = ("/", "unknown")
    best_length = -1
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = point in ("/", target) or target.startswith(point.rstrip("/") + "/")
        # A later line mounted over the same point wins, as it does in the kernel.
        if inside and len(point) >= best_length:
            best, best_length = (point, fields[2]), len(point)
    return best


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in mount points as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


# ------------------------------------------------------------------------------------------------ free space


def check_free_space(attribute: str, folder: Path, min_free_bytes: int) -> Check:
    """At least ``min_free_bytes`` free (for this user, not root's reserve) where ``folder`` is or will be."""
    where = nearest_existing(folder)
    free = shutil.disk_usage(where).free
    shown = f"{folder}" + ("" if where == folder else f" (not created yet; its file system is {where}'s)")
    if free < min_free_bytes:
        return Check(
            "free space",
            Status.FAIL,
            attribute,
            f"{shown}: {_size(free)} free; expected at least {_size(min_free_bytes)} (retention.min_free_mb: "
            f"below it the agent refuses new series)",
        )
    return Check(
        "free space", Status.OK, attribute, f"{shown}: {_size(free)} free (minimum {_size(min_free_bytes)})"
    )


def check_free_spaces(config: AgentConfig) -> list[Check]:
    """The state folder, and the DICOM folder when one is written, against ``retention.min_free_mb``: below it the
    agent refuses new series, so a box that starts below it would refuse the first patient's."""
    min_free_bytes = int(config.retention.min_free_mb * MB)
    checks = [check_free_space("state.folder", config.state.folder, min_free_bytes)]
    if config.dicom_folder is not None:
        checks.append(check_free_space("dicom.folder", config.dicom_folder, min_free_bytes))
    return checks


def _size(count: int) -> str:
    return f"{count / 1024**3:.1f} GiB"


# ---------------------------------------------------------------------------------------------- systemd unit


def check_systemd_unit(
    installed: Sequence[Path] = INSTALLED_UNITS,
    shipped: Sequence[Path] = SHIPPED_UNITS,
    analyze: str | None = None,
) -> Check:
    """``systemd-analyze verify`` of the installed unit, else of the shipped copy with a note.

    verify exits 0 for an unknown key or a bad value and only writes a warning to stderr, so every stderr line
    counts as a complaint; a non-executable ExecStart= is the one complaint that sets exit status 1.
    """
    analyze = analyze or shutil.which("systemd-analyze")
    attribute = "systemd unit"
    if analyze is None:
        return Check(
            "systemd",
            Status.WARN,
            attribute,
            "systemd-analyze not found, the unit is not verified; expected it on a systemd machine (Debian: "
            "apt-get install systemd)",
        )
    unit = next((path for path in installed if path.is_file()), None)
    if unit is not None:
        status, complaints = _verify(analyze, unit)
        if status != 0 or complaints:
            return Check(
                "systemd",
                Status.FAIL,
                attribute,
                f"{unit}: systemd-analyze verify exit status {status}: {'; '.join(complaints[:3])}; expected no "
                f"complaint",
            )
        return Check("systemd", Status.OK, attribute, f"{unit} verifies (systemd-analyze verify)")
    copy = next((path for path in shipped if path.is_file()), None)
    if copy is None:
        return Check(
            "systemd",
            Status.WARN,
            attribute,
            f"not installed (no {', '.join(map(str, installed))}) and no shipped copy found; fine when the agent "
            f"does not run under systemd",
        )
    status, complaints = _verify(analyze, copy)
    others = [line for line in complaints if not _NOT_EXECUTABLE.search(line)]
    if others:
        return Check(
            "systemd",
            Status.FAIL,
            attribute,
            f"the shipped {copy}: systemd-analyze verify exit status {status}: {'; '.join(others[:3])}; expected no "
            f"complaint",
        )
    missing = [match.group(1) for line in complaints if (match := _NOT_EXECUTABLE.search(line))]
    note = f", apart from its ExecStart= {missing[0]}, not installed here" if missing else ""
    return Check(
        "systemd",
        Status.WARN,
        attribute,
        f"not installed (no {installed[0]}); the shipped {copy} verifies{note}; install it as systemd/README.md "
        f"says to run the agent as a service",
    )


def _verify(analyze: str, unit: Path) -> tuple[int, list[str]]:
    try:
        result = subprocess.run(
            [analyze, "verify", str(unit)],
            capture_output=True,
            text=True,
            timeout=VERIFY_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, [f"no answer within {VERIFY_TIMEOUT_S:.0f} s"]
    return result.returncode, [line.strip() for line in result.stderr.splitlines() if line.strip()]
