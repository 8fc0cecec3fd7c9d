"""How a scanner file is named in log lines, metrics, status messages and the wire: never by its name.

Consoles and PACS exports name folders and files after the patient (``MUELLER^ANNA_0012345/IM0001``), so a
path in the export folder is patient data. Wherever the agent has to say which file it means, it says
:func:`file_label`: by default ``file:`` and the first 10 hex digits of the SHA-256 of the path relative to the
export folder (``logging.file_names = "hash"``). A person with access to the export folder finds the file
again from the label (``printf '%s' 'MUELLER^ANNA_0012345/IM0001' | sha256sum | cut -c1-10``), and the journal
(readable by the service user only) records every file's path. A site that keeps its logs as protected as its
images may choose ``logging.file_names = "relative"``: the path relative to the export folder itself.

Exception texts are the other way a path or a UID slips into a log line (``OSError`` and pydicom quote the
file; a header error may quote a value), so what the agent logs or sends about a third-party exception goes
through :func:`error_text`, and the log formatter and status events pass their text through :func:`redact` as
a last line of defence: paths under the export folder become labels and instance UIDs become ``<uid>``.
The well-known UIDs of the DICOM standard itself (``1.2.840.10008.*``: SOP classes, transfer syntaxes) say
nothing about a patient and are kept, so "transfer syntax 1.2.840.10008.1.2.4.50 refused" still reads.

The mode and the export folder are set once at start-up, before any stage thread runs
(:func:`configure_file_labels`, called by ``agent.ops.log_format.configure_logging``); until then labels hash
the absolute path.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Final

from agent.vocabulary import FileNames
from sct_core.errors import SctError

#: Hex digits of the SHA-256 a label shows: 40 bits, unique among the files of any export folder.
LABEL_HEX_DIGITS: Final = 10
LABEL_PREFIX: Final = "file:"
#: Characters of a third-party exception's text kept in a log line or a reason.
ERROR_TEXT_LIMIT: Final = 200
#: What an instance UID is replaced with.
UID_PLACEHOLDER: Final = "<uid>"
#: Root of the DICOM standard's own UIDs (SOP classes, transfer syntaxes): not about a patient, kept.
STANDARD_UID_ROOT: Final = "1.2.840.10008."

#: Where a path written in running text may end.
_PATH_END: Final = re.compile(r"[\s,;:)\]]")
#: A file name shorter than this is not searched for in an exception's text: it would match inside words.
_SHORTEST_NAME_REPLACED: Final = 3
#: A DICOM UID: digits in five or more dot-separated components (an IPv4 address has four; a version three).
_UID: Final = re.compile(r"(?<!\d)(?<!\d\.)\d+(?:\.\d+){4,}(?!\d|\.\d)")

_root: Path | None = None
_mode: FileNames = FileNames.HASH


def configure_file_labels(root: Path | None, mode: str | FileNames = FileNames.HASH) -> None:
    """Name files relative to ``root`` (the export folder), as hashes or as relative paths."""
    global _root, _mode  # noqa: PLW0603 - one process-wide setting, like logging's own configuration
    _root = root.absolute() if root is not None else None
    _mode = FileNames(mode)


def file_label(path: Path) -> str:
    """How logs, metrics and messages name ``path``: ``file:<10 hex>``, or its relative path when configured."""
    relative = _relative(path)
    if _mode is FileNames.RELATIVE:
        return _printable(relative)
    digest = hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{LABEL_PREFIX}{digest[:LABEL_HEX_DIGITS]}"


def error_text(error: BaseException, path: Path | None = None) -> str:
    """``Type: text`` of a third-party exception, fit for a log line or a reason: the operating system's
    reason without its file name, ``path`` (and any path under the export folder) as a label, no instance
    UID, at most :data:`ERROR_TEXT_LIMIT` characters."""
    if isinstance(error, SctError):  # the product's own errors name files by label and quote no identifier
        return f"{type(error).__name__}: {redact(str(error))}"
    if isinstance(error, OSError) and error.strerror:
        named = error.filename if isinstance(error.filename, str) else None
        text = error.strerror + (f" ({file_label(Path(named))})" if named else "")
    else:
        text = str(error).strip() or "no detail"
        if path is not None:
            text = text.replace(str(path), file_label(path))
            if len(path.name) >= _SHORTEST_NAME_REPLACED:
                text = text.replace(path.name, file_label(path))
    return f"{type(error).__name__}: {redact(text)[:ERROR_TEXT_LIMIT]}"


def redact(text: str) -> str:
    """``text`` with every path under the export folder replaced by its label and every instance UID by
    ``<uid>``. The safety net under every log line and status message; the agent's own texts never need it."""
    if _root is not None:
        root = str(_root).rstrip("/")
        if root and root in text:
            text = re.sub(re.escape(root) + r"/[^'\"\n]*", lambda match: _path_label(match.group(0)), text)
    return _UID.sub(_uid_or_placeholder, text)


def _path_label(text: str) -> str:
    """``text`` starts with a path under the export folder and runs to the end of its quote or line: the longest
    prefix that names an existing file or folder is the path; if none does, all of it is hidden (a file name
    may hold spaces, so the rest could be part of it)."""
    ends = sorted({m.start() for m in _PATH_END.finditer(text)} | {len(text)}, reverse=True)
    for end in ends:
        if os.path.lexists(text[:end]):
            return file_label(Path(text[:end])) + redact(text[end:])
    return file_label(Path(text))


def _uid_or_placeholder(match: re.Match[str]) -> str:
    uid = match.group(0)
    return uid if uid.startswith(STANDARD_UID_ROOT) else UID_PLACEHOLDER


def _relative(path: Path) -> str:
    absolute = path if path.is_absolute() else path.absolute()
    if _root is not None and absolute.is_relative_to(_root):
        return absolute.relative_to(_root).as_posix()
    return absolute.as_posix()


def _printable(text: str) -> str:
    """A relative path as one line: control characters escaped, so a file name cannot forge a log line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
