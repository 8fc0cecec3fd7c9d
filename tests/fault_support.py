"""Shared helpers for the fault tests (tests/test_fault_*.py): a small simulated series, a subscriber in a
thread that records what the agent says, and reading one value from the agent's /metrics.

The series is the small field of view of tests/agent_support.py (three slabs of 16 slices), so a fault test
pays seconds of CPU inference, not minutes.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent_support import SMALL_FOV_MM, write_test_model

from agent.client import ReceivedVolume, SctClient
from agent.publish.wire import Message, SlabMessage, StatusMessage
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.scanner.export import SimulationRequest

#: Generous bound for one small series to go through, or for the agent to notice a fault (shared CPUs).
FAULT_TIMEOUT_S = 90.0
#: The small series' in-plane matrix: 120 mm at the seed protocol's 0.74 mm.
SMALL_MATRIX = (162, 162)


def write_small_model(folder: Path) -> Path:
    """tests/agent_support.py's test model (the shipped weights, hash-checked), whose stated matrix is the small
    series' own: the engine warms up and compiles the one window these tests use, not the lumbar one too."""
    write_test_model(folder)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["input"]["matrix"] = list(SMALL_MATRIX)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return folder


def small_series(seed: int) -> PhantomCase:
    """A passing dual-echo series on the small field of view (exported again, it is a new series: new UIDs)."""
    request = SimulationRequest(seed=seed, fov_mm=SMALL_FOV_MM, supersample=1)
    return generate_case(seed, request.acquisition(), supersample=1)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, sample: str) -> float:
    """The value of one sample, written as Prometheus prints it (``name{label="value"}``)."""
    for line in text.splitlines():
        if line.split(" ")[0] == sample:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {sample} not found")


@dataclass
class Recorder:
    """A subscriber (the reference client, with snapshots) in a thread, keeping everything it receives."""

    endpoint: str
    snapshot: str
    messages: list[Message] = field(default_factory=list)
    volumes: list[ReceivedVolume] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    heard: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with SctClient(self.endpoint, snapshot_endpoint=self.snapshot) as client:
            while not self.stop.is_set():
                message = client.receive(0.05)
                with self.lock:
                    if message is not None:
                        self.heard.set()
                        self.messages.append(message)
                    volume = client.pop_volume()
                    if volume is not None:
                        self.volumes.append(volume)

    def statuses(self, kind: str) -> list[StatusMessage]:
        with self.lock:
            return [m for m in self.messages if isinstance(m, StatusMessage) and m.kind == kind]

    def slabs_of(self, acquisition_id: str) -> list[SlabMessage]:
        with self.lock:
            return [
                m for m in self.messages if isinstance(m, SlabMessage) and m.acquisition_id == acquisition_id
            ]

    def volume_count(self) -> int:
        with self.lock:
            return len(self.volumes)

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float = FAULT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        with self.lock:
            tail = [(m.kind, m.body) for m in self.messages if isinstance(m, StatusMessage)][-6:]
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last statuses: {tail}")

    def final_pass(self) -> list[str]:
        """Acquisitions whose final verdict passed, in order."""
        return [
            s.acquisition_id or ""
            for s in self.statuses("verdict")
            if s.body["final"] and s.body["outcome"] == "pass"
        ]


@contextmanager
def recording(endpoint: str, snapshot: str) -> Iterator[Recorder]:
    """A running :class:`Recorder` that has heard the agent (heartbeats flow every 0.2 s in these tests)."""
    recorder = Recorder(endpoint, snapshot)
    thread = threading.Thread(target=recorder.run, name="test-recorder")
    thread.start()
    try:
        assert recorder.heard.wait(30), "the recorder never heard the agent"
        yield recorder
    finally:
        recorder.stop.set()
        thread.join(10)
