"""The state journal: what the agent has seen, decided and published, in SQLite, so that a restart loses nothing.

The rule: after a crash or restart nothing is lost and nothing is published twice with different content. The
journal records each file, acquisition, verdict, slab and publication as it happens, one transaction per call, and
answers the question the agent asks when it starts again: which acquisitions are finished (rejected, incomplete, or
their volume committed by the running model and, with DICOM output on, their series written). A volume is committed
here before it is sent (``commit_volume``), which is what makes "sent as new at most once" hold across a SIGKILL.
The rest of what it holds
(which files were handled and how, which slabs went out with what content) is for the record, read by an operator's
``sqlite3`` shell; the journal itself refuses a slab or volume published again with other content.

Why SQLite in WAL mode with ``synchronous=NORMAL``: a committed transaction survives a process crash (the WAL is
written before the commit returns) and only the last transactions can be lost on a power cut, never the file's
integrity; readers (``sct-agent check``, an operator's ``sqlite3`` shell) never block the agent's writes. The busy
timeout covers those other processes; inside the agent there is no contention to wait for (next paragraph).

Why one connection behind a lock rather than a connection per thread: SQLite admits one writer at a time anyway,
so per-thread connections would only turn in-process contention into ``SQLITE_BUSY`` retries; one connection also
closes deterministically in ``close()``, whereas a thread's connection outlives an ended thread unless that thread
remembers to close it. Each call is a single short statement or transaction (a row per file or slab, next to about
a second of inference per slab), so the lock is held for microseconds and costs the pipeline nothing.

What is stored: acquisition ids (opaque digests, ``records.py``), protocol ids, outcomes, reasons, hashes, times
and file paths. There are no patient names, IDs or birth dates in any record the journal takes. File paths are
stored because the operator needs them to find a bad or skipped file; some scanners name export folders after the
patient, so the journal is as sensitive as the export folder itself and is created readable by its owner only.

A file at the path that is not a journal (not SQLite, corrupt, another program's database, or written by a newer
agent) is refused with an error naming the path; it is never deleted or rewritten.

Retention (``prune_details``, ``forgettable_acquisitions``, ``forget_acquisitions``, ``reclaim_space``; run by
agent.ops.retention): the journal must stay bounded on a box that runs for years, but its ``acquisitions`` table is
what a restart reads to skip what is finished (``finished_acquisitions``). Forgetting an acquisition whose files
are still in the export folder would make a restart process and publish it again. So the two kinds of rows are
pruned differently:

- the detail rows (``files``, ``verdicts``, ``slabs``, ``publications``), which are the bulk (a row per file and per
  slab) and are only for the record, are deleted by age (``retention.journal_max_age_days``) and, beyond
  ``retention.journal_max_size_mb``, oldest first; except one ``files`` row per acquisition, its *anchor*: the path
  of the first file recorded for it;
- an ``acquisitions`` row (one small row per acquisition) is forgotten only when it is older than the age bound
  *and* its anchor file is gone from the export folder: then no file of it can come back at a restart (exports
  are removed whole). An acquisition without an anchor is kept: nothing says its files are gone. The caller
  checks the anchors and skips this while the export folder is missing or empty, which is how an unmounted share
  looks.

Deleted rows only become free pages inside the file. The journal therefore runs with ``auto_vacuum =
INCREMENTAL`` (``enable_space_reclaim`` converts an older file once with ``VACUUM`` at start, when nothing else
writes) and each prune ends with ``PRAGMA incremental_vacuum`` and a ``wal_checkpoint(TRUNCATE)``, so the file
and its WAL really shrink; ``journal_size_limit`` caps what a checkpoint leaves of the WAL. Deletes run in
batches of ``PRUNE_BATCH_ROWS``, each its own short transaction, so stage threads never wait for a whole prune.
Incremental rather than full auto-vacuum: full would move pages on every commit, on the stage threads' writes.

A full disk: SQLite answers a write with ``SQLITE_FULL`` ("database or disk is full") and rolls the transaction
back; the journal raises :class:`JournalFullError` for it, a :class:`JournalError` like the others, and stays
usable: the next write succeeds once there is space. What the agent does meanwhile is decided by its caller
(agent.ops.journal_disk_full).

One module on purpose: the schema, its migration and every statement that writes it share one connection and
one lock; a write's SQL sits next to the table it writes and the transaction that guards it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from agent.records import Verdict
from agent.vocabulary import AcquisitionState, FileOutcome, Outcome
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

#: The schema this code writes, kept in ``PRAGMA user_version``. Bump it with a step in ``_MIGRATIONS``.
SCHEMA_VERSION: Final = 3
#: How long a write waits for another process's lock (an operator's shell mid-transaction) before failing.
BUSY_TIMEOUT_S: Final = 5.0
#: New journal files are readable by their owner only: paths may name patients (module docstring).
JOURNAL_FILE_MODE: Final = 0o600

#: What became of a file the watcher handed over (the same set as the metrics' ``outcome`` label).
FILE_OUTCOMES: Final = tuple(outcome.value for outcome in FileOutcome)
#: What a publication carries.
PUBLICATION_KINDS: Final = ("slab", "volume")
_SHA256_HEX_LENGTH: Final = 64


#: States after which the agent has nothing left to do for an acquisition.
FINISHED_STATES: Final = frozenset(
    {
        AcquisitionState.REJECTED,
        AcquisitionState.INCOMPLETE,
        AcquisitionState.PUBLISHED,
    }
)


class JournalError(SctError, RuntimeError):
    """The journal cannot be opened or used; ``path`` names the file."""

    def __init__(self, path: Path, message: str, *, found: object = None, expected: str = "") -> None:
        super().__init__(
            f"state journal {path}: {message}",
            attribute=f"state journal {path}",
            found=found,
            expected=expected,
        )
        self.path = path


class JournalSchemaError(JournalError):
    """The journal's schema version is one this agent cannot use (written by a newer agent)."""

    def __init__(self, path: Path, found: int, supported: int) -> None:
        super().__init__(
            path,
            f"schema version {found} is newer than this agent supports ({supported}); "
            "run the agent version that wrote it, or move the file aside to start a new journal",
            found=found,
            expected=f"schema version {supported} or older",
        )
        self.supported = supported


class JournalConflictError(JournalError):
    """A record would contradict what the journal says was already published (same slab, other content)."""


class JournalFullError(JournalError):
    """A write failed because the journal's filesystem is full (SQLITE_FULL); nothing of it was kept."""


# One list of statements per schema version; version N's list builds the whole schema from nothing.
_SCHEMA_V1: Final = (
    """CREATE TABLE files (
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL,
        acquisition_id TEXT,
        at REAL NOT NULL,
        PRIMARY KEY (path, size, mtime_ns)
    )""",
    "CREATE INDEX files_by_acquisition ON files (acquisition_id)",
    """CREATE TABLE acquisitions (
        acquisition_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        protocol_id TEXT,
        first_image_at REAL,
        last_image_at REAL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX acquisitions_by_state ON acquisitions (state)",
    """CREATE TABLE verdicts (
        id INTEGER PRIMARY KEY,
        acquisition_id TEXT NOT NULL,
        protocol_id TEXT NOT NULL,
        protocol_version TEXT NOT NULL,
        outcome TEXT NOT NULL,
        final INTEGER NOT NULL,
        reasons TEXT NOT NULL,
        pending TEXT NOT NULL,
        at REAL NOT NULL
    )""",
    "CREATE INDEX verdicts_by_acquisition ON verdicts (acquisition_id)",
    """CREATE TABLE slabs (
        acquisition_id TEXT NOT NULL,
        slab_index INTEGER NOT NULL,
        start INTEGER NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        seq INTEGER,
        at REAL NOT NULL,
        PRIMARY KEY (acquisition_id, slab_index)
    )""",
    """CREATE TABLE publications (
        id INTEGER PRIMARY KEY,
        acquisition_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        at REAL NOT NULL
    )""",
    "CREATE INDEX publications_by_acquisition ON publications (acquisition_id, kind)",
)
#: Version 2: the sCT volume of each acquisition, per model, committed before it is sent, and its DICOM series.
#: One row per (acquisition, model) is what makes "published exactly once per model version" checkable: a
#: restart that infers the acquisition again finds the row and does not send it a second time.
_VOLUMES_V2: Final = (
    """CREATE TABLE volumes (
        acquisition_id TEXT NOT NULL,
        model TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        committed_at REAL NOT NULL,
        dicom_series TEXT,
        dicom_at REAL,
        PRIMARY KEY (acquisition_id, model)
    )""",
)
#: Version 3: what the confidence check found on each committed volume (issue #17): the number of regions not to
#: trust (NULL: not checked, the model has no confidence output), their volume and the regions themselves (JSON:
#: 0-based ranges, mL, lowest confidence), so that "was this sCT flagged?" is answered after the fact.
_FLAGGED_V3: Final = (
    "ALTER TABLE volumes ADD COLUMN flagged INTEGER",
    "ALTER TABLE volumes ADD COLUMN flagged_ml REAL",
    "ALTER TABLE volumes ADD COLUMN flagged_regions TEXT",
)
_TABLES: Final = frozenset({"files", "acquisitions", "verdicts", "slabs", "publications", "volumes"})
#: Statements that take a journal from version N (the key) to N + 1.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {1: _VOLUMES_V2, 2: _FLAGGED_V3}

#: Tables of detail rows, pruned by age (module docstring); each has an ``at`` column.
DETAIL_TABLES: Final = ("files", "verdicts", "slabs", "publications")
#: Rows deleted per transaction while pruning: the lock is free between batches.
PRUNE_BATCH_ROWS: Final = 2000
#: Bytes of WAL a checkpoint leaves behind (``PRAGMA journal_size_limit``): a burst of deletes must not leave a
#: large WAL on a disk that is short of space.
WAL_SIZE_LIMIT_BYTES: Final = 4 * 1024 * 1024
#: ``PRAGMA auto_vacuum`` value of INCREMENTAL.
_AUTO_VACUUM_INCREMENTAL: Final = 2
#: SQLite's primary result code for "database or disk is full".
_SQLITE_FULL: Final = 13


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    text = str(value)
    if text not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {text!r}")
    return text


def _check_sha256(value: str) -> str:
    if len(value) != _SHA256_HEX_LENGTH or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"sha256 must be {_SHA256_HEX_LENGTH} lower-case hex digits; got {value!r}")
    return value


def _state(value: str) -> AcquisitionState:
    try:
        return AcquisitionState(value)
    except ValueError:
        allowed = ", ".join(s.value for s in AcquisitionState)
        raise ValueError(f"acquisition state must be one of {allowed}; got {value!r}") from None


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any: SQLite ends one itself on some errors (SQLITE_FULL among them),
    and a ROLLBACK then would fail and hide the error that matters."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("state journal: ROLLBACK failed")


def _disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF == _SQLITE_FULL
    return "disk is full" in str(exc)


def _now(at: float | None) -> float:
    return time.time() if at is None else at


def _create_private(path: Path) -> None:
    """Create an empty journal file (a valid empty SQLite database) readable by its owner only."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, JOURNAL_FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise JournalError(path, f"cannot create the file: {exc.strerror or exc}") from exc
    os.close(fd)


class Journal:
    """The agent's state journal in one SQLite file; safe to call from every stage thread."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        if not self._path.exists():
            _create_private(self._path)
        try:
            self._conn = sqlite3.connect(
                self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise JournalError(self._path, f"cannot open: {exc}") from exc
        try:
            self._prepare()
        except BaseException:
            self._conn.close()
            raise
        logger.info("state journal %s open (schema version %d)", self._path, SCHEMA_VERSION)

    @property
    def path(self) -> Path:
        return self._path

    # ------------------------------------------------------------------------------------------- opening

    def _prepare(self) -> None:
        """Check the file is a journal this agent can use, then switch on WAL and bring the schema up to date.

        Everything that could refuse the file runs before ``journal_mode=WAL``, which is persistent: a file that
        is refused is left exactly as it was.
        """
        conn = self._conn
        try:
            # The first statement that reads the file: a non-SQLite file fails here.
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise JournalSchemaError(self._path, version, SCHEMA_VERSION)
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise JournalError(self._path, f"the database is corrupt ({check}); move it aside")
            if version == 0:
                self._refuse_foreign_database()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(
                    self._path, f"cannot switch to WAL mode (got {mode!r}); is it on a network share?"
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.OperationalError as exc:
            raise JournalError(self._path, f"cannot open: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise JournalError(self._path, f"not a readable SQLite journal ({exc}); move it aside") from exc

    def _refuse_foreign_database(self) -> None:
        """A database without our version stamp must be empty: anything else is another program's file."""
        tables = sorted(
            row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        )
        if tables:
            raise JournalError(
                self._path,
                f"an SQLite database that is not a state journal (tables {', '.join(tables)}); "
                "move it aside or choose another path",
            )

    def _migrate(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again inside the write lock: another process may have created the schema meanwhile.
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise JournalSchemaError(self._path, version, SCHEMA_VERSION)
            if version == 0:
                self._refuse_foreign_database()
                for statement in _SCHEMA_V1:
                    conn.execute(statement)
                version = 1
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
            conn.execute(f"PRAGMA user_version = {version:d}")
            missing = _TABLES - {
                row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if missing:
                raise JournalError(
                    self._path, f"schema version {version} but tables missing: {', '.join(sorted(missing))}"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------------------------------ plumbing

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; rolled back if anything in it fails."""
        with self._lock:
            self._ensure_open()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    _rollback(conn)
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)  # a failed COMMIT can leave the transaction open
                raise self._write_error(exc) from exc

    def _write_error(self, exc: sqlite3.Error) -> JournalError:
        if _disk_full(exc):
            return JournalFullError(
                self._path,
                f"write failed, the disk is full ({exc})",
                found="SQLITE_FULL",
                expected="free space on the state folder's filesystem",
            )
        return JournalError(self._path, f"write failed: {exc}")

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            self._ensure_open()
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(self._path, f"read failed: {exc}") from exc

    def _ensure_open(self) -> None:
        if self._closed:
            raise JournalError(self._path, "the journal is closed")

    # ------------------------------------------------------------------------------------------- records

    def record_file(
        self,
        path: Path,
        size: int,
        mtime_ns: int,
        outcome: str,
        reason: str = "",
        acquisition_id: str | None = None,
        *,
        at: float | None = None,
    ) -> None:
        """Record what became of a file; the same (path, size, mtime) recorded again replaces the earlier row."""
        outcome = _check_choice("file outcome", outcome, FILE_OUTCOMES)
        with self._transaction() as conn:
            conn.execute(
                """INSERT INTO files (path, size, mtime_ns, outcome, reason, acquisition_id, at)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (path, size, mtime_ns) DO UPDATE SET
                    outcome = excluded.outcome, reason = excluded.reason,
                    acquisition_id = excluded.acquisition_id, at = excluded.at""",
                (str(path), size, mtime_ns, outcome, reason, acquisition_id, _now(at)),
            )

    def record_acquisition(
        self,
        acquisition_id: str,
        state: str,
        *,
        protocol_id: str | None = None,
        first_image_at: float | None = None,
        last_image_at: float | None = None,
        at: float | None = None,
    ) -> None:
        """Create or update an acquisition. ``None`` leaves a field as it was; ``state`` always replaces."""
        checked = _state(state)
        with self._transaction() as conn:
            conn.execute(
                """INSERT INTO acquisitions
                    (acquisition_id, state, protocol_id, first_image_at, last_image_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (acquisition_id) DO UPDATE SET
                    state = excluded.state,
                    protocol_id = COALESCE(excluded.protocol_id, protocol_id),
                    first_image_at = COALESCE(excluded.first_image_at, first_image_at),
                    last_image_at = COALESCE(excluded.last_image_at, last_image_at),
                    updated_at = excluded.updated_at""",
                (acquisition_id, checked.value, protocol_id, first_image_at, last_image_at, _now(at)),
            )

    def record_verdict(self, verdict: Verdict) -> None:
        """Append a verdict (provisional or final), its reasons kept as JSON, stamped with ``decided_at``."""
        reasons = json.dumps(
            [
                {
                    "protocol_id": r.protocol_id,
                    "attribute": r.attribute,
                    "found": r.found,
                    "required": r.required,
                    "category": r.category,
                }
                for r in verdict.reasons
            ],
            ensure_ascii=False,
        )
        with self._transaction() as conn:
            conn.execute(
                """INSERT INTO verdicts
                    (acquisition_id, protocol_id, protocol_version, outcome, final, reasons, pending, at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    verdict.acquisition_id,
                    verdict.protocol_id,
                    verdict.protocol_version,
                    Outcome(verdict.outcome).value,
                    int(verdict.final),
                    reasons,
                    json.dumps(list(verdict.pending), ensure_ascii=False),
                    verdict.decided_at,
                ),
            )

    def record_slab(
        self,
        acquisition_id: str,
        slab_index: int,
        start: int,
        size: int,
        sha256: str,
        seq: int | None = None,
        *,
        at: float | None = None,
    ) -> bool:
        """Record a slab when it is made (``seq=None``) or once published (its ``seq``). True if a row changed.

        A published slab's content is fixed: the same index with another hash, start or size raises
        ``JournalConflictError`` and changes nothing, because the journal must not vouch for a second, different
        version of something already sent. A slab made but not yet published may be replaced (a restart infers
        it again). Recording a published slab again with the same content keeps its first ``seq``.
        """
        _check_sha256(sha256)
        if slab_index < 0 or start < 0 or size <= 0:
            raise ValueError(
                f"slab index and start must be >= 0 and size > 0; got {slab_index}, {start}, {size}"
            )
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT start, size, sha256, seq FROM slabs WHERE acquisition_id = ? AND slab_index = ?",
                (acquisition_id, slab_index),
            ).fetchone()
            if row is None:
                conn.execute(
                    """INSERT INTO slabs (acquisition_id, slab_index, start, size, sha256, seq, at)
                    VALUES (?, ?, ?, ?, ?, ?, ?)""",
                    (acquisition_id, slab_index, start, size, sha256, seq, _now(at)),
                )
                return True
            same = (row[0], row[1], row[2]) == (start, size, sha256)
            if row[3] is not None:
                if not same:
                    raise JournalConflictError(
                        self._path,
                        f"slab {slab_index} of acquisition {acquisition_id} was published as start {row[0]}, "
                        f"size {row[1]}, sha256 {row[2][:12]}…; refusing start {start}, size {size}, "
                        f"sha256 {sha256[:12]}…",
                    )
                return False
            if same and seq is None:
                return False
            conn.execute(
                """UPDATE slabs SET start = ?, size = ?, sha256 = ?, seq = ?, at = ?
                WHERE acquisition_id = ? AND slab_index = ?""",
                (start, size, sha256, seq, _now(at), acquisition_id, slab_index),
            )
            return True

    def record_publication(
        self,
        acquisition_id: str,
        kind: str,
        seq: int,
        sha256: str,
        *,
        slab_index: int | None = None,
        at: float | None = None,
    ) -> None:
        """Append one message published (a slab or a volume) with its sequence number and payload hash.

        For a slab, the slab recorded when it was made is marked published under ``seq``: the one at
        ``slab_index`` when given (pass it: two slabs of one acquisition can have equal content, all air), else
        the only unpublished slab of the acquisition with this hash, if exactly one. A slab or volume whose hash
        differs from what the journal holds as published for it raises ``JournalConflictError``.
        """
        kind = _check_choice("publication kind", kind, PUBLICATION_KINDS)
        _check_sha256(sha256)
        with self._transaction() as conn:
            if kind == "volume":
                row = conn.execute(
                    "SELECT sha256 FROM publications WHERE acquisition_id = ? AND kind = 'volume' AND sha256 != ?",
                    (acquisition_id, sha256),
                ).fetchone()
                if row is not None:
                    raise JournalConflictError(
                        self._path,
                        f"the volume of acquisition {acquisition_id} was published with sha256 {row[0][:12]}…; "
                        f"refusing sha256 {sha256[:12]}…",
                    )
            elif slab_index is not None:
                row = conn.execute(
                    "SELECT sha256, seq FROM slabs WHERE acquisition_id = ? AND slab_index = ?",
                    (acquisition_id, slab_index),
                ).fetchone()
                # An unpublished row with other content is the slab of a stream started again (a new grid)
                # while the cancelled one's slab was still queued: the late send is recorded, not refused.
                if row is not None and row[0] != sha256 and row[1] is not None:
                    raise JournalConflictError(
                        self._path,
                        f"slab {slab_index} of acquisition {acquisition_id} is recorded with sha256 "
                        f"{row[0][:12]}…; refusing a publication with sha256 {sha256[:12]}…",
                    )
                conn.execute(
                    """UPDATE slabs SET seq = ?
                    WHERE acquisition_id = ? AND slab_index = ? AND sha256 = ? AND seq IS NULL""",
                    (seq, acquisition_id, slab_index, sha256),
                )
            else:
                matches = conn.execute(
                    "SELECT slab_index FROM slabs WHERE acquisition_id = ? AND sha256 = ? AND seq IS NULL",
                    (acquisition_id, sha256),
                ).fetchall()
                if len(matches) == 1:
                    conn.execute(
                        "UPDATE slabs SET seq = ? WHERE acquisition_id = ? AND slab_index = ?",
                        (seq, acquisition_id, matches[0][0]),
                    )
            conn.execute(
                "INSERT INTO publications (acquisition_id, kind, seq, sha256, at) VALUES (?, ?, ?, ?, ?)",
                (acquisition_id, kind, seq, sha256, _now(at)),
            )

    def void_slabs(self, acquisition_id: str) -> None:
        """Forget the slabs of a stream that was cancelled (a new slice grid, a failed engine): subscribers were
        told to drop them, and the stream started again makes slabs of the same index with other content."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM slabs WHERE acquisition_id = ?", (acquisition_id,))

    def commit_volume(
        self, acquisition_id: str, model: str, sha256: str, *, at: float | None = None
    ) -> str | None:
        """Commit the sCT volume of ``acquisition_id`` made by ``model`` before it is sent; returns the sha256
        committed earlier (a restart inferred the acquisition again), or None if this is the first.

        Called before the volume goes on the wire, never after: a crash between the commit and the send leaves a
        committed volume that the volume archive republishes at the next start, whereas a commit after the send
        could leave a sent volume the journal does not know, which a restart would send again. A different
        sha256 for the same acquisition and model is not recorded (the first stays) and is returned for the
        caller to report.
        """
        _check_sha256(sha256)
        if not model:
            raise ValueError("model must name the model and its version; got ''")
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT sha256 FROM volumes WHERE acquisition_id = ? AND model = ?", (acquisition_id, model)
            ).fetchone()
            now = _now(at)
            if row is None:
                conn.execute(
                    "INSERT INTO volumes (acquisition_id, model, sha256, committed_at) VALUES (?, ?, ?, ?)",
                    (acquisition_id, model, sha256, now),
                )
            # In the same transaction: a committed volume is a published one, whether or not the send that
            # follows happens before a crash (the archive sends it at the next start); and a restart's final
            # verdict, which said "passed" again, is corrected.
            conn.execute(
                "UPDATE acquisitions SET state = ?, updated_at = ? WHERE acquisition_id = ? AND state != ?",
                (AcquisitionState.PUBLISHED.value, now, acquisition_id, AcquisitionState.PUBLISHED.value),
            )
            return None if row is None else str(row[0])

    def record_flagged(
        self,
        acquisition_id: str,
        model: str,
        *,
        flagged: int | None,
        volume_ml: float | None,
        regions: list[dict[str, Any]],
    ) -> None:
        """Record what the confidence check found on the committed volume of ``acquisition_id`` by ``model``:
        ``flagged`` regions (0: checked, none; None: not checked) of ``volume_ml`` mL in all, and the regions."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE volumes SET flagged = ?, flagged_ml = ?, flagged_regions = ? "
                "WHERE acquisition_id = ? AND model = ?",
                (flagged, volume_ml, json.dumps(regions, separators=(",", ":")), acquisition_id, model),
            )

    def flagged(self, acquisition_id: str, model: str) -> tuple[int | None, float | None, list[Any]] | None:
        """(regions flagged, their mL, the regions) of a committed volume; None when no volume is committed."""
        rows = self._read(
            "SELECT flagged, flagged_ml, flagged_regions FROM volumes WHERE acquisition_id = ? AND model = ?",
            (acquisition_id, model),
        )
        if not rows:
            return None
        count, volume_ml, regions = rows[0]
        return (
            None if count is None else int(count),
            None if volume_ml is None else float(volume_ml),
            json.loads(regions) if regions else [],
        )

    def record_dicom_series(
        self, acquisition_id: str, model: str, sha256: str, series_folder: str, *, at: float | None = None
    ) -> None:
        """Record that the DICOM series of the volume (``sha256``) is complete on disk in ``series_folder``.

        The volume's commit is normally there already; where it was lost (its write met a full disk, and the
        volume went out uncommitted) this records it too, with the acquisition published: the series on disk is
        of that volume, and a restart must not make it again.
        """
        _check_sha256(sha256)
        now = _now(at)
        with self._transaction() as conn:
            conn.execute(
                """INSERT INTO volumes (acquisition_id, model, sha256, committed_at, dicom_series, dicom_at)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (acquisition_id, model) DO UPDATE SET
                    dicom_series = excluded.dicom_series, dicom_at = excluded.dicom_at""",
                (acquisition_id, model, sha256, now, series_folder, now),
            )
            conn.execute(
                "UPDATE acquisitions SET state = ?, updated_at = ? WHERE acquisition_id = ? AND state != ?",
                (AcquisitionState.PUBLISHED.value, now, acquisition_id, AcquisitionState.PUBLISHED.value),
            )

    # ------------------------------------------------------------------------------------------- queries

    def finished_acquisitions(self, model: str | None = None, *, dicom: bool = False) -> set[str]:
        """Acquisitions with nothing left to do, whose files a restart leaves alone.

        Without ``model``: every acquisition in a finished state (rejected, incomplete, published). With it:
        rejected and incomplete ones; those whose volume ``model`` committed (and, with ``dicom``, whose DICOM
        series is written: otherwise the restart infers it again for the series, without sending it twice);
        and those published without a volume row for ``model`` (by another model version, or journalled before
        schema 2): a model upgrade does not reprocess every series still in the export folder.
        """
        marks = ", ".join("?" * len(FINISHED_STATES))
        if model is None:
            rows = self._read(
                f"SELECT acquisition_id FROM acquisitions WHERE state IN ({marks})",
                tuple(s.value for s in FINISHED_STATES),
            )
            return {row[0] for row in rows}
        rows = self._read(
            """SELECT a.acquisition_id FROM acquisitions a
            LEFT JOIN volumes v ON v.acquisition_id = a.acquisition_id AND v.model = ?
            WHERE a.state IN (?, ?) OR (a.state = ? AND v.acquisition_id IS NULL)
            UNION SELECT acquisition_id FROM volumes WHERE model = ?"""
            + (" AND dicom_series IS NOT NULL" if dicom else ""),
            (
                model,
                AcquisitionState.REJECTED.value,
                AcquisitionState.INCOMPLETE.value,
                AcquisitionState.PUBLISHED.value,
                model,
            ),
        )
        return {row[0] for row in rows}

    def committed_volume(self, acquisition_id: str, model: str) -> str | None:
        """The sha256 of the volume committed for ``acquisition_id`` by ``model``, or None."""
        rows = self._read(
            "SELECT sha256 FROM volumes WHERE acquisition_id = ? AND model = ?", (acquisition_id, model)
        )
        return str(rows[0][0]) if rows else None

    # ----------------------------------------------------------------------------------------- retention

    def enable_space_reclaim(self) -> bool:
        """Make deleted rows give their space back (module docstring); call at start, before stages write.

        Sets ``journal_size_limit`` on this connection and, for a journal without ``auto_vacuum = INCREMENTAL``,
        converts it once with ``VACUUM`` (it rewrites the file: about its size in free space and a second per
        hundred MB). True when it converted. Raises :class:`JournalFullError` when there is no room to convert;
        the journal stays as it was and usable.
        """
        with self._lock:
            self._ensure_open()
            conn = self._conn
            try:
                conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES:d}")
                if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == _AUTO_VACUUM_INCREMENTAL:
                    return False
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            return True

    def prune_details(self, before: float) -> int:
        """Delete detail rows recorded before ``before`` (epoch seconds), keeping each recorded acquisition's
        anchor file row; returns the rows deleted. Batches of ``PRUNE_BATCH_ROWS``, one transaction each."""
        anchors = {
            row[0]
            for row in self._read(
                """SELECT MIN(rowid) FROM files WHERE acquisition_id IN (SELECT acquisition_id FROM acquisitions)
                GROUP BY acquisition_id"""
            )
        }
        deleted = 0
        for table in DETAIL_TABLES:
            last = 0
            while True:
                with self._transaction() as conn:
                    rowids = [
                        row[0]
                        for row in conn.execute(
                            f"SELECT rowid FROM {table} WHERE rowid > ? AND at < ? ORDER BY rowid LIMIT ?",
                            (last, before, PRUNE_BATCH_ROWS),
                        )
                    ]
                    if rowids:
                        last = rowids[-1]
                        doomed = [(r,) for r in rowids if table != "files" or r not in anchors]
                        conn.executemany(f"DELETE FROM {table} WHERE rowid = ?", doomed)
                        deleted += len(doomed)
                if len(rowids) < PRUNE_BATCH_ROWS:
                    break
        return deleted

    def oldest_detail_at(self) -> float | None:
        """When the oldest detail row was recorded (None when there is none)."""
        oldest = [
            row[0]
            for table in DETAIL_TABLES
            for row in self._read(f"SELECT MIN(at) FROM {table}")
            if row[0] is not None
        ]
        return min(oldest) if oldest else None

    def forgettable_acquisitions(self, before: float) -> list[tuple[str, Path | None]]:
        """Acquisitions last updated before ``before``, each with its anchor file (None: no file recorded)."""
        rows = self._read(
            """SELECT a.acquisition_id,
                (SELECT f.path FROM files f WHERE f.acquisition_id = a.acquisition_id ORDER BY f.rowid LIMIT 1)
            FROM acquisitions a WHERE a.updated_at < ?""",
            (before,),
        )
        return [(row[0], None if row[1] is None else Path(row[1])) for row in rows]

    def forget_acquisitions(self, acquisition_ids: list[str]) -> int:
        """Delete every row of these acquisitions (their files are gone: module docstring); returns rows deleted."""
        deleted = 0
        for start in range(0, len(acquisition_ids), PRUNE_BATCH_ROWS):
            batch = [(aid,) for aid in acquisition_ids[start : start + PRUNE_BATCH_ROWS]]
            with self._transaction() as conn:
                for table in ("acquisitions", "volumes", *DETAIL_TABLES):
                    changes = conn.total_changes
                    conn.executemany(f"DELETE FROM {table} WHERE acquisition_id = ?", batch)
                    deleted += conn.total_changes - changes
        return deleted

    def reclaim_space(self) -> None:
        """Give free pages back to the filesystem and truncate the WAL (module docstring)."""
        with self._lock:
            self._ensure_open()
            try:
                # executescript steps the pragma to the end; execute() would free a single page.
                self._conn.executescript("PRAGMA incremental_vacuum;")
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                _rollback(self._conn)
                raise self._write_error(exc) from exc

    def used_bytes(self) -> int:
        """Bytes of the file that hold data (pages in use), whatever free pages it still holds."""
        page_size, pages, free = (
            self._read("PRAGMA page_size")[0][0],
            self._read("PRAGMA page_count")[0][0],
            self._read("PRAGMA freelist_count")[0][0],
        )
        return int(page_size) * (int(pages) - int(free))

    def file_bytes(self) -> int:
        """Bytes the journal takes on disk: the database file and its WAL."""
        total = 0
        for path in (self._path, self._path.with_name(self._path.name + "-wal")):
            with suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def row_count(self) -> int:
        """Rows in every table (the journal's items, for the retention metrics)."""
        return sum(int(self._read(f"SELECT COUNT(*) FROM {table}")[0][0]) for table in sorted(_TABLES))

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL into the file). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
