"""Kill the agent with SIGKILL at a random moment while series stream, restart it, and check nothing was lost.

Shared by ``tests/test_crash_safety.py`` (a few runs) and ``bench/crash.py`` (20 and more). One *run*:

1. a fresh export, state and DICOM folder; the agent (``sct-agent run``, its own process, as systemd runs it)
   starts; a subscriber connects and stays connected across the restart, as a robot would;
2. the "scanner" copies the staged series into the export folder file by file (each written under a hidden name
   and renamed, as careful consoles do), at a pace that spreads ingest over the run;
3. at a random moment within the time an uninterrupted run takes (the reference run measures it), the agent is
   sent SIGKILL; the scanner goes on exporting, because the scanner does not know;
4. the journal as the killed agent left it says which phase the kill hit;
5. the agent starts again on the same folders and runs until the journal says every acquisition is finished;
6. checks: every acquisition the reference run saw is finished; each passing one has exactly one committed volume
   for the model, with the reference sha256, and one complete DICOM series with the reference Series Instance
   UID and file count, no numbered duplicate and no partial folder; the rejected one has no volume; the
   subscriber never got a first-time (not republished) volume twice for one acquisition, and every volume it got
   has the reference sha256; it got each passing volume at least once; SQLite's integrity check passes, every
   published slab and volume row agrees with the committed volume; the volume archive holds no temporary files.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from agent_support import SMALL_FOV_MM, write_test_model, write_test_protocol

from agent.client import SctClient
from agent.ops.agent_process import AgentProcess, free_port
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, SimulationRequest, export_case

#: Seeds of the two passing series and of the one whose TE 2 the protocol refuses.
PASSING_SEEDS = (910301, 910302)
REJECTED_SEED = 910303
#: Files per second the "scanner" exports: 3 series x 80 files take about 2.4 s.
EXPORT_RATE_FILES_PER_S = 100.0
#: Seconds an agent gets to start, and a run to finish every acquisition.
START_TIMEOUT_S = 180.0
FINISH_TIMEOUT_S = 300.0
#: Finished volumes a late subscriber is sent: all the passing ones.
SNAPSHOT_VOLUMES = 4
JOURNAL = "var/journal.sqlite"


@dataclass(frozen=True, slots=True)
class Staged:
    """The series, exported once, copied into each run's export folder; the model and protocols they need."""

    root: Path
    series: tuple[Path, ...]
    model: Path
    protocols: Path

    @property
    def files(self) -> list[tuple[Path, Path]]:
        """(staged file, its path relative to the export folder), series after series, in export order."""
        pairs: list[tuple[Path, Path]] = []
        for folder in self.series:
            for path in sorted(folder.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name)):
                pairs.append((path, Path(folder.name) / path.name))
        return pairs


def stage(root: Path) -> Staged:
    root.mkdir(parents=True, exist_ok=True)
    folders = []
    for seed, settings in (*((s, ()) for s in PASSING_SEEDS), (REJECTED_SEED, ("EchoTime2=4.8",))):
        request = SimulationRequest(seed=seed, settings=settings, fov_mm=SMALL_FOV_MM, supersample=1)
        case = generate_case(seed, request.acquisition(), supersample=1)
        out = root / "series" / f"series-{seed}"
        export_case(case, ExportOptions(out_dir=out, deterministic_uids=True))
        folders.append(out)
    return Staged(
        root=root,
        series=tuple(folders),
        model=write_test_model(root / "model"),
        protocols=write_test_protocol(root / "protocols"),
    )


def write_config(folder: Path, staged: Staged) -> tuple[Path, str, str]:
    """``folder/agent.toml`` for one run: its own folders and free loopback ports, the test model, DICOM on."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    snapshot = f"tcp://127.0.0.1:{free_port()}"
    path = folder / "agent.toml"
    path.write_text(
        '[watch]\nfolder = "export"\npoll_interval_s = 0.1\n\n[state]\nfolder = "var"\n\n'
        f'[protocols]\nfolder = "{staged.protocols}"\n\n'
        f'[engine]\nmodel = "{staged.model}"\nbackend = "torch-eager"\nslab_depth = 16\n\n'
        f'[publish]\nendpoint = "{endpoint}"\nsnapshot_endpoint = "{snapshot}"\nheartbeat_s = 0.2\n'
        f"snapshot_volumes = {SNAPSHOT_VOLUMES}\n\n"
        '[dicom]\nfolder = "dicom"\n\n[metrics]\nlisten = ""\n\n[assembly]\nquiet_period_s = 5.0\n'
    )
    return path, endpoint, snapshot


class Scanner(threading.Thread):
    """Copies the staged files into the export folder at a pace, each under a hidden name, then renamed."""

    def __init__(self, staged: Staged, export: Path, rate_files_per_s: float) -> None:
        super().__init__(name="crash-scanner", daemon=True)
        self._files = staged.files
        self._export = export
        self._interval = 1.0 / rate_files_per_s

    def run(self) -> None:
        started = time.monotonic()
        for n, (source, relative) in enumerate(self._files):
            delay = started + n * self._interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            target = self._export / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.part")
            shutil.copyfile(source, temp)
            temp.rename(target)


class Subscriber(threading.Thread):
    """A robot that stays connected across the agent's restart and keeps every volume it is handed."""

    def __init__(self, endpoint: str, snapshot: str) -> None:
        super().__init__(name="crash-subscriber", daemon=True)
        self._client = SctClient(endpoint, snapshot_endpoint=snapshot)
        self._done = threading.Event()
        self.volumes: list[tuple[str, str, bool]] = []

    def run(self) -> None:
        with self._client:
            while not self._done.is_set():
                self._client.receive(0.1)
                while (volume := self._client.pop_volume()) is not None:
                    self.volumes.append((volume.acquisition_id, volume.sha256, volume.republished))

    def stop(self) -> None:
        self._done.set()
        self.join(10)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run ended with; ``reference`` runs are not killed."""

    #: acquisition id -> journal state.
    states: dict[str, str]
    #: passing acquisition id -> committed volume sha256.
    volumes: dict[str, str]
    #: passing acquisition id -> (series folder name, Series Instance UIDs (the CT's, the Segmentation's if any),
    #: CT image count).
    series: dict[str, tuple[str, str, int]]
    #: What the subscriber got: (acquisition id, sha256, republished).
    received: tuple[tuple[str, str, bool], ...]
    #: Seconds from the first exported file to every acquisition finished (uninterrupted run only).
    seconds: float
    #: Where the kill landed (None for the reference).
    phase: str | None = None
    kill_at_s: float | None = None
    problems: tuple[str, ...] = field(default_factory=tuple)


def _journal(folder: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{folder / JOURNAL}?mode=ro", uri=True, timeout=5.0)


def _finished(folder: Path, expected: int) -> bool:
    if not (folder / JOURNAL).exists():
        return False
    try:
        with _journal(folder) as conn:
            ended = conn.execute(
                "SELECT COUNT(*) FROM acquisitions WHERE state IN ('rejected', 'incomplete')"
            ).fetchone()[0]
            dicom = conn.execute("SELECT COUNT(*) FROM volumes WHERE dicom_series IS NOT NULL").fetchone()[0]
    except sqlite3.Error:
        return False
    return int(ended) + int(dicom) >= expected


def _phase(folder: Path, total_files: int) -> str:
    """Which part of the work the kill interrupted, read from the journal the killed agent left."""
    if not (folder / JOURNAL).exists():
        return "start"
    with _journal(folder) as conn:
        files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        slabs = conn.execute("SELECT COUNT(*) FROM slabs").fetchone()[0]
        committed = conn.execute("SELECT COUNT(*) FROM volumes").fetchone()[0]
        written = conn.execute("SELECT COUNT(*) FROM volumes WHERE dicom_series IS NOT NULL").fetchone()[0]
    if committed > written:
        return "dicom"
    if files < total_files and slabs == 0:
        return "ingest"
    if committed < len(PASSING_SEEDS):
        return "inference"
    return "after"


def run_once(staged: Staged, folder: Path, *, kill_at_s: float | None, seed: int = 0) -> Outcome:
    """One run in ``folder``; SIGKILL at ``kill_at_s`` after the first file (None: the reference run)."""
    folder.mkdir(parents=True)
    config, endpoint, snapshot = write_config(folder, staged)
    expected = len(staged.series)
    total_files = len(staged.files)
    agent = AgentProcess(config, folder / "agent-1.log")
    subscriber: Subscriber | None = None
    phase: str | None = None
    try:
        agent.wait_ready(START_TIMEOUT_S)
        subscriber = Subscriber(endpoint, snapshot)
        subscriber.start()
        scanner = Scanner(staged, folder / "export", EXPORT_RATE_FILES_PER_S)
        started = time.monotonic()
        scanner.start()
        if kill_at_s is not None:
            time.sleep(max(0.0, started + kill_at_s - time.monotonic()))
            agent.kill()  # SIGKILL: no handler runs, nothing is flushed
            phase = _phase(folder, total_files)
            scanner.join()
            agent = AgentProcess(config, folder / "agent-2.log")
            agent.wait_ready(START_TIMEOUT_S)
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while not _finished(folder, expected):
            if time.monotonic() > deadline:
                raise TimeoutError(f"run in {folder}: not every acquisition finished in {FINISH_TIMEOUT_S} s")
            time.sleep(0.1)
        seconds = time.monotonic() - started
        scanner.join()
        # The last volume may still be on its way to the subscriber.
        time.sleep(1.0)
    finally:
        status = agent.stop(60)
        if subscriber is not None:
            subscriber.stop()
    if status != 0:
        raise RuntimeError(f"run in {folder}: the agent exited with {status} on SIGTERM")
    assert subscriber is not None
    outcome = _read_outcome(folder, subscriber, seconds)
    return Outcome(
        states=outcome.states,
        volumes=outcome.volumes,
        series=outcome.series,
        received=outcome.received,
        seconds=seconds,
        phase=phase,
        kill_at_s=kill_at_s,
        problems=_integrity(folder),
    )


def _read_outcome(folder: Path, subscriber: Subscriber, seconds: float) -> Outcome:
    with _journal(folder) as conn:
        states = dict(conn.execute("SELECT acquisition_id, state FROM acquisitions").fetchall())
        volumes = dict(conn.execute("SELECT acquisition_id, sha256 FROM volumes").fetchall())
        folders = dict(conn.execute("SELECT acquisition_id, dicom_series FROM volumes").fetchall())
    series = {}
    for acquisition_id, name in folders.items():
        # The CT images, and the DICOM Segmentation beside them when the volume had regions not to trust (its
        # UIDs are derived from the volume too, so a run that wrote it again must give the same ones).
        files = sorted((folder / "dicom" / name).glob("*.dcm"))
        uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}
        series[acquisition_id] = (name, ",".join(sorted(uids)), sum(f.name.startswith("CT") for f in files))
    return Outcome(states, volumes, series, tuple(subscriber.volumes), seconds)


def _integrity(folder: Path) -> tuple[str, ...]:
    """What is wrong with the state a run left, whatever the reference says."""
    problems = []
    with _journal(folder) as conn:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            problems.append(f"journal integrity_check: {check}")
        for acquisition_id, kind, sha, committed in conn.execute(
            """SELECT p.acquisition_id, p.kind, p.sha256, v.sha256 FROM publications p
            LEFT JOIN volumes v ON v.acquisition_id = p.acquisition_id WHERE p.kind = 'volume'"""
        ):
            if committed != sha:
                problems.append(f"{acquisition_id}: {kind} published with {sha[:12]}, committed {committed}")
        for (acquisition_id,) in conn.execute(
            "SELECT acquisition_id FROM acquisitions WHERE state = 'published' "
            "AND acquisition_id NOT IN (SELECT acquisition_id FROM volumes)"
        ):
            problems.append(f"{acquisition_id}: state published without a committed volume")
    dicom = folder / "dicom"
    partial = [p.name for p in dicom.iterdir() if p.name.startswith(".")] if dicom.exists() else []
    if partial:
        problems.append(f"partial DICOM folders visible: {partial}")
    archive = folder / "var" / "snapshot"
    temps = [p.name for p in archive.glob(".*")] if archive.exists() else []
    if temps:
        problems.append(f"temporary files left in the volume archive: {temps}")
    return tuple(problems)


def compare(reference: Outcome, run: Outcome) -> list[str]:
    """Every way ``run`` differs from the uninterrupted ``reference``; empty when the run is sound."""
    problems = list(run.problems)
    if run.states != reference.states:
        problems.append(f"acquisition states {run.states}, reference {reference.states}")
    if run.volumes != reference.volumes:
        problems.append(f"committed volumes {run.volumes}, reference {reference.volumes}")
    if run.series != reference.series:
        problems.append(f"DICOM series {run.series}, reference {reference.series}")
    first_time = Counter(a for a, _, republished in run.received if not republished)
    twice = sorted(a for a, n in first_time.items() if n > 1)
    if twice:
        problems.append(f"volumes sent as new more than once: {twice}")
    wrong = sorted({a for a, sha, _ in run.received if reference.volumes.get(a) != sha})
    if wrong:
        problems.append(f"volumes received with other content: {wrong}")
    missing = sorted(set(reference.volumes) - {a for a, _, _ in run.received})
    if missing:
        problems.append(f"volumes never received by the subscriber: {missing}")
    return problems


def random_kill_times(runs: int, window_s: float, seed: int) -> list[float]:
    """Kill moments spread over the whole run: one per equal part of the window, at a random point in it."""
    rng = random.Random(seed)
    part = window_s / runs
    times = [part * (k + rng.random()) for k in range(runs)]
    rng.shuffle(times)
    return times
