"""Free disk space: a new acquisition is taken only while the folders the agent writes have room for it.

Why at the admission of a new acquisition: a series started on a nearly full disk fails halfway (its volume not
archived, its DICOM series not written, its journal rows lost) after minutes of inference, and leaves the
technologist with nothing and no clear reason. Refused at its first file instead, it stays in the export folder,
its refusal says which folder is short, how much is free and how much the agent keeps free
(``retention.min_free_mb``), and it is taken as soon as there is room (the assembler holds its files and asks
again at every idle tick). Acquisitions already open are never refused: a series in flight finishes if it can.
The folders are the state folder (journal, volume archive) and the DICOM folder.

When ``statvfs`` is read: afresh for each new acquisition (one call per series is nothing, and a disk that
filled a moment ago must not let a series in); from a cache at most ``CHECK_INTERVAL_S`` old for the questions
asked often: an acquisition already waiting (asked at every idle tick of the assembler, twenty times a second),
the retention thread's poll and the metrics. Free space is what an unprivileged writer may use (``f_bavail``),
the agent's own view: it never runs as root.

Retention first: when free space drops below the watermark, retention runs at once (``prune_now``; it may free
enough). A refusal is announced (status event, counter, log line) only once that run has finished and space is
still short, or ``PRUNE_GRACE_S`` later, so a refusal that pruning avoided is never announced. Meanwhile the
acquisition waits as a refused one does.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.ops.metrics import AgentMetrics
from agent.records import StatusEvent
from agent.status_events import refused_event

logger = logging.getLogger(__name__)

#: Seconds a filesystem's free space is taken as known before it is read again.
CHECK_INTERVAL_S: Final = 1.0
#: Seconds after free space dropped below the watermark that a refusal is announced even if retention has not
#: finished its run by then.
PRUNE_GRACE_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Shortage:
    """A written folder whose filesystem has less free space than the watermark."""

    store: str
    folder: Path
    free_bytes: int
    min_free_bytes: int


class DiskGuard:
    """Thread-safe: the assembler's thread admits, the retention thread polls, the metrics server reads."""

    def __init__(
        self,
        folders: Mapping[str, Path],
        min_free_bytes: int,
        *,
        publish: Callable[[StatusEvent], None],
        metrics: AgentMetrics,
        prune_now: Callable[[], None] | None = None,
        prune_runs: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
    ) -> None:
        self._folders = dict(folders)
        self._min_free = int(min_free_bytes)
        self._publish = publish
        self._metrics = metrics
        self._prune_now = prune_now
        self._prune_runs = prune_runs
        self._clock = clock
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self._free: dict[str, tuple[float, int | None]] = {}
        self._short: Shortage | None = None
        self._short_since = 0.0
        self._prune_mark = 0
        #: Acquisitions told to wait, and those of them whose refusal was announced.
        self._waiting: set[str] = set()
        self._refused: set[str] = set()
        self._unreadable: set[str] = set()
        metrics.set_min_free(self._min_free)
        for store in self._folders:
            metrics.watch_disk_free(store, functools.partial(self._free_or_zero, store))
        metrics.watch_accepting(lambda: self.shortage() is None)

    @property
    def min_free_bytes(self) -> int:
        return self._min_free

    def _free_or_zero(self, store: str) -> float:
        return float(self.free_bytes(store) or 0)

    def free_bytes(self, store: str, *, fresh: bool = False) -> int | None:
        """Free bytes on ``store``'s filesystem, read now or at most ``CHECK_INTERVAL_S`` ago (``fresh``: now);
        None when it cannot be read."""
        now = self._clock()
        with self._lock:
            cached = self._free.get(store)
            if not fresh and cached is not None and now - cached[0] < CHECK_INTERVAL_S:
                return cached[1]
        folder = self._folders[store]
        try:
            st = self._statvfs(folder)
            free: int | None = st.f_bavail * st.f_frsize
        except OSError as error:
            free = None
            if store not in self._unreadable:
                logger.error("free space of %s (%s folder) cannot be read: %s", folder, store, error)
        with self._lock:
            self._free[store] = (now, free)
            if free is None:
                self._unreadable.add(store)
            else:
                self._unreadable.discard(store)
        return free

    def shortage(self, *, fresh: bool = False) -> Shortage | None:
        """The first written folder short of space now, if any; starts a retention run when space runs short."""
        found = None
        if self._min_free > 0:
            for store, folder in self._folders.items():
                free = self.free_bytes(store, fresh=fresh)
                if free is not None and free < self._min_free:
                    found = Shortage(store, folder, free, self._min_free)
                    break
        start_prune = False
        with self._lock:
            was = self._short
            self._short = found
            if found is not None and was is None:
                self._short_since = self._clock()
                self._prune_mark = self._prune_runs() if self._prune_runs is not None else 0
                start_prune = True
            if found is None:
                self._refused.clear()
                self._waiting.clear()
        if found is not None and was is None:
            logger.warning(
                "%s has %.1f MB free, less than retention.min_free_mb (%.1f MB): retention runs now; new "
                "acquisitions wait until there is room",
                found.folder,
                found.free_bytes / 1e6,
                found.min_free_bytes / 1e6,
            )
        elif found is None and was is not None:
            logger.info("%s has room again: new acquisitions are taken", was.folder)
        if start_prune and self._prune_now is not None:
            self._prune_now()
        return found

    def admit(self, acquisition_id: str) -> bool:
        """May a new acquisition start now? If not, announce it once (see the module docstring)."""
        with self._lock:
            waiting = acquisition_id in self._waiting
        found = self.shortage(fresh=not waiting)
        if found is None:
            with self._lock:
                self._waiting.discard(acquisition_id)
                self._refused.discard(acquisition_id)
            return True
        with self._lock:
            self._waiting.add(acquisition_id)
            if acquisition_id in self._refused or not self._prune_done():
                return False
            self._refused.add(acquisition_id)
        self._metrics.acquisition_refused(found.store)
        logger.warning(
            "acquisition %s not taken: %s has %.1f MB free, less than retention.min_free_mb (%.1f MB); it is "
            "taken when there is room",
            acquisition_id,
            found.folder,
            found.free_bytes / 1e6,
            found.min_free_bytes / 1e6,
        )
        self._publish(
            refused_event(
                acquisition_id,
                folder=str(found.folder),
                free_bytes=found.free_bytes,
                min_free_bytes=found.min_free_bytes,
                at=time.time(),
            )
        )
        return False

    def _prune_done(self) -> bool:
        """Has retention run since space ran short (or has the grace period passed)? Called under the lock."""
        if self._prune_runs is None or self._prune_runs() > self._prune_mark:
            return True
        return self._clock() - self._short_since >= PRUNE_GRACE_S
