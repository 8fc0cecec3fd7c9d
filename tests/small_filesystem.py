"""Small real filesystems that tests fill up: tmpfs mounts in a private mount namespace.

A test that needs a disk that really runs full (ENOSPC from the kernel, SQLITE_FULL from SQLite) calls
:func:`in_private_mounts` first. The first time, in the ordinary test process, it runs the same test again in a
child pytest under ``unshare --mount`` (``--map-root-user`` too when not root, a user namespace in which an
ordinary user may mount a tmpfs) and reports the child's result as its own; the child, where the call returns
True, mounts tmpfs filesystems of a few MB with :func:`mount_tmpfs` and fills them with :func:`fill`.

Why a namespace of its own rather than ``mount`` in the test process: the mounts disappear with the child,
whatever happens to it, and nothing else on the machine ever sees them. The test is skipped, with the reason,
only where no such namespace can be made (no ``unshare``, or user namespaces and mounting both refused, as in a
default Docker container).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Final

import pytest

#: Set in the child run to the node id of the test it runs.
NAMESPACE_ENV: Final = "SCT_TEST_PRIVATE_MOUNTS"
#: Seconds the child run may take (the agent end-to-end case feeds several series).
CHILD_TIMEOUT_S: Final = 1200
#: Output of a failed child quoted in the failure (the end, where pytest's report is).
_TAIL_CHARACTERS: Final = 12_000


def _unshare() -> list[str] | None:
    path = shutil.which("unshare")
    if path is None:
        return None
    command = [path, "--mount", "--propagation", "private"]
    return command if os.geteuid() == 0 else [path, "--map-root-user", *command[1:]]


def _probe(unshare: list[str], where: Path) -> str | None:
    """None when a tmpfs can be mounted in a new namespace and this interpreter runs there; else why not (a user
    namespace sees files of users it does not map as nobody's: an interpreter under /root is out of reach)."""
    where.mkdir(parents=True, exist_ok=True)
    for command in (
        ["mount", "-t", "tmpfs", "-o", "size=1m", "sct-probe", str(where)],
        [sys.executable, "-c", "pass"],
    ):
        try:
            done = subprocess.run(
                [*unshare, *command], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{' '.join(unshare)} failed: {error}"
        if done.returncode != 0:
            return f"{' '.join(unshare)} {command[0]}: {(done.stderr or done.stdout).strip()}"
    return None


def in_private_mounts(request: pytest.FixtureRequest, tmp_path: Path) -> bool:
    """True in the child, which may mount (the test goes on). False in the parent once the child passed (the test
    returns); a failed child fails the test with its output, a skipped one skips it with its reason."""
    nodeid = request.node.nodeid
    if os.environ.get(NAMESPACE_ENV) == nodeid:
        return True
    unshare = _unshare()
    if unshare is None:
        pytest.skip("needs a small real filesystem: util-linux's unshare is not installed")
    why = _probe(unshare, tmp_path / "probe")
    if why is not None:
        pytest.skip(
            f"needs a small real filesystem: no private mount namespace with a tmpfs for this test ({why})"
        )
    report = tmp_path / "child.xml"
    try:
        done = subprocess.run(
            [
                *unshare,
                sys.executable,
                "-m",
                "pytest",
                nodeid,
                "-q",
                "-p",
                "no:cacheprovider",
                f"--basetemp={tmp_path / 'child'}",
                f"--junitxml={report}",
            ],
            cwd=request.config.rootpath,
            env={**os.environ, NAMESPACE_ENV: nodeid},
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the test in a private mount namespace ran over {CHILD_TIMEOUT_S} s:\n{error.output}")
    output = (done.stdout + done.stderr)[-_TAIL_CHARACTERS:]
    case = ET.parse(report).find(".//testcase") if report.exists() else None
    if case is None:
        pytest.fail(f"the test in a private mount namespace did not run (exit {done.returncode}):\n{output}")
    skipped = case.find("skipped")
    if skipped is not None:
        pytest.skip(skipped.get("message", "skipped in the private mount namespace"))
    if done.returncode != 0 or case.find("failure") is not None or case.find("error") is not None:
        pytest.fail(f"in a private mount namespace (exit {done.returncode}):\n{output}", pytrace=False)
    return False


def mount_tmpfs(where: Path, size_bytes: int) -> Path:
    """Mount a tmpfs of ``size_bytes`` at ``where`` (created); only in the child (:func:`in_private_mounts`)."""
    assert os.environ.get(NAMESPACE_ENV), "mount only inside in_private_mounts()"
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "sct-test", str(where)],
        check=True,
        capture_output=True,
    )
    return where


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


#: Attempts to take the free space while something else (the agent) writes to the same filesystem.
_FILL_ATTEMPTS: Final = 100


def fill(folder: Path, leave_bytes: int = 0, name: str = "ballast") -> Path:
    """Take all but ``leave_bytes`` of the free space of ``folder``'s filesystem with one file (allocated, not
    sparse); returns it. Removing it gives the space back. Another writer may take space between the look and
    the allocation (which is all or nothing): then it looks again."""
    ballast = folder / name
    with ballast.open("ab") as handle:
        for _ in range(_FILL_ATTEMPTS):
            wanted = free_bytes(folder) - leave_bytes
            if wanted <= 0:
                break
            try:
                os.posix_fallocate(handle.fileno(), handle.seek(0, os.SEEK_END), wanted)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                continue
            if free_bytes(folder) <= leave_bytes:
                break
    return ballast
