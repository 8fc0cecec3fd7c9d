"""The folder C-STORE writes to, ``<state>/received``: durable writes, names without patient data, and what a
restart finds there.

A success status tells the scanner it may forget an image, so an image must be on disk, whole and durable,
before the storage SCP (agent.ingest.store_scp) confirms it: :func:`write_durably` writes under a hidden
temporary name, fsyncs, renames into place and fsyncs the folder. Names are digests of the UIDs
(``<series digest>/<instance digest>.dcm``), never a name or UID a console may have made of the patient's; a
second copy of an instance gets the same name and replaces the first. :func:`received_files` is what the
next start hands to the assembler again, and removes what a crash left half-written.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

#: Hex digits of the digests that name received folders and files.
DIGEST_HEX: Final = 16
#: Suffix of a file being written (hidden, and removed at start if a crash left it).
PARTIAL_SUFFIX: Final = ".partial"
#: The Part-10 preamble and prefix that precede the file meta information.
PREAMBLE: Final = b"\x00" * 128 + b"DICM"


def digest(text: str) -> str:
    """The name a UID gets on disk: opaque, stable, no patient data."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:DIGEST_HEX]


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, chunks: Sequence[bytes]) -> None:
    """Write ``chunks`` to ``path`` so that it appears whole or not at all, and survives a power cut once this
    returns: a hidden temporary name, fsync, rename, fsync of the folder (and of its parent when the folder is
    new). Raises OSError; nothing is left behind then."""
    folder = path.parent
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_folder(folder.parent)
    temporary = folder / f".{path.name}.{os.getpid()}-{threading.get_ident()}{PARTIAL_SUFFIX}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def received_files(folder: Path) -> Iterator[Path]:
    """Complete received files under ``folder``, oldest first; removes what a crash left half-written."""
    if not folder.is_dir():
        return
    found: list[tuple[int, Path]] = []
    for series in sorted(folder.iterdir()):
        if series.name.startswith(".") or not series.is_dir():
            continue
        for entry in os.scandir(series):
            if entry.name.endswith(PARTIAL_SUFFIX):
                Path(entry.path).unlink(missing_ok=True)
            elif not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, Path(entry.path)))
    found.sort()
    yield from (path for _, path in found)
