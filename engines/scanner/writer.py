"""How exported bytes reach the folder the agent watches.

Consoles and transfer tools differ in the one property an ingester depends on: whether a file can be seen
under its final name before it is complete. ``atomic`` never shows a partial file (temp name, fsync, rename:
what a careful exporter or a DICOM receiver does); ``slow`` writes the final name in place in several flushed
chunks with pauses (what a console writing over SMB/NFS looks like), so a watcher that reads on the first
event sees a half-written file.
"""

from __future__ import annotations

import os
import time
from enum import StrEnum
from pathlib import Path

#: Number of flushed chunks a slow write is split into (equal sizes, the last one takes the remainder).
SLOW_WRITE_CHUNKS = 4
#: Pause after each chunk but the last, in seconds: long enough for a 10 ms poller to observe the partial
#: file.
SLOW_WRITE_PAUSE_S = 0.05


class WriteStyle(StrEnum):
    """How each file is written (module docstring)."""

    ATOMIC = "atomic"
    SLOW = "slow"


def temp_name(final: Path) -> Path:
    """The hidden name an atomic write uses in the same folder (same filesystem, so the rename is atomic)."""
    return final.with_name(f".{final.name}.partial")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a hidden temp name, fsync it, then rename it onto ``path`` in one step."""
    tmp = temp_name(path)
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def write_slow(
    path: Path, data: bytes, *, chunks: int = SLOW_WRITE_CHUNKS, pause_s: float = SLOW_WRITE_PAUSE_S
) -> None:
    """Write ``data`` under its final name in ``chunks`` flushed pieces with ``pause_s`` between them."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1; found {chunks}")
    size = len(data)
    step = max(1, -(-size // chunks))
    with path.open("wb") as handle:
        for start in range(0, max(size, 1), step):
            handle.write(data[start : start + step])
            handle.flush()
            if start + step < size and pause_s > 0:
                time.sleep(pause_s)
        os.fsync(handle.fileno())


def write_file(
    path: Path, data: bytes, style: WriteStyle, *, slow_pause_s: float = SLOW_WRITE_PAUSE_S
) -> None:
    """Write one file in the given style."""
    if style is WriteStyle.ATOMIC:
        write_atomic(path, data)
    else:
        write_slow(path, data, pause_s=slow_pause_s)


def fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (once per export: visibility needs no fsync)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
