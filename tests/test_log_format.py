"""Log lines for journald and for machines, and files named by their label.

The journal format is checked on the bytes a real ``sct-agent run`` writes when ``JOURNAL_STREAM`` names its
stderr, and, where this machine can run a journald of its own (root, systemd-journald installed), through a
real journald in a private namespace queried with ``journalctl -p warning``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.file_labels import configure_file_labels, error_text, file_label, redact
from agent.ops.agent_process import free_port
from agent.ops.config import AgentConfig, LoggingConfig, WatchConfig
from agent.ops.log_format import (
    JOURNAL_STREAM,
    JsonFormatter,
    RedactingFormatter,
    configure_logging,
    priority,
    stderr_is_journal,
)

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
PRIORITY_PREFIX = re.compile(r"^<([0-7])>")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back (pytest's capture handlers included)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = ("agent", "engines", "sct_core", "watchdog", "pynetdicom", "agent.ingest", "py.warnings")
    levels = {name: logging.getLogger(name).level for name in names}
    filters = logging.getLogger("py.warnings").filters[:]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
    logging.getLogger("py.warnings").filters[:] = filters
    logging.captureWarnings(False)
    configure_file_labels(None)


def record(level: int, message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("agent.test", level, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        *[(logging.DEBUG, 7), (logging.INFO, 6), (25, 6), (logging.WARNING, 4), (35, 4), (logging.ERROR, 3)],
        *[(logging.CRITICAL, 2), (logging.CRITICAL + 10, 2), (5, 7)],
    ],
)
def test_levels_map_to_syslog_priorities(level: int, expected: int) -> None:
    assert priority(level) == expected


def test_journal_lines_carry_their_priority_on_every_line_and_no_timestamp() -> None:
    formatter = RedactingFormatter("%(levelname)s %(name)s [%(threadName)s] %(message)s", journal=True)
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        failed = logging.LogRecord(
            "agent.x", logging.ERROR, __file__, 1, "stage %s failed", ("engine",), None
        )
        failed.exc_info = sys.exc_info()
    lines = formatter.format(failed).split("\n")
    assert lines[0] == "<3>ERROR agent.x [MainThread] stage engine failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>across lines"
    assert not any(TIMESTAMP.search(line) for line in lines)
    assert formatter.format(record(logging.WARNING, "careful")).startswith("<4>WARNING ")


def test_json_lines_carry_the_structured_fields_and_stay_one_line() -> None:
    fields = {
        "event": "acquisition_end",
        "acquisition_id": "3f9a1c0e7b2d4a68",
        "reasons": [{"attribute": "TE"}],
    }
    line = JsonFormatter().format(record(logging.INFO, "line one\nline two", **fields))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["logger"] == "agent.test" and entry["thread"] == "MainThread"
    assert entry["message"] == "line one\nline two" and isinstance(entry["at"], float)
    assert {key: entry[key] for key in fields} == fields
    prefixed = JsonFormatter(journal=True).format(record(logging.WARNING, "w", stage="engine"))
    assert prefixed.startswith("<4>{") and json.loads(prefixed[3:])["stage"] == "engine"


def test_stderr_is_the_journal_only_when_the_device_and_inode_match(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as first, (tmp_path / "b").open("w") as second:
        st = os.fstat(first.fileno())
        named = {JOURNAL_STREAM: f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(first, named)
        assert not stderr_is_journal(second, named), "an inherited variable naming another stream"
        for value in ("", "12", "a:b", f"{st.st_dev}:"):
            assert not stderr_is_journal(first, {JOURNAL_STREAM: value})
        assert not stderr_is_journal(first, {})


def test_configure_logging_keeps_other_libraries_at_warning(restore_logging: None) -> None:
    stream = io.StringIO()
    config = AgentConfig(logging=LoggingConfig(level="DEBUG", format="text", loggers=("pynetdicom=INFO",)))
    configure_logging(config, stream)
    logging.getLogger("agent.ingest.watcher").debug("agent debug")
    logging.getLogger("watchdog.observers.inotify_buffer").debug("in-event /export/DOE^JOHN/IM1")
    logging.getLogger("watchdog.observers").warning("watchdog warning")
    logging.getLogger("pynetdicom.assoc").debug("Affected SOP Instance UID: 1.3.6.1.4.1.9.9.9.9")
    logging.getLogger("pynetdicom.assoc").info("pynetdicom info")
    text = stream.getvalue()
    assert "agent debug" in text and "watchdog warning" in text and "pynetdicom info" in text
    assert "DOE^JOHN" not in text and "Affected SOP Instance UID" not in text


def test_configured_level_above_warning_applies_to_everyone(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(AgentConfig(logging=LoggingConfig(level="ERROR", format="text")), stream)
    logging.getLogger("agent.x").warning("agent warning")
    logging.getLogger("zmq").warning("library warning")
    logging.getLogger("agent.x").error("agent error")
    assert stream.getvalue().count("\n") == 1 and "agent error" in stream.getvalue()


def test_captured_warnings_lose_the_values_they_quote(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(AgentConfig(logging=LoggingConfig(format="json")), stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Invalid value for VR PN: 'DOE^JOHN'", UserWarning, stacklevel=1)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["logger"] == "py.warnings" and "Invalid value for VR PN" in entry["message"]
    assert "DOE^JOHN" not in line


def test_log_lines_name_files_under_the_export_folder_by_label(restore_logging: None, tmp_path: Path) -> None:
    export = tmp_path / "export"
    stream = io.StringIO()
    configure_logging(
        AgentConfig(watch=WatchConfig(folder=export), logging=LoggingConfig(format="text")), stream
    )
    path = export / "DOE JOHN_123" / "IM0001.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    gone = export / "DOE JOHN_123" / "IM0002.dcm"
    log = logging.getLogger("agent.x")
    log.warning("raw path %s in a message", path)
    log.warning("deleted %s, with a space in its folder", gone)
    log.warning("series %s", "1.3.12.2.1107.5.2.30.25245.2015")
    lines = stream.getvalue().splitlines()
    assert "DOE" not in stream.getvalue() and "JOHN" not in stream.getvalue()
    assert lines[0].endswith(f"raw path {file_label(path)} in a message")
    # A path that no longer exists: where it ends is unknown, so the rest of the line is hidden with it.
    assert re.search(r"deleted file:[0-9a-f]{10}$", lines[1]), lines[1]
    assert lines[2].endswith("series <uid>")


# ----------------------------------------------------------------------------------------------- labels


def test_file_label_is_a_short_hash_of_the_path_relative_to_the_export_folder(
    restore_logging: None, tmp_path: Path
) -> None:
    configure_file_labels(tmp_path)
    path = tmp_path / "DOE^JOHN_123" / "IM0001.dcm"
    expected = hashlib.sha256(b"DOE^JOHN_123/IM0001.dcm").hexdigest()[:10]
    assert file_label(path) == f"file:{expected}"
    configure_file_labels(tmp_path / "elsewhere")
    assert file_label(path) != f"file:{expected}", "outside the export folder: the absolute path is hashed"
    configure_file_labels(tmp_path, "relative")
    assert file_label(path) == "DOE^JOHN_123/IM0001.dcm"
    assert file_label(tmp_path / "a\nb") == "a\\nb", "a file name cannot start a forged log line"


def test_error_text_keeps_the_reason_and_drops_paths_and_uids(restore_logging: None, tmp_path: Path) -> None:
    configure_file_labels(tmp_path)
    path = tmp_path / "DOE^JOHN" / "IM1"
    missing = FileNotFoundError(2, "No such file or directory", str(path))
    assert error_text(missing) == f"FileNotFoundError: No such file or directory ({file_label(path)})"
    quoted = ValueError(f"cannot read {path}: element of 1.3.12.2.1107.5.2.30.25245 ended early")
    assert (
        error_text(quoted, path)
        == f"ValueError: cannot read {file_label(path)}: element of <uid> ended early"
    )
    assert error_text(RuntimeError("")) == "RuntimeError: no detail"
    assert len(error_text(ValueError("x" * 1000))) < 250


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("study 1.3.12.2.1107.5.2.30.25245.2015 done.", "study <uid> done."),
        ("ends with 1.2.3.4.5.", "ends with <uid>."),
        ("transfer syntax 1.2.840.10008.1.2.4.50 refused", "transfer syntax 1.2.840.10008.1.2.4.50 refused"),
        ("peer 10.20.0.5:104, version 2.5.1, 0.74 mm", "peer 10.20.0.5:104, version 2.5.1, 0.74 mm"),
    ],
)
def test_redact_removes_instance_uids_only(text: str, expected: str) -> None:
    assert redact(text) == expected


# ---------------------------------------------------------------------------------- a real agent's stderr


def _failing_start_config(folder: Path, log_format: str) -> Path:
    """A configuration that logs a warning (plain sockets reachable from other machines), an info line (the
    journal opens) and an error (an unknown protocol), then exits 78 within seconds: no engine is loaded."""
    config = folder / "agent.toml"
    config.write_text(
        f'[watch]\nfolder = "export"\n[state]\nfolder = "var"\n'
        '[protocols]\nactive = ["no_such_protocol"]\n'
        f'[publish]\nendpoint = "tcp://0.0.0.0:{free_port()}"\nsecurity = "plain"\n'
        f'[metrics]\nlisten = ""\n[logging]\nformat = "{log_format}"\n'
    )
    return config


def _run_agent(config: Path, stderr: int, env: dict[str, str]) -> int:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )
    return result.returncode


def _journal_stream_of(path: Path) -> dict[str, str]:
    st = path.stat()
    return {JOURNAL_STREAM: f"{st.st_dev}:{st.st_ino}"}


@pytest.mark.parametrize("log_format", ["auto", "journal"])
def test_agent_writes_priority_prefixes_when_stderr_is_the_journal(tmp_path: Path, log_format: str) -> None:
    log = tmp_path / "stderr"
    log.touch()
    with log.open("w") as stderr:
        status = _run_agent(
            _failing_start_config(tmp_path, log_format), stderr.fileno(), _journal_stream_of(log)
        )
    assert status == 78
    lines = log.read_text().splitlines()
    assert lines, "the agent wrote nothing"
    assert all(PRIORITY_PREFIX.match(line) for line in lines), lines
    assert not any(TIMESTAMP.search(line) for line in lines), "journald stamps entries itself"
    warning = next(line for line in lines if "UNENCRYPTED" in line)
    assert warning.startswith("<4>WARNING agent.publish.security [MainThread] publish.security = plain")
    assert any(line.startswith("<6>INFO agent.ops.journal ") for line in lines)
    assert any(line.startswith("<3>ERROR agent ") and "no_such_protocol" in line for line in lines)


def test_agent_writes_text_when_journal_stream_names_another_stream(tmp_path: Path) -> None:
    log, other = tmp_path / "stderr", tmp_path / "other"
    other.touch()
    with log.open("w") as stderr:
        status = _run_agent(
            _failing_start_config(tmp_path, "auto"), stderr.fileno(), _journal_stream_of(other)
        )
    assert status == 78
    lines = log.read_text().splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines), lines
    assert not any(line.startswith("<") for line in lines)


def test_agent_json_lines_under_the_journal_carry_the_prefix_before_the_object(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    log.touch()
    with log.open("w") as stderr:
        status = _run_agent(_failing_start_config(tmp_path, "json"), stderr.fileno(), _journal_stream_of(log))
    assert status == 78
    entries = []
    for line in log.read_text().splitlines():
        match = PRIORITY_PREFIX.match(line)
        assert match, line
        entry = json.loads(line[match.end() :])
        assert priority(logging.getLevelName(entry["level"])) == int(match.group(1))
        entries.append(entry)
    assert {"WARNING", "INFO", "ERROR"} <= {e["level"] for e in entries}


# ------------------------------------------------------------------------------------------- real journald

JOURNALD = next(
    (p for p in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald") if Path(p).exists()),
    None,
)
JOURNALCTL = shutil.which("journalctl")


@pytest.fixture
def journald() -> Iterator[str]:
    """A systemd-journald of its own (a private namespace, so the host's journal is untouched); its name."""
    if JOURNALD is None or JOURNALCTL is None:
        pytest.skip("systemd-journald and journalctl are not installed")
    if os.geteuid() != 0:
        pytest.skip("running a journald of one's own needs root")
    namespace = f"sctlogtest{uuid.uuid4().hex[:8]}"
    runtime = Path(f"/run/systemd/journal.{namespace}")
    process = subprocess.Popen([JOURNALD, namespace], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10.0
        while not (runtime / "stdout").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"systemd-journald did not start here (status {process.poll()})")
            time.sleep(0.05)
        yield namespace
    finally:
        process.terminate()
        process.wait(10)
        machine_id = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else ""
        for folder in (
            runtime,
            *(Path(p) / f"{machine_id}.{namespace}" for p in ("/var/log/journal", "/run/log/journal")),
        ):
            shutil.rmtree(folder, ignore_errors=True)


def _journal_stream(namespace: str, identifier: str) -> socket.socket:
    """A stream connected to journald as systemd connects a service's stderr (systemd's stdout protocol: a
    header of identifier, unit, default priority, level-prefix flag and three forwarding flags)."""
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.connect(f"/run/systemd/journal.{namespace}/stdout")
    stream.shutdown(socket.SHUT_RD)
    stream.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    return stream


def test_journalctl_shows_the_agents_warnings_with_their_priority(journald: str, tmp_path: Path) -> None:
    stream = _journal_stream(journald, "sct-agent")
    try:
        st = os.fstat(stream.fileno())
        env = {JOURNAL_STREAM: f"{st.st_dev}:{st.st_ino}"}
        status = _run_agent(_failing_start_config(tmp_path, "auto"), stream.fileno(), env)
    finally:
        stream.close()
    assert status == 78

    def entries(*options: str) -> list[dict[str, str]]:
        result = subprocess.run(
            [
                JOURNALCTL or "journalctl",
                f"--namespace={journald}",
                "-t",
                "sct-agent",
                "-o",
                "json",
                *options,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return [json.loads(line) for line in result.stdout.splitlines()]

    deadline = time.monotonic() + 10.0
    while not any("no_such_protocol" in e["MESSAGE"] for e in entries()) and time.monotonic() < deadline:
        time.sleep(0.1)
    everything = entries()
    warnings_and_worse = entries("-p", "warning")
    assert any(e["PRIORITY"] == "6" and e["MESSAGE"].startswith("INFO agent.ops.journal") for e in everything)
    assert [(e["PRIORITY"], e["MESSAGE"].split(" ")[0]) for e in warnings_and_worse] == [
        ("4", "WARNING"),
        ("3", "ERROR"),
    ]
    assert not any(e["MESSAGE"].startswith("<") for e in everything), "journald strips the prefix"
