"""What the agent does when the journal's disk is full: it carries on, says so, and keeps what a restart needs.

SQLite answers a write on a full disk with ``SQLITE_FULL`` (agent.ops.journal raises ``JournalFullError``). A
stage must not die of it: the series in flight still has its verdict, slabs, volume and DICOM series to deliver,
and none of those needs the journal. So every journal write of the side services goes through
:class:`JournalWrites`:

- a **detail row** (a file, a verdict, a slab, a publication) that cannot be written is lost: it is counted
  (``sct_agent_journal_write_failures_total{table}``, ``sct_agent_disk_full_total{store="journal"}``); those rows
  are only the record;
- an **acquisition state** (the row a restart reads to skip what is finished) is kept in memory, latest state per
  acquisition, and written again from the retention thread's tick (``retry``) until there is room
  (``sct_agent_journal_pending_states``). If the agent stops before that, a restart does not know those
  acquisitions are finished and processes their files again, exactly as after a crash before the state was
  written;
- the first failure of an episode is logged as an error and published as an ``error`` status event (stage
  ``journal``) naming the journal and the cause; the first write that succeeds again is logged. A nearly full
  disk flaps (SQLite reuses the pages of its write-ahead log, so some writes fit where others do not): a new
  episode within ``REPORT_GAP_S`` of the last report is counted but not reported again, so the technologist's
  screen and the journal of the host do not fill with the same message.

New acquisitions are meanwhile refused by the free-space watermark (agent.ops.disk_space), since the journal
lives in the state folder; this covers the series that were in flight when the disk filled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from agent.ops.journal import Journal, JournalFullError
from agent.ops.metrics import AgentMetrics
from agent.records import StatusEvent
from agent.status_events import error_event

logger = logging.getLogger(__name__)

#: Acquisition states kept for a journal whose disk is full; beyond this the oldest is dropped (and logged).
MAX_PENDING_STATES: Final = 10_000
#: Seconds after a reported episode during which a new one (the disk flapping) is counted, not reported again.
REPORT_GAP_S: Final = 60.0


class JournalWrites:
    """Thread-safe: every stage's hooks write through it; ``retry`` runs on the retention thread."""

    def __init__(
        self,
        journal: Journal,
        metrics: AgentMetrics,
        publish: Callable[[StatusEvent], None],
        *,
        on_full: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._journal = journal
        self._clock = clock
        self._reported_at: float | None = None
        self._metrics = metrics
        self._publish = publish
        self._on_full = on_full
        #: Serialises acquisition-state writes with their retries, so an older pending state never overwrites a
        #: newer one written meanwhile.
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, str | None, float]] = {}
        self._full = False
        self._flag_lock = threading.Lock()

    @property
    def full(self) -> bool:
        """The last write failed for want of space."""
        return self._full

    @property
    def pending(self) -> int:
        return len(self._pending)

    def write(self, table: str, write: Callable[[], object]) -> None:
        """Run one detail-row ``write`` to ``table``; lose it (counted, reported) if the disk is full."""
        try:
            write()
        except JournalFullError as error:
            self._failed(table, error)
            return
        self._writable()

    def acquisition(self, acquisition_id: str, state: str, *, protocol_id: str | None = None) -> None:
        """Record an acquisition's state now, or keep it until there is room."""
        at = time.time()
        with self._lock:
            try:
                self._journal.record_acquisition(acquisition_id, state, protocol_id=protocol_id, at=at)
            except JournalFullError as error:
                self._pending.pop(acquisition_id, None)  # re-inserted last: the dict stays oldest first
                self._pending[acquisition_id] = (state, protocol_id, at)
                while len(self._pending) > MAX_PENDING_STATES:
                    dropped = next(iter(self._pending))
                    del self._pending[dropped]
                    logger.error("state journal: acquisition %s's state dropped (too many waiting)", dropped)
                self._metrics.set_journal_pending(len(self._pending))
                failed: JournalFullError | None = error
            else:
                self._pending.pop(acquisition_id, None)
                self._metrics.set_journal_pending(len(self._pending))
                failed = None
        if failed is not None:
            self._failed("acquisitions", failed)
        else:
            self._writable()

    def retry(self) -> None:
        """Write the acquisition states kept for want of space, oldest first; stop at the first that still fails."""
        if not self._pending:
            return
        written = 0
        with self._lock:
            for acquisition_id, (state, protocol_id, at) in list(self._pending.items()):
                try:
                    self._journal.record_acquisition(acquisition_id, state, protocol_id=protocol_id, at=at)
                except JournalFullError:
                    break
                del self._pending[acquisition_id]
                written += 1
            self._metrics.set_journal_pending(len(self._pending))
        if written:
            logger.info(
                "state journal: %d acquisition state(s) kept while the disk was full are written", written
            )
            if not self._pending:
                self._writable()

    def _failed(self, table: str, error: JournalFullError) -> None:
        self._metrics.journal_write_failed(table)
        self._metrics.disk_full("journal")
        now = self._clock()
        with self._flag_lock:
            first, self._full = not self._full, True
            report = first and (self._reported_at is None or now - self._reported_at >= REPORT_GAP_S)
            if report:
                self._reported_at = now
        if not report:
            return
        self._metrics.error("journal")
        logger.error(
            "%s; journal records are lost and acquisition states kept in memory until there is room", error
        )
        self._publish(
            error_event(
                None,
                stage="journal",
                message=(
                    f"state journal {error.path}: the disk is full (SQLITE_FULL); the agent carries on, records are "
                    "not kept and finished acquisitions are written when there is room"
                ),
                at=time.time(),
            )
        )
        if self._on_full is not None:
            self._on_full()

    def _writable(self) -> None:
        if not self._full or self._pending:
            return
        with self._flag_lock:
            was, self._full = self._full, False
        if was:
            logger.info("state journal %s: writes succeed again", self._journal.path)
