"""Watch the scanner's export folder and report each file once, when it is complete.

A file is visible long before it is complete: a console writing in place over SMB/NFS shows a growing file
under its final name, and an atomic exporter shows a hidden ``.name.partial`` first. Reacting to "created"
would hand the next stage half a file, so the watcher only trusts three signals:

* a close after writing (inotify ``IN_CLOSE_WRITE``, watchdog's ``FileClosedEvent``) or a rename into place
  (``FileMovedEvent`` ``dest_path``): complete at once (``ArrivalSource.EVENT``);
* size and mtime unchanged across two consecutive checks *and* for at least ``stable_s`` of local time
  (``ArrivalSource.STABLE``): the only signal on a network share (polling observer), and the fallback for
  files that never send a close event (hard links, writes by a kernel NFS server);
* at start-up, a file whose mtime is older than ``stable_s`` (``ArrivalSource.STARTUP_SCAN``); younger ones
  may still be being written and go to the stability checker.

Why ``stable_s`` and not only "two polls": a writer that pauses longer than one poll interval between chunks
looks stable to two polls, and a CIFS client caches attributes for ``actimeo`` (1 s by default), so two
stats within that window agree while the server's file is still growing. ``stable_s = 0`` gives the bare
two-poll rule.

The folder itself can go away: a share unmounted or unreachable, the folder deleted or replaced. Deleting a
watched folder ends its inotify watch and the polling emitter alike, and an unmounted share leaves an empty
mount point that no event will ever come from, so the worker checks the folder every ``folder_check_s``: it
must be a readable directory, the same one it started watching (device and inode), and still a mount point
if it was one at start. When a check fails it reports the folder unavailable (``on_folder``), stops the
observer and keeps checking; it never creates the folder again, because a missing share's mount point is a
local folder the scanner does not write to. When the folder is back it starts a new observer and rescans
what is there: files already handed over with the same size and mtime are not handed over again.

Threads: watchdog's observer threads only call :meth:`Watcher._on_event`, which records the path in a
dict under a lock and returns; one worker thread of ours stats files, checks stability and calls ``sink``
and ``on_skipped``, never under a lock. ``sink`` may therefore block (a bounded queue: back-pressure)
without stalling the observer, and pending work is bounded by the number of distinct paths, not events.

One module on purpose: the native observer, the polling observer, the start-up scan and the stability checker
must agree on one rule for when a file is complete and hand each file over exactly once; they share that state.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from watchdog import events as fs
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from agent.file_labels import error_text, file_label
from agent.records import ArrivedFile
from agent.vocabulary import ArrivalSource, ObserverKind, SkipReason

logger = logging.getLogger(__name__)

#: How long (s) a file's size and mtime must stay unchanged, measured on this machine's clock, before the
#: stability checker calls it complete; also the mtime age above which the start-up scan trusts a file at
#: once. Longer than the pauses of a console writing over a share and than CIFS's default attribute cache.
SETTLE_S = 2.0
#: How often (s) the polling observer rescans the folder and the stability checker stats its candidates.
DEFAULT_POLL_INTERVAL_S = 0.25
#: How often (s) the worker checks that the watched folder is still there and still the one being watched.
FOLDER_CHECK_S = 1.0
#: How long (s) ``stop()`` waits for each thread; only a ``sink`` that never returns makes it wait that long.
STOP_TIMEOUT_S = 10.0
#: Suffixes of names that exporters and copy tools write before renaming into place (case-insensitive).
#: ``.filepart`` is WinSCP's, common for manual copies onto the share.
TEMP_SUFFIXES = (".partial", ".tmp", ".part", ".filepart")
#: Prefixes of editor and Office lock files.
TEMP_PREFIXES = ("~",)
#: The media directory file of a DICOM file set: an index, not an image.
DICOMDIR_NAME = "DICOMDIR"

#: The events the watcher acts on. Leaving out opens and read-only closes matters: the next stage reads every
#: file, and each read would otherwise come back as two events.
WATCHED_EVENTS: tuple[type[fs.FileSystemEvent], ...] = (
    fs.FileClosedEvent,
    fs.FileMovedEvent,
    fs.FileCreatedEvent,
    fs.FileModifiedEvent,
    fs.FileDeletedEvent,
    fs.DirCreatedEvent,
    fs.DirMovedEvent,
    fs.DirDeletedEvent,
    # The kernel's inotify queue overflowed: events were lost, so the folder is scanned again.
    fs.EventsLostEvent,
)

#: (size in bytes, mtime in ns): what "the same content" means for de-duplication.
Signature = tuple[int, int]


@dataclass(frozen=True, slots=True)
class WatcherStats:
    """Counters since start(): files handed to ``sink``, paths skipped, ``sink`` calls that raised."""

    emitted: int = 0
    skipped: int = 0
    sink_errors: int = 0


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A file waiting for the stability checker."""

    source: ArrivalSource
    #: The last stat seen, ``None`` until the first check.
    signature: Signature | None
    #: When (monotonic s) the file last changed: an event for it, or a check that saw a new signature.
    changed_at: float
    #: Consecutive checks that saw ``signature`` unchanged.
    unchanged: int = 0


@dataclass(frozen=True, slots=True)
class _FolderIdentity:
    """Which directory is being watched: a folder deleted and created again, or a share mounted over the
    folder, has another device or inode, and the watch on the old one sees nothing of the new one."""

    device: int
    inode: int
    #: A mount point when watching started: later, an ordinary folder at that path means the share is gone.
    mount_point: bool


def _inspect_folder(root: Path, mount_point: bool | None) -> tuple[_FolderIdentity | None, str]:
    """The folder's identity, or ``None`` and why it cannot be watched. ``mount_point`` is what it was when
    watching started (``None``: nothing known yet)."""
    try:
        st = root.stat()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "error")
        what = "is missing" if exc.errno == errno.ENOENT else "cannot be read"
        return None, f"{what} ({name}: {exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return None, "is no longer a directory"
    if not os.access(root, os.R_OK | os.X_OK):
        return None, "cannot be listed (permission denied)"
    is_mount = os.path.ismount(root)
    if mount_point and not is_mount:
        return None, "is no longer a mount point (the share was unmounted)"
    return _FolderIdentity(st.st_dev, st.st_ino, is_mount if mount_point is None else mount_point), ""


def name_skip_reason(path: Path, root: Path) -> SkipReason | None:
    """The reason to skip ``path`` (below ``root``) by its name alone, or ``None`` if its name is acceptable.

    A hidden folder on the way counts as a hidden name: NAS snapshot folders (``.snapshot``) and trash folders
    hold copies of files that were already reported.
    """
    name = path.name
    lowered = name.lower()
    if lowered.endswith(TEMP_SUFFIXES) or name.startswith(TEMP_PREFIXES):
        return SkipReason.TEMPORARY
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = (name,)
    if any(part.startswith(".") for part in parts):
        return SkipReason.HIDDEN
    if name.upper() == DICOMDIR_NAME:
        return SkipReason.DICOMDIR
    return None


def prepare_folder(folder: Path) -> Path:
    """Create ``folder`` if it is missing and return its resolved path; raise an ``OSError`` naming it if not.

    Resolved because inotify watches a symlink itself, not the folder it points to.
    """
    if not folder.exists():
        logger.warning("watch folder %s does not exist; creating it", folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # OSError(errno, ...) becomes the matching subclass (PermissionError, NotADirectoryError, ...).
            raise OSError(exc.errno, f"cannot create the watch folder ({exc.strerror})", str(folder)) from exc
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the watch folder is not a directory", str(folder))
    return folder.resolve()


def _event_path(event: fs.FileSystemEvent) -> str:
    """The event's path as text ("" when it has none), for naming it by its label."""
    return os.fsdecode(event.src_path) if event.src_path else ""


class _Handler(fs.FileSystemEventHandler):
    """Forwards every event to the watcher; an exception here would end watchdog's dispatch thread."""

    def __init__(self, watcher: Watcher) -> None:
        super().__init__()
        self._watcher = watcher

    def dispatch(self, event: fs.FileSystemEvent) -> None:
        try:
            self._watcher._on_event(event)
        except Exception:
            path = _event_path(event)
            logger.exception(
                "watcher could not handle a %s event for %s",
                event.event_type,
                file_label(Path(path)) if path else "(no path)",
            )


class Watcher:
    """Reports each complete file under ``folder`` to ``sink`` once per (path, size, mtime_ns).

    ``sink`` and ``on_skipped`` are called from the watcher's own thread, one call at a time, never under a
    lock; an exception from either is logged and does not stop the watcher (the file is not retried unless it
    changes again). ``sink`` may block for back-pressure but must return eventually: ``stop()`` waits for it.
    A watcher starts once.
    """

    def __init__(
        self,
        folder: Path,
        sink: Callable[[ArrivedFile], object],
        *,
        observer: str = ObserverKind.NATIVE,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        recursive: bool = True,
        on_skipped: Callable[[Path, str], None] | None = None,
        stable_s: float = SETTLE_S,
        on_folder: Callable[[bool, str], None] | None = None,
        folder_check_s: float = FOLDER_CHECK_S,
    ) -> None:
        try:
            self._kind = ObserverKind(observer)
        except ValueError:
            allowed = ", ".join(repr(k.value) for k in ObserverKind)
            raise ValueError(f"observer must be one of {allowed}; found {observer!r}") from None
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0 seconds; found {poll_interval_s}")
        if not stable_s >= 0:
            raise ValueError(f"stable_s must be >= 0 seconds; found {stable_s}")
        if not folder_check_s > 0:
            raise ValueError(f"folder_check_s must be > 0 seconds; found {folder_check_s}")
        self._folder = Path(folder)
        self._root = self._folder.absolute()
        self._sink = sink
        self._on_skipped = on_skipped
        self._on_folder = on_folder
        self._folder_check_s = folder_check_s
        self._poll_interval_s = poll_interval_s
        self._stable_s = stable_s
        self._recursive = recursive

        self._cond = threading.Condition()
        self._stopping = False
        self._started = False
        #: Paths whose completion an event announced, in arrival order (a dict as an ordered set).
        self._ready: dict[Path, None] = {}
        self._candidates: dict[Path, _Candidate] = {}
        #: Name-based skips waiting to be reported, and every path already reported that way.
        self._skip_reports: deque[tuple[Path, SkipReason]] = deque()
        self._skipped_names: set[Path] = set()
        #: The signature last emitted (or skipped as empty) per path; dropped when the path goes away.
        self._decided: dict[Path, Signature] = {}
        self._emitted = 0
        self._skipped = 0
        self._sink_errors = 0
        self._observer: BaseObserver | None = None
        self._worker: threading.Thread | None = None
        #: The folder being watched; ``None`` while it is unavailable.
        self._identity: _FolderIdentity | None = None
        self._mount_point: bool | None = None
        #: An event said the folder went away or events were lost: check or rescan at once.
        self._check_due = False
        self._rescan_due = False
        self._folder_losses = 0

    @property
    def folder(self) -> Path:
        """The watched folder; resolved (as emitted paths are) once started."""
        return self._root

    @property
    def available(self) -> bool:
        """The folder is being watched (False while it is missing, unreadable, unmounted or being replaced)."""
        with self._cond:
            return self._identity is not None

    @property
    def folder_losses(self) -> int:
        """How many times the folder became unavailable since start()."""
        with self._cond:
            return self._folder_losses

    @property
    def stats(self) -> WatcherStats:
        with self._cond:
            return WatcherStats(self._emitted, self._skipped, self._sink_errors)

    def start(self) -> None:
        """Start the observer, then the worker, which scans what is already there before handling events.

        The observer starts first so that a file arriving during the scan is seen by one or the other (both
        is fine: de-duplication). Raises ``OSError`` naming the folder if it cannot be watched.
        """
        with self._cond:
            if self._started:
                raise RuntimeError(f"watcher for {self._folder} was already started")
            self._started = True
        self._root = prepare_folder(self._folder)
        identity, problem = _inspect_folder(self._root, None)
        if identity is None:
            raise OSError(errno.EACCES, f"cannot watch the folder: it {problem}", str(self._root))
        self._observer = self._start_observer()
        self._identity, self._mount_point = identity, identity.mount_point
        self._worker = threading.Thread(target=self._run, name=f"watcher-{self._root.name}", daemon=True)
        self._worker.start()
        logger.info("watching %s (%s observer, recursive=%s)", self._root, self._kind, self._recursive)

    def stop(self) -> None:
        """Stop and join the observer and the worker; safe to call more than once, or before start()."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
            observer, self._observer = self._observer, None
        if observer is not None:
            _stop_observer(observer)
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(STOP_TIMEOUT_S)
            if worker.is_alive():
                logger.error("watcher thread for %s did not stop: sink still blocked", self._root)

    # --------------------------------------------------------------------------- observer threads: record only

    def _start_observer(self) -> BaseObserver:
        """A started observer on the folder; raises ``OSError`` naming the folder if it cannot watch it."""
        observer = self._make_observer()
        try:
            observer.schedule(
                _Handler(self), str(self._root), recursive=self._recursive, event_filter=list(WATCHED_EVENTS)
            )
            observer.start()
        except OSError as exc:  # inotify watch or instance limits, an unreadable folder
            _stop_observer(observer)
            raise OSError(
                exc.errno, f"cannot watch the folder ({exc.strerror or exc})", str(self._root)
            ) from exc
        except BaseException:
            _stop_observer(observer)
            raise
        return observer

    def _make_observer(self) -> BaseObserver:
        if self._kind is ObserverKind.POLLING:
            return PollingObserver(timeout=self._poll_interval_s)
        if platform.system() != "Linux":
            raise OSError(errno.ENOSYS, "the native observer needs Linux inotify; use observer='polling'")
        # Imported here: inotify_c loads libc's inotify functions at import and fails elsewhere.
        from watchdog.observers.inotify import InotifyObserver  # noqa: PLC0415

        # Full events: a file moved in from outside the folder is a FileMovedEvent ("" -> dest), which means
        # complete, rather than a FileCreatedEvent, which would wait for the stability checker.
        return InotifyObserver(generate_full_events=True)

    def _on_event(self, event: fs.FileSystemEvent) -> None:
        """Record what ``event`` means for its path; runs on watchdog's dispatch thread, so never blocks."""
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
        with self._cond:
            if self._stopping:
                return
            if isinstance(event, fs.DirCreatedEvent) and src is not None:
                self._note_directory(src)
            elif isinstance(event, fs.DirMovedEvent):
                if src is not None:
                    self._forget(src, subtree=True)
                if dest is not None:
                    self._note_directory(dest)
            elif isinstance(event, fs.DirDeletedEvent) and src is not None:
                self._forget(src, subtree=True)
                if src == self._root:
                    self._check_due = True  # the watch on it has ended: the worker says so and waits for it
                    self._cond.notify()
            elif isinstance(event, fs.EventsLostEvent):
                self._rescan_due = True
                self._cond.notify()
            elif isinstance(event, fs.FileDeletedEvent) and src is not None:
                self._forget(src, subtree=False)
            elif isinstance(event, fs.FileMovedEvent):
                if src is not None:
                    self._forget(src, subtree=False)
                if dest is not None:
                    self._note_file(dest, complete=True)
            elif isinstance(event, fs.FileClosedEvent) and src is not None:
                self._note_file(src, complete=True)
            elif isinstance(event, fs.FileCreatedEvent) and src is not None:
                # Synthetic: a file inside a folder moved into place, complete like any renamed file.
                self._note_file(src, complete=event.is_synthetic)
            elif isinstance(event, fs.FileModifiedEvent) and src is not None:
                self._note_file(src, complete=False)

    def _note_file(self, path: Path, *, complete: bool) -> None:
        """Queue ``path`` as complete, or as a candidate for the stability checker (lock held)."""
        if path in self._skipped_names:
            return
        reason = name_skip_reason(path, self._root)
        if reason is not None:
            self._queue_skip(path, reason)
        elif complete:
            self._ready[path] = None
            self._cond.notify()
        else:
            now = time.monotonic()
            candidate = self._candidates.get(path)
            if candidate is None:
                self._candidates[path] = _Candidate(ArrivalSource.STABLE, None, now)
                # Wake the worker only when its check schedule starts; later events just push changed_at.
                if len(self._candidates) == 1:
                    self._cond.notify()
            else:
                # Changed while watched: no longer something the start-up scan found.
                self._candidates[path] = _Candidate(ArrivalSource.STABLE, candidate.signature, now)

    def _note_directory(self, path: Path) -> None:
        if path not in self._skipped_names:
            hidden = name_skip_reason(path, self._root) is SkipReason.HIDDEN
            self._queue_skip(path, SkipReason.HIDDEN if hidden else SkipReason.DIRECTORY)

    def _queue_skip(self, path: Path, reason: SkipReason) -> None:
        self._skipped_names.add(path)
        self._skip_reports.append((path, reason))
        self._cond.notify()

    def _forget(self, path: Path, *, subtree: bool) -> None:
        """Drop what is known about a path that went away, so that a file reappearing there counts again."""

        def gone(known: Path) -> bool:
            return known == path or (subtree and known.is_relative_to(path))

        tables: tuple[dict[Path, Any], ...] = (self._ready, self._candidates, self._decided)
        for table in tables:
            for known in [p for p in table if gone(p)] if subtree else [path]:
                table.pop(known, None)
        self._skipped_names.difference_update(
            [p for p in self._skipped_names if gone(p)] if subtree else [path]
        )

    # ----------------------------------------------------------------------------------------- worker thread

    def _run(self) -> None:
        try:
            self._scan()
            self._loop()
        except Exception:
            logger.critical(
                "watcher thread for %s failed; no further files will be seen", self._root, exc_info=True
            )

    def _loop(self) -> None:
        next_check = time.monotonic()
        next_folder_check = time.monotonic() + self._folder_check_s
        while True:
            with self._cond:
                while not self._work_due(next_check, next_folder_check):
                    due = [next_folder_check]
                    if self._candidates:
                        due.append(next_check)
                    self._cond.wait(max(0.0, min(due) - time.monotonic()))
                if self._stopping:
                    return
                reports = list(self._skip_reports)
                self._skip_reports.clear()
                ready = list(self._ready)
                self._ready.clear()
                for path in ready:
                    self._candidates.pop(path, None)  # an event supersedes the fallback
                check = bool(self._candidates) and time.monotonic() >= next_check
                check_folder = self._check_due or time.monotonic() >= next_folder_check
                rescan, self._check_due, self._rescan_due = self._rescan_due, False, False
            for path, reason in reports:
                self._report_skip(path, reason)
            for path in ready:
                self._complete(path)
            if check:
                self._check_candidates()
                next_check = time.monotonic() + self._poll_interval_s
            if check_folder:
                self._check_folder()
                next_folder_check = time.monotonic() + self._folder_check_s
            if rescan and self.available:
                logger.warning(
                    "events from %s were lost (inotify queue overflow); scanning it again", self._root
                )
                self._scan()

    def _work_due(self, next_check: float, next_folder_check: float) -> bool:
        now = time.monotonic()
        return (
            self._stopping
            or bool(self._ready)
            or bool(self._skip_reports)
            or (bool(self._candidates) and now >= next_check)
            or self._check_due
            or self._rescan_due
            or now >= next_folder_check
        )

    # ------------------------------------------------------------------------ the folder going and coming back

    def _check_folder(self) -> None:
        """Is the folder still there and still watched? If not, say so once and stop the observer; when it is
        back, watch it again and rescan it."""
        with self._cond:
            watched, observer = self._identity, self._observer
        identity, problem = _inspect_folder(self._root, self._mount_point)
        if identity is not None and identity == watched and observer is not None and _observing(observer):
            return
        if watched is not None:
            if identity is None:
                why = problem
            elif identity != watched:
                why = "was replaced by another directory (deleted and created again, or mounted over)"
            else:
                why = "is no longer watched (the observer stopped)"
            self._lose(why)
        if identity is not None:
            self._regain(identity)

    def _lose(self, why: str) -> None:
        with self._cond:
            observer, self._observer = self._observer, None
            self._identity = None
            self._folder_losses += 1
            # What was pending refers to a folder that is gone; the rescan when it is back finds it again.
            self._ready.clear()
            self._candidates.clear()
        if observer is not None:
            _stop_observer(observer)
        message = f"watch folder {self._root} {why}; checking again every {self._folder_check_s:g} s"
        logger.error("%s", message)
        self._report_folder(False, message)

    def _regain(self, identity: _FolderIdentity) -> None:
        try:
            observer = self._start_observer()
        except OSError as exc:
            logger.warning("watch folder %s is back but cannot be watched yet: %s", self._root, exc)
            return
        with self._cond:
            if self._stopping:
                stale: BaseObserver | None = observer
            else:
                stale, self._observer, self._identity = None, observer, identity
        if stale is not None:
            _stop_observer(stale)
            return
        message = f"watch folder {self._root} is available again; watching it and scanning what is there"
        logger.warning("%s", message)
        self._report_folder(True, message)
        self._scan()

    def _report_folder(self, available: bool, message: str) -> None:
        if self._on_folder is None:
            return
        try:
            self._on_folder(available, message)
        except Exception:
            logger.exception("on_folder failed for %s", self._root)

    def _scan(self) -> None:
        """Report what was already in the folder: old files at once, recent ones through the checker."""
        settle_ns = int(self._stable_s * 1e9)
        for path, is_dir in _walk(self._root, recursive=self._recursive):
            if self._stopping:
                return
            with self._cond:
                if is_dir:
                    self._note_directory(path)
                    continue
                reason = None if path in self._skipped_names else name_skip_reason(path, self._root)
                if reason is not None:
                    self._queue_skip(path, reason)
            if reason is not None:
                continue
            try:
                st = path.stat()
            except OSError:
                continue  # gone already, or unreadable: events will tell if it comes back
            if not stat.S_ISREG(st.st_mode):
                continue
            signature = (st.st_size, st.st_mtime_ns)
            if time.time_ns() - st.st_mtime_ns >= settle_ns:
                self._finish(path, signature, ArrivalSource.STARTUP_SCAN)
            else:
                with self._cond:
                    if path not in self._candidates:
                        self._candidates[path] = _Candidate(
                            ArrivalSource.STARTUP_SCAN, signature, time.monotonic()
                        )

    def _complete(self, path: Path) -> None:
        """An event said ``path`` is complete: emit it, or leave an empty file to the checker."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return  # renamed or deleted since; its own events follow
        except OSError as exc:
            logger.debug("cannot stat %s (%s); checking it again later", file_label(path), error_text(exc))
            self._add_candidate(path, ArrivalSource.STABLE)
            return
        if not stat.S_ISREG(st.st_mode):
            return
        if st.st_size == 0:
            self._add_candidate(path, ArrivalSource.STABLE)  # zero-byte counts only after the window
            return
        self._finish(path, (st.st_size, st.st_mtime_ns), ArrivalSource.EVENT)

    def _add_candidate(self, path: Path, source: ArrivalSource) -> None:
        with self._cond:
            if path not in self._candidates:
                self._candidates[path] = _Candidate(source, None, time.monotonic())

    def _check_candidates(self) -> None:
        """One round of the stability checker: stat every candidate, finish the ones that stayed unchanged."""
        with self._cond:
            candidates = list(self._candidates.items())
        for path, candidate in candidates:
            if self._stopping:
                return
            now = time.monotonic()
            try:
                st = path.stat()
            except FileNotFoundError:
                self._drop_candidate(path, candidate)
                continue
            except OSError as exc:
                logger.debug(
                    "cannot stat %s (%s); checking it again later", file_label(path), error_text(exc)
                )
                continue
            if not stat.S_ISREG(st.st_mode):
                self._drop_candidate(path, candidate)
                continue
            signature = (st.st_size, st.st_mtime_ns)
            if signature == candidate.signature:
                updated = replace(candidate, unchanged=candidate.unchanged + 1)
            else:
                # The first stat of an event-made candidate keeps the event's time as the last change.
                changed_at = candidate.changed_at if candidate.signature is None else now
                updated = replace(candidate, signature=signature, changed_at=changed_at, unchanged=0)
            stable = updated.unchanged >= 1 and now - updated.changed_at >= self._stable_s
            with self._cond:
                if self._candidates.get(path) is not candidate:
                    continue  # an event touched it meanwhile: look again next round
                if stable:
                    del self._candidates[path]
                else:
                    self._candidates[path] = updated
            if stable:
                self._finish(path, signature, candidate.source)

    def _drop_candidate(self, path: Path, candidate: _Candidate) -> None:
        with self._cond:
            if self._candidates.get(path) is candidate:
                del self._candidates[path]

    def _finish(self, path: Path, signature: Signature, source: ArrivalSource) -> None:
        """Emit a complete file, or skip it as empty, unless this exact content was already decided."""
        with self._cond:
            if self._stopping or self._decided.get(path) == signature:
                return
            self._decided[path] = signature
        size, mtime_ns = signature
        if size == 0:
            self._report_skip(path, SkipReason.EMPTY)
            return
        arrived = ArrivedFile(path=path, size=size, mtime_ns=mtime_ns, detected_at=time.time(), source=source)
        try:
            self._sink(arrived)
        except Exception:
            logger.exception(
                "sink failed for %s; the file is not retried unless it changes", file_label(path)
            )
            with self._cond:
                self._sink_errors += 1
            return
        with self._cond:
            self._emitted += 1

    def _report_skip(self, path: Path, reason: SkipReason) -> None:
        with self._cond:
            self._skipped += 1
        logger.debug("skipped %s: %s", file_label(path), reason)
        if self._on_skipped is None:
            return
        try:
            self._on_skipped(path, reason)
        except Exception:
            logger.exception("on_skipped failed for %s", file_label(path))


def _walk(root: Path, *, recursive: bool) -> Iterator[tuple[Path, bool]]:
    """``(path, is_directory)`` below ``root`` in name order, not following symlinked folders.

    Hidden folders are yielded (to be reported) but not entered.
    """
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            logger.warning(
                "cannot list %s during the start-up scan: %s",
                "the watch folder" if folder == root else file_label(folder),
                error_text(exc),
            )
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            yield path, is_dir
            if is_dir and recursive and not entry.name.startswith("."):
                subfolders.append(path)
        pending.extend(reversed(subfolders))


def _observing(observer: BaseObserver) -> bool:
    """The observer and its emitter are running: an emitter stops itself when its folder is deleted."""
    return observer.is_alive() and all(emitter.is_alive() for emitter in observer.emitters)


def _stop_observer(observer: BaseObserver) -> None:
    """Stop and join a watchdog observer, whether or not it got as far as starting."""
    observer.stop()
    if observer.is_alive():
        observer.join(STOP_TIMEOUT_S)
        if observer.is_alive():
            logger.error("watchdog observer did not stop within %s s", STOP_TIMEOUT_S)
