"""How the agent's log lines look: journal lines with their priority under systemd, JSON lines for log
shippers, plain text for a terminal.

- **journal**: each line starts with the sd-daemon(3) priority prefix (``<7>`` debug, ``<6>`` info, ``<4>``
  warning, ``<3>`` error, ``<2>`` critical), which journald strips and stores as the entry's PRIORITY, so
  ``journalctl -u sct-agent -p warning`` shows the agent's warnings and nothing else. No timestamp: journald
  stamps every entry. Every line of a multi-line record (a traceback) carries the prefix, because journald
  makes each line an entry of its own.
- **json**: one JSON object per line, ``at`` (Unix time), ``level``, ``logger``, ``thread``, ``message``, any
  structured fields the call passed with ``extra=`` (``event``, ``acquisition_id``, ``stage``, ``outcome``,
  ``protocol_id``, and every field of the canonical ``acquisition_end`` line), and ``exception``. Under
  journald each line also carries the priority prefix, which journald strips: the stored message is the JSON.
- **text**: time, level, logger, thread, message.
- **auto** (the default): journal when stderr is the journal, text otherwise. systemd sets
  ``JOURNAL_STREAM=<device>:<inode>`` of the stream it connects to stderr; the agent compares it with
  ``fstat(2)`` of its own stderr, as systemd.exec(5) prescribes, so a child of the service whose stderr was
  redirected elsewhere is not fooled by the inherited variable.

Levels: the agent's own loggers (``agent``, ``engines``, ``sct_core``) log at ``logging.level``; every other
library's at WARNING, whatever that level, unless ``logging.loggers`` names it: watchdog logs every inotify
event with its path at DEBUG, and pynetdicom every SOP Instance UID it sends.

Patient data: none of the records passed between stages carries a patient name, ID or birth date, files are
named by :func:`agent.file_labels.file_label`, and every formatted line goes through
:func:`agent.file_labels.redact` (paths under the export folder, instance UIDs) as a safety net. Python
warnings are routed through logging with their quoted values masked: a library warns about a value by quoting
it, and the value may be a patient's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Final, TextIO

from agent.file_labels import configure_file_labels, redact
from agent.ops.config import AgentConfig
from agent.vocabulary import LogFormat

#: The loggers that are the product's own; they log at ``logging.level``.
OWN_LOGGERS: Final = ("agent", "engines", "sct_core")
#: Least severe level of every other library unless ``logging.loggers`` says otherwise.
THIRD_PARTY_LEVEL: Final = logging.WARNING
#: The variable systemd sets to ``<device>:<inode>`` of the journal stream it connects to stdout/stderr.
JOURNAL_STREAM: Final = "JOURNAL_STREAM"
#: An ``extra=`` field holding a shorter message for the JSON format, where the fields say the rest (the
#: canonical acquisition_end line spells every field as key=value in its text message).
JSON_MESSAGE: Final = "json_message"
#: sd-daemon(3) priorities (syslog(3) levels) by Python level, most severe first.
_PRIORITIES: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY: Final = 7
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "taskName"}
)
#: A quoted value in a library's warning text.
_QUOTED: Final = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"
_JOURNAL_FORMAT: Final = "%(levelname)s %(name)s [%(threadName)s] %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority (0 emerg .. 7 debug) journald stores for a Python log level."""
    for level, value in _PRIORITIES:
        if levelno >= level:
            return value
    return _DEBUG_PRIORITY


def stderr_is_journal(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd named in ``JOURNAL_STREAM``."""
    environ = os.environ if environ is None else environ
    value = environ.get(JOURNAL_STREAM, "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class RedactingFormatter(logging.Formatter):
    """Text or journal lines: the safety net over the whole formatted record, traceback included; with
    ``journal`` every line carries the record's priority prefix."""

    def __init__(self, fmt: str, *, journal: bool) -> None:
        super().__init__(fmt)
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if not self._journal:
            return text
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; with ``journal`` the line starts with its priority prefix."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.__dict__.get(JSON_MESSAGE)
        entry: dict[str, object] = {
            "at": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": redact(message if isinstance(message, str) else record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key != JSON_MESSAGE and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        line = json.dumps(entry, ensure_ascii=False, default=str)
        return f"<{priority(record.levelno)}>{line}" if self._journal else line


class _MaskQuotedValues(logging.Filter):
    """For captured Python warnings: what a library quotes in a warning is the value it objects to."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _QUOTED.sub("'…'", record.getMessage())
        record.args = ()
        return True


def resolve_format(
    configured: str, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> tuple[LogFormat, bool]:
    """The format to write and whether stderr is the journal (for ``auto`` and for JSON's prefix)."""
    journal_stream = stderr_is_journal(stream, environ)
    chosen = LogFormat(configured)
    if chosen is LogFormat.AUTO:
        chosen = LogFormat.JOURNAL if journal_stream else LogFormat.TEXT
    return chosen, journal_stream


def make_handler(
    configured: str, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> logging.Handler:
    """A stderr handler writing ``configured`` (a ``logging.format`` value)."""
    target = stream or sys.stderr
    chosen, journal_stream = resolve_format(configured, target, environ)
    handler = logging.StreamHandler(target)
    if chosen is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(journal=journal_stream))
    elif chosen is LogFormat.JOURNAL:
        handler.setFormatter(RedactingFormatter(_JOURNAL_FORMAT, journal=True))
    else:
        handler.setFormatter(RedactingFormatter(_TEXT_FORMAT, journal=False))
    return handler


def configure_logging(config: AgentConfig, stream: TextIO | None = None) -> None:
    """Install the one stderr handler, the levels and the file labels ``config.logging`` asks for."""
    settings = config.logging
    configure_file_labels(config.watch.folder, settings.file_names)
    root = logging.getLogger()
    root.handlers[:] = [make_handler(settings.format, stream)]
    level = logging.getLevelName(settings.level)
    root.setLevel(max(level, THIRD_PARTY_LEVEL))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name, named_level in settings.logger_levels().items():
        logging.getLogger(name).setLevel(named_level)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _MaskQuotedValues) for f in warnings_logger.filters):
        warnings_logger.addFilter(_MaskQuotedValues())
