"""No patient data leaves the agent except in the DICOM files it writes for the patient's record.

Whole series go through a real agent process (``sct-agent run``) logging at DEBUG, once in text and once in
JSON: a passing series (streamed, published, written as a DICOM series, sent by C-STORE to dcmtk's storescp),
a rejected one with a truncated file in it (a bad file, an acquisition ended by the quiet period), a file that
is not DICOM and an empty one. Every file carries a sentinel patient name, ID, birth date and accession number,
every instance UID a sentinel root, and every file and folder name the sentinel name and ID. Everything the
agent says is then searched for the sentinels, case-insensitively: every line on its stderr, the /metrics
page, every message a real SUB socket received and the reply to a snapshot request. Nothing may be found.

The search is shown to work where the sentinels must be: in the exported files and their paths, in the sCT series
the C-STORE peer received (the sCT belongs in the patient's record, so it carries the patient), and in the
agent's journal, which records file paths.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
from agent_support import SMALL_SLAB_DEPTH, write_test_model, write_test_protocol
from scanner_support import Identity, restamp
from sct_dicom_support import PEER_AE, StartStorescp, needs_storescp

from agent.ops.agent_process import AgentProcess, free_port
from agent.publish.wire import encode_snapshot_request
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, SimulationRequest, export_case

SENTINEL = Identity(
    family_name="Quxwellington",
    given_name="Zorbatrix",
    patient_id="PHI7731946Q",
    birth_date="19230917",
    accession_number="ACC5550123Q",
    uid_root="1.3.6.1.4.1.99999.31337",
)
#: Everything that must not appear, lower case.
FORBIDDEN = SENTINEL.forbidden_texts()
PASSING_SEED = 900301
#: Smaller in-plane than the other end-to-end tests (81 x 81 pixels, 40 slices): this module starts two agents,
#: and the CPU engine's time per slab grows with the in-plane area.
PHI_FOV_MM = (60.0, 60.0, 36.0)
TIMEOUT_S = 180.0
QUIET_PERIOD_S = 4.0
#: The folder the export lands in, and the series folders below it: named as a console might name them.
PATIENT_FOLDER = f"{SENTINEL.family_name}^{SENTINEL.given_name}_{SENTINEL.patient_id}"


def found_sentinels(text: str) -> list[str]:
    """The sentinels ``text`` contains (case-insensitive)."""
    lowered = text.lower()
    return [sentinel for sentinel in FORBIDDEN if sentinel in lowered]


@dataclass(frozen=True)
class PreparedExport:
    """Series stamped with the sentinel identity, ready to be copied into an export folder."""

    root: Path
    model: Path
    protocols: Path
    truncated: Path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedExport:
    base = tmp_path_factory.mktemp("phi")
    model = write_test_model(base / "model")
    protocols = write_test_protocol(base / "protocols", PHI_FOV_MM)
    uids: dict[str, str] = {}
    patient = base / "export" / PATIENT_FOLDER
    series_paths = {}
    for name, settings in (("pass", ()), ("reject", ("EchoTime2=4.8",))):
        request = SimulationRequest(seed=PASSING_SEED, settings=settings, fov_mm=PHI_FOV_MM, supersample=1)
        case = generate_case(PASSING_SEED, request.acquisition(), supersample=1)
        staged = export_case(case, ExportOptions(out_dir=base / "staging" / name))
        series_paths[name] = restamp(
            staged.paths,
            patient / f"{SENTINEL.patient_id}_{SENTINEL.accession_number}_{name}",
            SENTINEL,
            file_name=lambda k: f"{SENTINEL.family_name}_{SENTINEL.given_name}_{k:04d}.dcm",
            uids=uids,
        )
    # A file cut short in the rejected series (a bad file: its pixel data ends early), a file that is not DICOM
    # and an empty one (skipped).
    truncated = series_paths["reject"][len(series_paths["reject"]) // 2]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 5000])
    (patient / f"notes_{SENTINEL.given_name}_{SENTINEL.patient_id}.txt").write_text(
        f"{SENTINEL.patient_name} {SENTINEL.birth_date}\n"
    )
    (patient / f"{SENTINEL.patient_id}.dcm").write_bytes(b"")
    return PreparedExport(base / "export", model, protocols, truncated)


@dataclass
class RawSubscriber:
    """A SUB socket in a thread keeping every frame it receives, as bytes."""

    endpoint: str
    messages: list[list[bytes]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(self.endpoint)
        try:
            while not self.stop.is_set():
                if socket.poll(50):
                    frames = socket.recv_multipart()
                    with self.lock:
                        self.messages.append(frames)
        finally:
            socket.close()

    def statuses(self) -> list[dict[str, object]]:
        with self.lock:
            return [json.loads(m[1]) for m in self.messages if m[0] == b"status"]

    def has(self, topic: bytes) -> bool:
        with self.lock:
            return any(m[0] == topic for m in self.messages)


def snapshot(context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> list[list[bytes]]:
    """Every message of one snapshot reply, up to and including ``snapshot.end``, as the subscriber asks."""
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    replies = []
    try:
        dealer.send_multipart(encode_snapshot_request(time.time()))
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if dealer.poll(100):
                frames = dealer.recv_multipart()
                replies.append(frames)
                if frames[0] in (b"snapshot.end", b"snapshot.error"):
                    return replies
    finally:
        dealer.close()
    raise AssertionError(f"no snapshot.end within 30 s; got {[r[0] for r in replies]}")


def wait_until(condition: object, what: str, log: Path) -> None:
    assert callable(condition)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise AssertionError(f"timed out waiting for {what}; log tail:\n{tail}")


def final_outcomes(subscriber: RawSubscriber) -> dict[str, str]:
    return {
        str(s["acquisition_id"]): str(s["body"]["outcome"])  # type: ignore[index]
        for s in subscriber.statuses()
        if s["kind"] == "verdict" and s["body"]["final"]  # type: ignore[index]
    }


def stored(subscriber: RawSubscriber) -> bool:
    return any(
        s["kind"] == "dicom" and s["body"]["step"] == "store" and s["body"]["ok"]  # type: ignore[index]
        for s in subscriber.statuses()
    )


def expected_label(path: Path, export: Path) -> str:
    """What the agent calls a file by default: its relative path's SHA-256, 10 hex digits (docs/agent.md)."""
    return "file:" + hashlib.sha256(path.relative_to(export).as_posix().encode()).hexdigest()[:10]


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


@needs_storescp
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_patient_data_in_logs_metrics_or_messages(
    prepared: PreparedExport,
    storescp: StartStorescp,
    context: zmq.Context[zmq.Socket[bytes]],
    tmp_path: Path,
    log_format: str,
) -> None:
    peer_port = free_port()
    received = storescp(peer_port)
    endpoint, snapshot_endpoint = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[watch]\nfolder = "export"\npoll_interval_s = 0.1\n\n[state]\nfolder = "var"\n\n'
        f"[assembly]\nquiet_period_s = {QUIET_PERIOD_S}\n\n"
        f'[protocols]\nfolder = "{prepared.protocols}"\n\n'
        f'[engine]\nmodel = "{prepared.model}"\nbackend = "torch-eager"\nslab_depth = {SMALL_SLAB_DEPTH}\n\n'
        f'[publish]\nendpoint = "{endpoint}"\nsnapshot_endpoint = "{snapshot_endpoint}"\nheartbeat_s = 0.2\n\n'
        f'[dicom]\nfolder = "dicom"\nstore_peer = "{PEER_AE}@127.0.0.1:{peer_port}"\nstore_backoff_s = 0.5\n\n'
        f'[metrics]\nlisten = "{metrics}"\n\n'
        f'[logging]\nlevel = "DEBUG"\nformat = "{log_format}"\n'
    )
    log = tmp_path / "agent.log"
    export = tmp_path / "export"
    agent = AgentProcess(config, log, env={"JOURNAL_STREAM": ""})
    subscriber = RawSubscriber(endpoint)
    thread = threading.Thread(target=subscriber.run, args=(context,), name="test-phi-subscriber")
    try:
        agent.wait_ready(TIMEOUT_S)
        thread.start()
        wait_until(lambda: subscriber.has(b"heartbeat"), "a heartbeat", log)
        shutil.copytree(prepared.root, export, dirs_exist_ok=True)

        wait_until(lambda: len(final_outcomes(subscriber)) == 2, "two final verdicts", log)
        wait_until(lambda: subscriber.has(b"sct.volume") and stored(subscriber), "the volume stored", log)
        wait_until(lambda: log.read_text().count("acquisition_end") >= 2, "two acquisition_end lines", log)
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
            metrics_text = response.read().decode()
        snapshot_reply = snapshot(context, snapshot_endpoint)
    finally:
        subscriber.stop.set()
        if thread.is_alive():
            thread.join(10)
        status = agent.stop(60.0)
    assert status == 0, log.read_text()[-3000:]
    assert sorted(final_outcomes(subscriber).values()) == ["pass", "reject"]

    # The search: every log line, the metrics, every frame of every message and of the snapshot reply.
    lines = log.read_text(encoding="utf-8").splitlines()
    leaks = {
        f"log line {n}: {line}": found for n, line in enumerate(lines) if (found := found_sentinels(line))
    }
    leaks |= {f"metrics: {found}": found for found in [found_sentinels(metrics_text)] if found}
    for n, frames in enumerate([*subscriber.messages, *snapshot_reply]):
        if found := found_sentinels(b"\x00".join(frames).decode("latin-1")):
            leaks[f"message {n} ({frames[0]!r}): {frames[1][:300]!r}"] = found
    assert not leaks, "patient data left the agent:\n" + "\n".join(f"{k} -> {v}" for k, v in leaks.items())

    # The search can fail: the sentinels are in the files the agent read, in their paths, and in the sCT series
    # the C-STORE peer received (the patient's record must carry the patient).
    exported = sorted(p for p in export.rglob("*") if p.is_file())
    assert all(found_sentinels(str(p.relative_to(tmp_path))) for p in exported)
    dicom_file = next(p for p in exported if p.suffix == ".dcm" and p.stat().st_size > 0)
    assert set(found_sentinels(dicom_file.read_bytes().decode("latin-1"))) >= {
        SENTINEL.family_name.lower(),
        SENTINEL.patient_id.lower(),
        SENTINEL.birth_date,
        SENTINEL.accession_number.lower(),
        SENTINEL.uid_root,
    }
    sct_files = sorted(received.rglob("*"))
    assert sct_files, "storescp received nothing"
    assert SENTINEL.family_name.lower() in found_sentinels(sct_files[0].read_bytes().decode("latin-1"))
    # And in what the agent itself wrote where it may: its journal (service user only) records every path.
    journal = b"".join(p.read_bytes() for p in (tmp_path / "var").glob("journal.sqlite*"))
    assert SENTINEL.patient_id.lower() in found_sentinels(journal.decode("latin-1"))

    # What the log does say: DEBUG lines were written (so DEBUG-only leaks would have been caught), the bad file
    # by its label, and one canonical line per acquisition.
    truncated = export / prepared.truncated.relative_to(prepared.root)
    label = expected_label(truncated, export)
    if log_format == "json":
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert any(e["level"] == "DEBUG" for e in entries)
        bad = [e for e in entries if e.get("event") == "file" and e.get("outcome") == "bad"]
        assert [e["file"] for e in bad] == [label], bad
        assert bad[0]["level"] == "WARNING" and label in bad[0]["message"]
        ends = {e["outcome"]: e for e in entries if e.get("event") == "acquisition_end"}
        assert all(e["message"] == f"acquisition {e['acquisition_id']} ended: {o}" for o, e in ends.items())
        assert sorted(ends) == ["published", "rejected"], ends
        published, rejected = ends["published"], ends["rejected"]
        assert published["dicom"] == "written" and published["slabs"] >= 1
        assert published["backend"] == "torch-eager" and published["precision"]
        assert published["last_image_to_volume_s"] is not None
        assert published["protocol_id"] and published["protocol_version"]
        assert published["slices_per_echo"] == [published["expected_slices"]] * 2
        assert rejected["dicom"] == "none" and rejected["slabs"] == 0
        assert "EchoTime2" in [r["attribute"] for r in rejected["reasons"]]
        assert all({"found", "required"} <= set(r) for r in rejected["reasons"])
    else:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) ", lines[0]), lines[0]
        assert any(" DEBUG " in line for line in lines)
        assert any(" WARNING " in line and f"file bad: {label}: PixelData" in line for line in lines)
        end_lines = [line for line in lines if " acquisition_end " in line]
        assert len(end_lines) == 2, end_lines
        assert any("outcome=published" in line and "dicom=written" in line for line in end_lines), end_lines
        assert any("outcome=rejected" in line and "EchoTime2: found" in line for line in end_lines), end_lines
