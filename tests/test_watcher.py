"""The watcher on real folders with real watchdog observers, fed by the simulator's exporter writes."""

from __future__ import annotations

import logging
import os
import platform
import queue
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from agent.ingest.watcher import DEFAULT_POLL_INTERVAL_S, SETTLE_S, Watcher, name_skip_reason
from agent.records import ArrivedFile
from agent.vocabulary import ArrivalSource, SkipReason
from engines.scanner.writer import temp_name, write_atomic, write_slow

#: Longest wait for something that must happen; generous because the two CPU cores are shared.
WAIT_S = 15.0
#: Poll interval and stability window for most tests: short, so that the tests are quick.
POLL_S = 0.05
STABLE_S = 0.5
#: How long to listen for an emission that must not come: longer than any path that could produce one (the
#: stability checker needs STABLE_S plus two checks).
QUIET_S = STABLE_S + 6 * POLL_S

T = TypeVar("T")

#: watchdog 7.1 warns when a folder and its subfolder are created faster than it adds their watches (it adds
#: the subfolder's watch twice, the second time over the first, with the same callback): harmless, but under
#: filterwarnings=error the warning is raised inside watchdog's inotify thread and ends it.
pytestmark = pytest.mark.filterwarnings(r"ignore:Callback with id .* already exists for watch:RuntimeWarning")

LINUX_ONLY = pytest.mark.skipif(platform.system() != "Linux", reason="the native observer needs inotify")
OBSERVERS = [pytest.param("native", marks=LINUX_ONLY), "polling"]


def payload(size: int, seed: int = 0) -> bytes:
    """Distinct bytes per seed, so that a rewrite really changes the content."""
    return bytes((i * 7 + seed) % 251 for i in range(size))


class Inbox:
    """What the watcher handed over, kept in queues that the test waits on."""

    def __init__(self) -> None:
        self.files: queue.Queue[ArrivedFile] = queue.Queue()
        self.skips: queue.Queue[tuple[Path, str, float]] = queue.Queue()

    def sink(self, arrived: ArrivedFile) -> None:
        self.files.put(arrived)

    def on_skipped(self, path: Path, reason: str) -> None:
        self.skips.put((path, reason, time.time()))

    def take(self, count: int, timeout: float = WAIT_S) -> list[ArrivedFile]:
        return _take(self.files, count, timeout)

    def take_skips(self, count: int, timeout: float = WAIT_S) -> list[tuple[Path, str, float]]:
        return _take(self.skips, count, timeout)

    def assert_quiet(self, window: float = QUIET_S) -> None:
        """Nothing more arrives within ``window`` (the only way to show that something happens once)."""
        try:
            extra = self.files.get(timeout=window)
        except queue.Empty:
            return
        pytest.fail(f"unexpected emission {extra}")


def _take(source: queue.Queue[T], count: int, timeout: float) -> list[T]:
    deadline = time.monotonic() + timeout
    got: list[T] = []
    while len(got) < count:
        try:
            got.append(source.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            pytest.fail(f"expected {count} items within {timeout} s, got {len(got)}: {got}")
    return got


Sink = Callable[[ArrivedFile], None]


class StartWatcher(Protocol):
    def __call__(
        self, folder: Path, inbox: Inbox, observer: str, *, sink: Sink | None = None, **kwargs: Any
    ) -> Watcher: ...


@pytest.fixture
def start_watcher() -> Iterator[StartWatcher]:
    """Start watchers that the test does not have to stop; fail if any thread outlives them."""
    before = set(threading.enumerate())
    watchers: list[Watcher] = []

    def start(
        folder: Path, inbox: Inbox, observer: str, *, sink: Sink | None = None, **kwargs: Any
    ) -> Watcher:
        kwargs.setdefault("poll_interval_s", POLL_S)
        kwargs.setdefault("stable_s", STABLE_S)
        watcher = Watcher(
            folder, sink or inbox.sink, observer=observer, on_skipped=inbox.on_skipped, **kwargs
        )
        watchers.append(watcher)
        watcher.start()
        return watcher

    yield start
    for watcher in watchers:
        watcher.stop()
    leaked = [t for t in threading.enumerate() if t not in before]
    assert not leaked, f"threads left running: {leaked}"


def _write_later(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, name="test-writer")
    thread.start()
    return thread


# ------------------------------------------------------------------------------------------- completion rules


@LINUX_ONLY
def test_native_atomic_write_is_emitted_once_under_its_final_name(
    tmp_path: Path, start_watcher: StartWatcher
) -> None:
    inbox = Inbox()
    watcher = start_watcher(tmp_path, inbox, "native")
    target = tmp_path / "IM0001"
    data = payload(5000)
    write_atomic(target, data)
    (arrived,) = inbox.take(1)
    assert arrived.path == watcher.folder / "IM0001"
    assert arrived.source is ArrivalSource.EVENT
    assert (arrived.size, arrived.mtime_ns) == (len(data), target.stat().st_mtime_ns)
    skipped_path, reason, _ = inbox.take_skips(1)[0]
    assert (skipped_path.name, reason) == (temp_name(target).name, SkipReason.TEMPORARY)
    inbox.assert_quiet()
    assert watcher.stats.emitted == 1


@LINUX_ONLY
def test_native_slow_write_is_emitted_once_complete(tmp_path: Path, start_watcher: StartWatcher) -> None:
    """Created and modified events of a file written in place must not emit it; its close does."""
    inbox = Inbox()
    start_watcher(tmp_path, inbox, "native", stable_s=1.0)
    data = payload(40_000)
    writer = _write_later(lambda: write_slow(tmp_path / "IM0001", data, chunks=4, pause_s=0.1))
    (arrived,) = inbox.take(1)
    writer.join(WAIT_S)
    assert arrived.size == len(data)
    assert arrived.source is ArrivalSource.EVENT
    inbox.assert_quiet(1.0 + 6 * POLL_S)


def test_polling_slow_write_never_emits_a_partial_size(tmp_path: Path, start_watcher: StartWatcher) -> None:
    """The writer pauses longer than a poll, so the poller sees partial sizes; none may be emitted."""
    inbox = Inbox()
    stable_s = 1.0
    start_watcher(tmp_path, inbox, "polling", stable_s=stable_s)
    data = payload(40_000)
    writer = _write_later(lambda: write_slow(tmp_path / "IM0001", data, chunks=4, pause_s=3 * POLL_S))
    (arrived,) = inbox.take(1)
    writer.join(WAIT_S)
    assert arrived.size == len(data)
    assert arrived.source is ArrivalSource.STABLE
    inbox.assert_quiet(stable_s + 6 * POLL_S)


def test_two_polls_alone_emit_a_paused_write_early_then_again_complete(
    tmp_path: Path, start_watcher: StartWatcher
) -> None:
    """Why ``stable_s`` exists: with the bare two-poll rule a pause longer than two polls looks complete.

    The final content still follows, because a changed (size, mtime) is a new emission.
    """
    inbox = Inbox()
    start_watcher(tmp_path, inbox, "polling", stable_s=0.0)
    data = payload(30_000)
    writer = _write_later(lambda: write_slow(tmp_path / "IM0001", data, chunks=3, pause_s=12 * POLL_S))
    first = inbox.take(1)[0]
    writer.join(WAIT_S)
    assert first.size < len(data)
    later = [first]
    while later[-1].size < len(data):
        later += inbox.take(1)
    assert later[-1].size == len(data)


@pytest.mark.parametrize("observer", OBSERVERS)
def test_files_in_subfolders_are_emitted(tmp_path: Path, start_watcher: StartWatcher, observer: str) -> None:
    inbox = Inbox()
    watcher = start_watcher(tmp_path, inbox, observer)
    series = tmp_path / "study1" / "series2"
    series.mkdir(parents=True)
    write_atomic(series / "IM0001", payload(3000))
    (arrived,) = inbox.take(1)
    assert arrived.path == watcher.folder / "study1" / "series2" / "IM0001"
    assert arrived.size == 3000


@pytest.mark.parametrize("observer", OBSERVERS)
def test_not_recursive_ignores_subfolders(tmp_path: Path, start_watcher: StartWatcher, observer: str) -> None:
    inbox = Inbox()
    (tmp_path / "old").mkdir()
    write_atomic(tmp_path / "old" / "IM0000", payload(100))
    start_watcher(tmp_path, inbox, observer, recursive=False)
    (tmp_path / "series").mkdir()
    write_atomic(tmp_path / "series" / "IM0001", payload(100))
    write_atomic(tmp_path / "IM0002", payload(100))
    (arrived,) = inbox.take(1)
    assert arrived.path.name == "IM0002"
    inbox.assert_quiet()


@LINUX_ONLY
def test_native_folder_moved_into_place_is_complete_at_once(
    tmp_path: Path, start_watcher: StartWatcher
) -> None:
    """A series folder renamed into the export folder needs no stability wait (stable_s is long here)."""
    inbox = Inbox()
    export = tmp_path / "export"
    staging = tmp_path / "staging" / "series1"
    staging.mkdir(parents=True)
    for i in range(3):
        write_atomic(staging / f"IM{i:04d}", payload(1000 + i))
    long_stable_s = 3 * WAIT_S
    watcher = start_watcher(export, inbox, "native", stable_s=long_stable_s)
    staging.rename(export / "series1")
    arrived = inbox.take(3)
    assert {a.path for a in arrived} == {watcher.folder / "series1" / f"IM{i:04d}" for i in range(3)}
    assert {a.source for a in arrived} == {ArrivalSource.EVENT}


@LINUX_ONLY
def test_native_file_without_close_event_falls_back_to_stability(
    tmp_path: Path, start_watcher: StartWatcher
) -> None:
    """A hard link gives inotify a create and nothing else, as writes through a kernel NFS server can."""
    inbox = Inbox()
    export = tmp_path / "export"
    original = tmp_path / "IM0001"
    original.write_bytes(payload(1200))
    start_watcher(export, inbox, "native")
    linked_at = time.time()
    os.link(original, export / "IM0001")
    (arrived,) = inbox.take(1)
    assert arrived.source is ArrivalSource.STABLE
    assert arrived.size == 1200
    assert arrived.detected_at - linked_at >= STABLE_S
    inbox.assert_quiet()


# ------------------------------------------------------------------------------------------- start-up scan


@pytest.mark.parametrize("observer", OBSERVERS)
def test_startup_scan_emits_existing_files_once(
    tmp_path: Path, start_watcher: StartWatcher, observer: str
) -> None:
    (tmp_path / "series").mkdir()
    old = [tmp_path / "IM0001", tmp_path / "series" / "IM0002"]
    for path in old:
        write_atomic(path, payload(2000))
        an_hour_ago = time.time() - 3600
        os.utime(path, (an_hour_ago, an_hour_ago))
    fresh = tmp_path / "IM0003"
    write_atomic(fresh, payload(2500))
    inbox = Inbox()
    stable_s = 1.5  # long enough that "at once" and "after the window" cannot be confused on a busy machine
    started_at = time.time()
    watcher = start_watcher(tmp_path, inbox, observer, stable_s=stable_s)

    arrived = inbox.take(3)
    by_name = {a.path.name: a for a in arrived}
    assert set(by_name) == {"IM0001", "IM0002", "IM0003"}
    assert {a.source for a in arrived} == {ArrivalSource.STARTUP_SCAN}
    assert by_name["IM0002"].path == watcher.folder / "series" / "IM0002"
    # A file younger than the settle time may still be being written: it waits for the stability window.
    assert by_name["IM0003"].detected_at - started_at >= stable_s
    assert by_name["IM0001"].detected_at - started_at < stable_s
    inbox.assert_quiet(stable_s + 6 * POLL_S)


@pytest.mark.parametrize("observer", OBSERVERS)
def test_startup_scan_does_not_emit_a_file_being_written(
    tmp_path: Path, start_watcher: StartWatcher, observer: str
) -> None:
    data = payload(50_000)
    target = tmp_path / "IM0001"
    writer = _write_later(lambda: write_slow(target, data, chunks=5, pause_s=0.1))
    deadline = time.monotonic() + WAIT_S
    while not (target.exists() and target.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.005)
    inbox = Inbox()
    start_watcher(tmp_path, inbox, observer)
    (arrived,) = inbox.take(1)
    writer.join(WAIT_S)
    assert arrived.size == len(data)
    inbox.assert_quiet()


# ------------------------------------------------------------------------------------------------- skipping


@pytest.mark.parametrize(
    ("relative", "reason"),
    [
        ("IM0001", None),
        ("series/IM0001.dcm", None),
        (".IM0001.partial", SkipReason.TEMPORARY),
        ("IM0001.PART", SkipReason.TEMPORARY),
        ("IM0001.tmp", SkipReason.TEMPORARY),
        ("IM0001.filepart", SkipReason.TEMPORARY),
        ("~lock.IM0001", SkipReason.TEMPORARY),
        (".DS_Store", SkipReason.HIDDEN),
        (".snapshot/hourly.0/IM0001", SkipReason.HIDDEN),
        ("DICOMDIR", SkipReason.DICOMDIR),
        ("study/dicomdir", SkipReason.DICOMDIR),
    ],
)
def test_name_skip_reason(tmp_path: Path, relative: str, reason: SkipReason | None) -> None:
    assert name_skip_reason(tmp_path / relative, tmp_path) is reason


SKIPPED_BY_NAME = {
    ".hidden": SkipReason.HIDDEN,
    "IM0001.partial": SkipReason.TEMPORARY,
    "IM0002.tmp": SkipReason.TEMPORARY,
    "IM0003.part": SkipReason.TEMPORARY,
    "~IM0004": SkipReason.TEMPORARY,
    "DICOMDIR": SkipReason.DICOMDIR,
}


def _make_skippable_files(folder: Path) -> None:
    for name in SKIPPED_BY_NAME:
        write_atomic(folder / name, payload(500))
    (folder / "empty").touch()
    (folder / "series").mkdir()
    (folder / ".snapshot").mkdir()


@pytest.mark.parametrize("observer", OBSERVERS)
@pytest.mark.parametrize("already_there", [False, True], ids=["events", "startup"])
def test_skipped_files_are_reported_and_never_emitted(
    tmp_path: Path, start_watcher: StartWatcher, observer: str, already_there: bool
) -> None:
    inbox = Inbox()
    if already_there:
        _make_skippable_files(tmp_path)
        for path in tmp_path.iterdir():  # the empty file must wait for the window, even at start-up
            os.utime(path)
    created_at = time.time()
    watcher = start_watcher(tmp_path, inbox, observer)
    if not already_there:
        _make_skippable_files(tmp_path)
    write_atomic(tmp_path / "IM0005", payload(500))

    expected = {
        **SKIPPED_BY_NAME,
        "empty": SkipReason.EMPTY,
        "series": SkipReason.DIRECTORY,
        ".snapshot": SkipReason.HIDDEN,
    }
    # An atomic write's own temp names are reported too (native observer only: a poll rarely sees them).
    skips: dict[str, tuple[str, float]] = {}
    while set(expected) - set(skips):
        path, reason, at = inbox.take_skips(1)[0]
        if path.name.endswith(".partial") and path.name.startswith("."):
            assert reason == SkipReason.TEMPORARY
            continue
        assert path.name not in skips, f"{path.name} reported twice"
        skips[path.name] = (reason, at)
    assert {name: reason for name, (reason, _) in skips.items()} == expected
    assert skips["empty"][1] - created_at >= STABLE_S
    (arrived,) = inbox.take(1)
    assert arrived.path == watcher.folder / "IM0005"
    inbox.assert_quiet()
    assert watcher.stats.emitted == 1
    assert watcher.stats.skipped >= len(expected)


@pytest.mark.parametrize("observer", OBSERVERS)
def test_empty_file_filled_later_is_emitted(
    tmp_path: Path, start_watcher: StartWatcher, observer: str
) -> None:
    inbox = Inbox()
    start_watcher(tmp_path, inbox, observer)
    target = tmp_path / "IM0001"
    target.touch()
    path, reason, _ = inbox.take_skips(1)[0]
    assert (path.name, reason) == ("IM0001", SkipReason.EMPTY)
    write_atomic(target, payload(700))
    (arrived,) = inbox.take(1)
    assert arrived.size == 700


# -------------------------------------------------------------------------------------------- de-duplication


@pytest.mark.parametrize("observer", OBSERVERS)
def test_rewritten_file_is_emitted_again(tmp_path: Path, start_watcher: StartWatcher, observer: str) -> None:
    inbox = Inbox()
    start_watcher(tmp_path, inbox, observer)
    target = tmp_path / "IM0001"
    write_atomic(target, payload(1000, seed=1))
    first = inbox.take(1)[0]
    write_atomic(target, payload(1000, seed=2))  # same size, new content and mtime
    second = inbox.take(1)[0]
    write_slow(target, payload(1500, seed=3), pause_s=0.0)  # rewritten in place
    third = inbox.take(1)[0]
    assert [a.path for a in (first, second, third)] == [target] * 3
    assert (first.size, second.size, third.size) == (1000, 1000, 1500)
    assert first.mtime_ns != second.mtime_ns
    inbox.assert_quiet()


@pytest.mark.parametrize("observer", OBSERVERS)
def test_many_files_written_quickly_are_each_emitted_once(
    tmp_path: Path, start_watcher: StartWatcher, observer: str
) -> None:
    inbox = Inbox()
    watcher = start_watcher(tmp_path, inbox, observer)
    names = [f"IM{i:04d}" for i in range(200)]
    for i, name in enumerate(names):
        write_atomic(tmp_path / name, payload(300 + i))
    arrived = inbox.take(len(names), timeout=4 * WAIT_S)
    counts = Counter(a.path.name for a in arrived)
    assert counts == Counter(names)
    assert all(a.size == 300 + names.index(a.path.name) for a in arrived)
    inbox.assert_quiet()
    assert watcher.stats.emitted == len(names)


# ------------------------------------------------------------------------------------------ threads and sink


@pytest.mark.parametrize("observer", OBSERVERS)
def test_stop_leaves_no_thread_alive(tmp_path: Path, observer: str) -> None:
    before = set(threading.enumerate())
    inbox = Inbox()
    watcher = Watcher(tmp_path, inbox.sink, observer=observer, poll_interval_s=POLL_S, stable_s=STABLE_S)
    watcher.start()
    assert set(threading.enumerate()) - before, "a running watcher has threads"
    write_atomic(tmp_path / "IM0001", payload(100))
    inbox.take(1)
    (tmp_path / "IM0002").write_bytes(b"")  # leaves a candidate with the stability checker
    watcher.stop()
    watcher.stop()
    assert set(threading.enumerate()) - before == set()


def test_stop_before_start_is_harmless(tmp_path: Path) -> None:
    watcher = Watcher(tmp_path, Inbox().sink)
    watcher.stop()


def test_a_watcher_starts_once(tmp_path: Path, start_watcher: StartWatcher) -> None:
    watcher = start_watcher(tmp_path, Inbox(), "polling")
    with pytest.raises(RuntimeError, match="already started"):
        watcher.start()


@pytest.mark.parametrize("observer", OBSERVERS)
def test_sink_errors_are_logged_and_watching_goes_on(
    tmp_path: Path, start_watcher: StartWatcher, observer: str, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox()
    refused = threading.Event()

    def refuse_first(arrived: ArrivedFile) -> None:
        if arrived.path.name == "IM0001":
            refused.set()
            raise RuntimeError("downstream refused")
        inbox.sink(arrived)

    caplog.set_level(logging.ERROR, logger="agent.ingest.watcher")
    watcher = start_watcher(tmp_path, inbox, observer, sink=refuse_first)
    write_atomic(tmp_path / "IM0001", payload(100))
    assert refused.wait(WAIT_S)
    write_atomic(tmp_path / "IM0002", payload(100))
    (arrived,) = inbox.take(1)  # one worker thread: IM0001 was fully handled before IM0002
    assert arrived.path.name == "IM0002"
    assert (watcher.stats.emitted, watcher.stats.sink_errors) == (1, 1)
    assert "downstream refused" in caplog.text


@pytest.mark.parametrize("observer", OBSERVERS)
def test_a_blocked_sink_holds_no_lock_and_loses_nothing(
    tmp_path: Path, start_watcher: StartWatcher, observer: str
) -> None:
    """A full downstream queue blocks the sink; events keep being recorded and are delivered afterwards."""
    inbox = Inbox()
    entered = threading.Event()
    release = threading.Event()

    def blocking_sink(arrived: ArrivedFile) -> None:
        entered.set()
        release.wait(WAIT_S)
        inbox.sink(arrived)

    watcher = start_watcher(tmp_path, inbox, observer, sink=blocking_sink)
    write_atomic(tmp_path / "IM0000", payload(100))
    assert entered.wait(WAIT_S)
    names = [f"IM{i:04d}" for i in range(1, 6)]
    for name in names:
        write_atomic(tmp_path / name, payload(100))
    reader = threading.Thread(target=lambda: watcher.stats, name="test-stats-reader")
    reader.start()
    reader.join(WAIT_S / 3)  # the sink stays blocked for up to WAIT_S
    assert not reader.is_alive(), "stats waited for the sink: a lock is held while calling it"
    release.set()
    arrived = inbox.take(1 + len(names))
    assert Counter(a.path.name for a in arrived) == Counter(["IM0000", *names])
    inbox.assert_quiet()


# ------------------------------------------------------------------------------------------- folder and arguments


def test_missing_folder_is_created_with_a_warning(
    tmp_path: Path, start_watcher: StartWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "not" / "yet"
    with caplog.at_level(logging.WARNING, logger="agent.ingest.watcher"):
        start_watcher(folder, Inbox(), "polling")
    assert folder.is_dir()
    assert "does not exist" in caplog.text


def test_a_file_in_place_of_the_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.write_bytes(b"not a folder")
    watcher = Watcher(folder, Inbox().sink)
    with pytest.raises(NotADirectoryError, match="not a directory") as raised:
        watcher.start()
    assert raised.value.filename == str(folder)


def test_a_folder_that_cannot_be_created_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    folder = tmp_path / "file" / "export"
    with pytest.raises(NotADirectoryError, match="cannot create the watch folder") as raised:
        Watcher(folder, Inbox().sink).start()
    assert raised.value.filename == str(folder)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"observer": "inotify"}, "observer must be one of 'native', 'polling'; found 'inotify'"),
        ({"poll_interval_s": 0.0}, "poll_interval_s must be > 0 seconds; found 0.0"),
        ({"stable_s": -1.0}, "stable_s must be >= 0 seconds; found -1.0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Watcher(tmp_path, Inbox().sink, **kwargs)


# ------------------------------------------------------------------------------------------------- latency


def _median_delay_ms(
    start_watcher: StartWatcher, folder: Path, observer: str, files: int, **kwargs: Any
) -> float:
    """Median of (emission time - time the rename returned) over files written one after another."""
    inbox = Inbox()
    start_watcher(folder, inbox, observer, **kwargs)
    delays = []
    for i in range(files):
        write_atomic(folder / f"IM{i:04d}", payload(20_000, seed=i))
        renamed_at = time.time()
        (arrived,) = inbox.take(1)
        delays.append(arrived.detected_at - renamed_at)
    return 1000 * statistics.median(delays)


@LINUX_ONLY
def test_native_detection_delay_is_measured(tmp_path: Path, start_watcher: StartWatcher) -> None:
    median_ms = _median_delay_ms(start_watcher, tmp_path, "native", 50)
    print(f"\nnative observer: median rename-to-emission delay {median_ms:.2f} ms over 50 files")


@pytest.mark.slow
def test_polling_detection_delay_is_measured(tmp_path: Path, start_watcher: StartWatcher) -> None:
    median_ms = _median_delay_ms(
        start_watcher, tmp_path, "polling", 5, poll_interval_s=DEFAULT_POLL_INTERVAL_S, stable_s=SETTLE_S
    )
    print(
        f"\npolling observer (poll {DEFAULT_POLL_INTERVAL_S} s, stable_s {SETTLE_S} s): "
        f"median rename-to-emission delay {median_ms:.0f} ms over 5 files"
    )
