"""Retention: the sCT DICOM folder, the volume archive and the journal stay within their size and age bounds.

An edge box runs for years beside the scanner on a disk of a few hundred GB, and everything the agent writes
grows with each series: a DICOM series (tens of MB), an archived volume, journal rows. ``[retention]`` bounds
each store by age and size (0 = unbounded), and a prune run removes the oldest first:

- **DICOM folder**: whole series folders (``sct-...``), by the folder's time (when the series appeared, complete,
  by rename), oldest first. Only complete series are candidates: one still being written is a hidden
  ``.sct-*.partial`` folder, and one being written or sent by C-STORE is named by the dicom stage's ``in_use``
  and skipped. A series is renamed to a hidden ``.sct-*.deleting`` folder before it is removed, so a reader (a
  PACS import, a person) never sees half a series; what a crash left of that is removed by the next run. Other
  files and folders there are not the agent's and are left alone.
- **received images** (``<state>/received``, C-STORE: agent.ingest.store_scp): whole series folders by their
  time (the folder's mtime moves with each image renamed into it), oldest first, removed the same way (renamed
  to a hidden ``.<name>.deleting`` first). A folder changed within ``RECEIVED_SETTLE_S`` never is: its series
  may still be arriving, or its pixels still be read by the streamer. What the journal records of a removed
  series is forgotten with the journal's own age bound, as for an export the scanner deleted.
- **volume archive** (``<state>/snapshot``): ``VolumeArchive.prune`` (never the newest volume by size).
- **journal**: detail rows by age and size, acquisition rows only once their files are gone from the export
  folder, then the space is given back; why, in agent.ops.journal's docstring.

Runs happen on a thread of their own (``sct-retention``), never on a stage thread: at start, every
``retention.interval_s``, and at once when free space drops below ``retention.min_free_mb`` (agent.ops.disk_space
wakes it; the thread also polls free space every ``TICK_S``, so a disk filled by something else is noticed
without a new series). Each run logs one line with what it removed and what is kept, per store, and updates the
``sct_agent_retention_*`` metrics. A store that fails (a folder that cannot be read, a journal whose disk is
full) is logged and counted; the others are still pruned.

The thread also runs ``tick`` callbacks every ``TICK_S`` (the journal's acquisition states waiting for room are
written again from there: agent.ops.journal_disk_full).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.dicom_out.dicom_publisher import SERIES_PREFIX
from agent.ops.config import GB, MB, RetentionConfig
from agent.ops.journal import Journal, JournalError
from agent.ops.metrics import RETENTION_STORES, AgentMetrics
from agent.publish.volume_archive import VolumeArchive

logger = logging.getLogger(__name__)

#: Seconds between the thread's ticks (free-space poll, journal retries, a run due or asked for).
TICK_S: Final = 1.0
#: The journal's size bound is met by pruning detail rows up to later and later cut-offs, in this many steps
#: between the oldest row and now.
JOURNAL_SIZE_STEPS: Final = 10
#: A series being removed: renamed to ``.<name>.deleting`` first.
DELETING_SUFFIX: Final = ".deleting"
#: Seconds since its last change before a received series folder may be removed: far longer than any series
#: takes to arrive and be inferred, so retention never takes an image from under the pipeline.
RECEIVED_SETTLE_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class StoreReport:
    """One store's part of a run: what was removed and what is kept (items and bytes)."""

    store: str
    removed: int
    removed_bytes: int
    kept: int
    kept_bytes: int


class Retention:
    """Prunes the three stores; ``run`` is thread-safe (one run at a time), ``start`` runs it on its own thread."""

    def __init__(
        self,
        config: RetentionConfig,
        *,
        journal: Journal,
        archive: VolumeArchive,
        dicom_folder: Path | None,
        export_folder: Path,
        metrics: AgentMetrics,
        received_folder: Path | None = None,
        in_use: Callable[[], frozenset[str]] = frozenset,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._journal = journal
        self._archive = archive
        self._dicom_folder = dicom_folder
        self._export_folder = export_folder
        self._received_folder = received_folder
        self._metrics = metrics
        self._in_use = in_use
        self._clock = clock
        self._run_lock = threading.Lock()
        self._runs = 0
        self._ticks: list[Callable[[], object]] = []
        self._wake = threading.Event()
        self._woken = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def runs(self) -> int:
        """Runs completed so far."""
        return self._runs

    def add_tick(self, tick: Callable[[], object]) -> None:
        """Call ``tick`` on the retention thread every ``TICK_S`` (add before ``start``)."""
        self._ticks.append(tick)

    def set_in_use(self, in_use: Callable[[], frozenset[str]]) -> None:
        """Name the series the dicom stage is writing or sending (the stage is built after retention starts)."""
        self._in_use = in_use

    # --------------------------------------------------------------------------------------------- a run

    def run(self, stores: Iterable[str] = RETENTION_STORES) -> list[StoreReport]:
        """Prune ``stores`` now; log one line and update the metrics. Never raises for a store that fails."""
        started = time.perf_counter()
        reports: list[StoreReport] = []
        failed: list[str] = []
        with self._run_lock:
            for store in stores:
                try:
                    report = self._prune(store)
                except (OSError, JournalError) as error:
                    logger.error("retention: %s not pruned: %s", store, error)
                    self._metrics.error("retention")
                    failed.append(store)
                    continue
                if report is not None:
                    reports.append(report)
                    self._metrics.retention_pruned(
                        store,
                        removed=report.removed,
                        removed_bytes=report.removed_bytes,
                        kept=report.kept,
                        kept_bytes=report.kept_bytes,
                    )
            self._runs += 1
        self._metrics.retention_ran()
        parts = [
            f"{r.store} {r.removed} {_ITEMS[r.store]} pruned ({_size(r.removed_bytes)}), {r.kept} kept "
            f"({_size(r.kept_bytes)})"
            for r in reports
        ]
        parts += [f"{store} FAILED (see above)" for store in failed]
        logger.info(
            "retention: %s; %.2f s", "; ".join(parts) or "nothing to do", time.perf_counter() - started
        )
        return reports

    def _prune(self, store: str) -> StoreReport | None:
        config, now = self._config, self._clock()
        if store == "dicom":
            if self._dicom_folder is None:
                return None
            return prune_series(
                self._dicom_folder,
                max_age_s=config.age_seconds(config.dicom_max_age_days),
                max_bytes=config.size_bytes(config.dicom_max_size_gb, GB),
                in_use=self._in_use,
                now=now,
            )
        if store == "snapshot":
            result = self._archive.prune(
                config.age_seconds(config.snapshot_max_age_days),
                config.size_bytes(config.snapshot_max_size_gb, GB),
                now=now,
            )
            return StoreReport(
                "snapshot", result.removed, result.removed_bytes, result.kept, result.kept_bytes
            )
        if store == "journal":
            return prune_journal(
                self._journal,
                max_age_s=config.age_seconds(config.journal_max_age_days),
                max_bytes=config.size_bytes(config.journal_max_size_mb, MB),
                export_folder=self._export_folder,
                now=now,
            )
        if store == "received":
            if self._received_folder is None:
                return None
            return prune_received(
                self._received_folder,
                max_age_s=config.age_seconds(config.received_max_age_days),
                max_bytes=config.size_bytes(config.received_max_size_gb, GB),
                now=now,
            )
        raise ValueError(f"retention store: found {store!r}, expected one of {', '.join(RETENTION_STORES)}")

    # ------------------------------------------------------------------------------------------- thread

    def start(self) -> None:
        """Run on the ``sct-retention`` thread: at once, every ``interval_s``, and when woken."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sct-retention", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run as soon as the thread can (free space dropped below the watermark, a write found the disk full)."""
        self._woken = True
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread; a run in progress finishes its current batch first."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout_s)
        if thread.is_alive():
            logger.error("retention thread did not stop within %.0f s", timeout_s)

    def _loop(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            for tick in self._ticks:
                try:
                    tick()
                except Exception:  # a housekeeping defect must not end retention
                    logger.exception("retention thread: a tick failed")
                    self._metrics.error("retention")
            if self._stop.is_set():
                break
            if self._woken or time.monotonic() >= due:
                self._woken = False
                try:
                    self.run()
                except Exception:  # run() handles what it expects; anything else is a defect, logged
                    logger.exception("retention run failed")
                    self._metrics.error("retention")
                due = time.monotonic() + self._config.interval_s
            self._wake.wait(TICK_S)
            self._wake.clear()


_ITEMS: Final = {"dicom": "series", "snapshot": "volumes", "journal": "rows", "received": "series"}


def _size(nbytes: int) -> str:
    if nbytes >= GB:
        return f"{nbytes / GB:.2f} GB"
    return f"{nbytes / MB:.1f} MB"


# ----------------------------------------------------------------------------------------------- DICOM


def prune_series(
    folder: Path,
    *,
    max_age_s: float | None,
    max_bytes: int | None,
    in_use: Callable[[], frozenset[str]] = frozenset,
    now: float | None = None,
) -> StoreReport:
    """Remove complete sCT series folders older than ``max_age_s``, then the oldest until at most ``max_bytes``
    are kept; never one ``in_use`` names (a name prefix). None = no bound. See the module docstring."""
    if not folder.is_dir():
        return StoreReport("dicom", 0, 0, 0, 0)
    _remove_leftovers(folder, f".{SERIES_PREFIX}*{DELETING_SUFFIX}")
    return _prune_folders(
        "dicom",
        folder,
        is_series=lambda name: name.startswith(SERIES_PREFIX),
        keep=lambda name, _mtime: any(name.startswith(prefix) for prefix in in_use()),
        max_age_s=max_age_s,
        max_bytes=max_bytes,
        now=time.time() if now is None else now,
    )


def prune_received(
    folder: Path, *, max_age_s: float | None, max_bytes: int | None, now: float | None = None
) -> StoreReport:
    """Remove received series folders older than ``max_age_s``, then the oldest until at most ``max_bytes`` are
    kept; never one changed within ``RECEIVED_SETTLE_S``. None = no bound. See the module docstring."""
    if not folder.is_dir():
        return StoreReport("received", 0, 0, 0, 0)
    _remove_leftovers(folder, f".*{DELETING_SUFFIX}")
    now = time.time() if now is None else now
    return _prune_folders(
        "received",
        folder,
        is_series=lambda name: not name.startswith("."),
        keep=lambda _name, mtime: now - mtime < RECEIVED_SETTLE_S,
        max_age_s=max_age_s,
        max_bytes=max_bytes,
        now=now,
    )


def _prune_folders(
    store: str,
    folder: Path,
    *,
    is_series: Callable[[str], bool],
    keep: Callable[[str, float], bool],
    max_age_s: float | None,
    max_bytes: int | None,
    now: float,
) -> StoreReport:
    """The series folders of ``folder`` past their age, then the oldest beyond ``max_bytes``, removed unless
    ``keep(name, mtime)``. Each is renamed to a hidden ``.deleting`` name first, so it leaves the view in one step
    and a crash mid-removal leaves only a leftover the next run clears."""
    series: list[tuple[float, str, int]] = []
    for entry in os.scandir(folder):
        if is_series(entry.name) and entry.is_dir(follow_symlinks=False):
            series.append(
                (entry.stat(follow_symlinks=False).st_mtime, entry.name, _folder_bytes(Path(entry.path)))
            )
    series.sort()
    kept_bytes = sum(size for _, _, size in series)
    removed = removed_bytes = 0
    for mtime, name, size in series:
        too_old = max_age_s is not None and now - mtime > max_age_s
        too_big = max_bytes is not None and kept_bytes > max_bytes
        if not (too_old or too_big) or keep(name, mtime):
            continue
        doomed = folder / f".{name}{DELETING_SUFFIX}"
        try:
            (folder / name).rename(doomed)  # gone from view in one step
        except FileNotFoundError:
            kept_bytes -= size  # someone else removed it
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        removed += 1
        removed_bytes += size
        kept_bytes -= size
    return StoreReport(store, removed, removed_bytes, len(series) - removed, max(0, kept_bytes))


def _remove_leftovers(folder: Path, pattern: str) -> None:
    """Series a crash left half-removed (``.<name>.deleting``). Half-written ones (``.sct-*.partial``, received
    files' temporary names) are never touched here: their writers remove what they left behind when they start."""
    for leftover in folder.glob(pattern):
        shutil.rmtree(leftover, ignore_errors=True)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with suppress(FileNotFoundError):
                total += (Path(root) / name).lstat().st_size
    return total


# --------------------------------------------------------------------------------------------- journal


def prune_journal(
    journal: Journal,
    *,
    max_age_s: float | None,
    max_bytes: int | None,
    export_folder: Path,
    now: float | None = None,
) -> StoreReport:
    """Prune the journal's detail rows by age and size, forget acquisitions whose files are gone, reclaim the
    space (agent.ops.journal's docstring says why this way)."""
    now = time.time() if now is None else now
    before = journal.file_bytes()
    rows = 0
    if max_age_s is not None:
        rows += journal.prune_details(now - max_age_s)
    if max_bytes is not None and journal.used_bytes() > max_bytes:
        cutoff = journal.oldest_detail_at()
        if cutoff is not None:
            step = max((now - cutoff) / JOURNAL_SIZE_STEPS, 1.0)
            while journal.used_bytes() > max_bytes and cutoff < now:
                cutoff = min(now, cutoff + step)
                rows += journal.prune_details(cutoff)
    if max_age_s is not None and _export_present(export_folder):
        gone = [
            acquisition_id
            for acquisition_id, anchor in journal.forgettable_acquisitions(now - max_age_s)
            if anchor is not None and not anchor.exists()
        ]
        rows += journal.forget_acquisitions(gone)
    journal.reclaim_space()
    after = journal.file_bytes()
    return StoreReport("journal", rows, max(0, before - after), journal.row_count(), after)


def _export_present(folder: Path) -> bool:
    """The export folder exists and holds something: an unmounted share looks missing or empty, and then every
    anchor would look gone."""
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:
        return False
