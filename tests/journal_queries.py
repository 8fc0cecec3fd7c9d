"""Questions about a state journal that only the tests ask, through a read-only connection of their own.

The agent asks its journal one question (``Journal.finished_acquisitions``); everything else it writes is for the
record. The tests check that record the way an operator's ``sqlite3`` shell would see it: another connection on the
same file, opened read-only, which in WAL mode sees every committed write and never blocks the writer.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from agent.ops.journal import BUSY_TIMEOUT_S, FILE_OUTCOMES, FINISHED_STATES
from agent.records import Reason, Verdict
from agent.vocabulary import AcquisitionState, Outcome


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What the journal holds about one file, identified by path, size and mtime."""

    path: Path
    size: int
    mtime_ns: int
    outcome: str
    reason: str
    acquisition_id: str | None
    at: float


@dataclass(frozen=True, slots=True)
class AcquisitionRecord:
    """What the journal holds about one acquisition."""

    acquisition_id: str
    state: AcquisitionState
    protocol_id: str | None
    first_image_at: float | None
    last_image_at: float | None
    updated_at: float


class JournalQueries:
    """Read-only queries on the journal at ``path``; one connection, for the thread that opened it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn = sqlite3.connect(
            f"file:{quote(str(self.path))}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> JournalQueries:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    # ------------------------------------------------------------------------------------------- files

    def file_record(self, path: Path, size: int, mtime_ns: int) -> FileRecord | None:
        """What was recorded for this exact file (same path, size and mtime), if anything."""
        rows = self._read(
            "SELECT outcome, reason, acquisition_id, at FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
            (str(path), size, mtime_ns),
        )
        if not rows:
            return None
        outcome, reason, acquisition_id, at = rows[0]
        return FileRecord(Path(path), size, mtime_ns, outcome, reason, acquisition_id, at)

    def file_already_ingested(self, path: Path, size: int, mtime_ns: int) -> bool:
        """True if this exact file was recorded with any outcome. A rewritten file (new size or mtime) is new."""
        return self.file_record(path, size, mtime_ns) is not None

    def files_of(self, acquisition_id: str) -> tuple[Path, ...]:
        """The accepted files of an acquisition, by path."""
        rows = self._read(
            "SELECT path FROM files WHERE acquisition_id = ? AND outcome = 'accepted' ORDER BY path",
            (acquisition_id,),
        )
        return tuple(Path(row[0]) for row in rows)

    # ------------------------------------------------------------------------------------ acquisitions

    def acquisition(self, acquisition_id: str) -> AcquisitionRecord | None:
        rows = self._read(
            """SELECT state, protocol_id, first_image_at, last_image_at, updated_at
            FROM acquisitions WHERE acquisition_id = ?""",
            (acquisition_id,),
        )
        if not rows:
            return None
        state, protocol_id, first_at, last_at, updated_at = rows[0]
        return AcquisitionRecord(
            acquisition_id, AcquisitionState(state), protocol_id, first_at, last_at, updated_at
        )

    def acquisition_state(self, acquisition_id: str) -> AcquisitionState | None:
        """The acquisition's state (a ``str``), or ``None`` if the journal has never seen it."""
        record = self.acquisition(acquisition_id)
        return None if record is None else record.state

    def unfinished_acquisitions(self) -> set[str]:
        """Acquisitions in a state outside ``FINISHED_STATES`` (passed: slabs or volume may not have gone out)."""
        states = sorted(s.value for s in frozenset(AcquisitionState) - FINISHED_STATES)
        marks = ", ".join("?" * len(states))
        rows = self._read(f"SELECT acquisition_id FROM acquisitions WHERE state IN ({marks})", tuple(states))
        return {row[0] for row in rows}

    def verdicts(self, acquisition_id: str) -> tuple[Verdict, ...]:
        """Every verdict recorded for an acquisition, oldest first, as ``Verdict`` records."""
        rows = self._read(
            """SELECT protocol_id, protocol_version, outcome, final, reasons, pending, at
            FROM verdicts WHERE acquisition_id = ? ORDER BY id""",
            (acquisition_id,),
        )
        return tuple(
            Verdict(
                acquisition_id=acquisition_id,
                protocol_id=protocol_id,
                protocol_version=protocol_version,
                outcome=Outcome(outcome),
                final=bool(final),
                reasons=tuple(Reason(**r) for r in json.loads(reasons)),
                pending=tuple(json.loads(pending)),
                decided_at=at,
            )
            for protocol_id, protocol_version, outcome, final, reasons, pending, at in rows
        )

    # ------------------------------------------------------------------------------------ publications

    def published_slabs(self, acquisition_id: str) -> dict[int, str]:
        """Slab index -> sha256 of every slab of the acquisition already published (made but unsent: left out)."""
        rows = self._read(
            "SELECT slab_index, sha256 FROM slabs WHERE acquisition_id = ? AND seq IS NOT NULL",
            (acquisition_id,),
        )
        return {int(index): sha for index, sha in rows}

    def published_volume(self, acquisition_id: str) -> str | None:
        """The sha256 of the acquisition's first published volume, or ``None`` if none went out."""
        rows = self._read(
            "SELECT sha256 FROM publications WHERE acquisition_id = ? AND kind = 'volume' ORDER BY id LIMIT 1",
            (acquisition_id,),
        )
        return rows[0][0] if rows else None

    def last_seq(self) -> int | None:
        """The highest sequence number published."""
        rows = self._read("SELECT MAX(seq) FROM publications")
        return None if rows[0][0] is None else int(rows[0][0])

    def summary(self) -> dict[str, int]:
        """Counts from one snapshot: ``files.<outcome>``, ``acquisitions.<state>``, and row totals."""
        counts: dict[str, int] = {f"files.{o}": 0 for o in FILE_OUTCOMES}
        counts.update({f"acquisitions.{s.value}": 0 for s in AcquisitionState})
        conn = self._conn
        conn.execute("BEGIN")  # one read snapshot for all the counts
        try:
            for outcome, n in conn.execute("SELECT outcome, COUNT(*) FROM files GROUP BY outcome"):
                counts[f"files.{outcome}"] = n
            for state, n in conn.execute("SELECT state, COUNT(*) FROM acquisitions GROUP BY state"):
                counts[f"acquisitions.{state}"] = n
            for table in ("verdicts", "slabs", "publications"):
                counts[table] = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        finally:
            conn.execute("COMMIT")
        return counts
