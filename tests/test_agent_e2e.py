"""The agent end to end: real watcher, real files from the scanner simulator, the real engine, real ZeroMQ.

One agent runs for the whole module (its start-up warms the engine); the tests feed it series one after the
other, as a scanner does, and read what a subscriber and hospital IT (metrics over HTTP) see.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zmq
from agent_support import (
    SMALL_FOV_MM,
    SMALL_SLAB_DEPTH,
    TEST_PROTOCOL_ID,
    agent_config,
    write_test_model,
    write_test_protocol,
)
from protocol_spec_support import schema_errors, validator
from real_dicom_support import (
    PHILIPS_CLASSIC,
    PHILIPS_ENHANCED,
    PHILIPS_RAW,
    SIEMENS_SPLIT_ECHO1,
    SIEMENS_SPLIT_ECHO2,
    shared_dicom,
)
from triton_support import served

from agent.cli import check
from agent.client import ReceivedVolume, SctClient
from agent.ops.config import AgentConfig, TritonConfig
from agent.publish.wire import ConfidenceMessage, SlabMessage, StatusMessage, encode_snapshot_request
from agent.service import AgentService
from engines.inference.engine import SctEngine
from engines.model.manifest import ModelManifest
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.scanner.export import (
    SIEMENS_SERIES_NUMBER,
    ExportOptions,
    OutputFormat,
    SimulationRequest,
    export_case,
)
from engines.scanner.mr_classic import siemens_protocol_name

#: Generous bound for one small series to go through (eager CPU inference of three 48 x 168 x 168 windows
#: takes about a second; CI machines are shared).
SERIES_TIMEOUT_S = 60.0
PASSING_SEED = 900101
TSE_PARTIAL = "dcm_qa_pdt2/Siemens_3_pd+t2_tse_2D_2echo_PARTIAL"


def simulate_case(seed: int, *settings: str, echoes: int | None = None) -> PhantomCase:
    request = SimulationRequest(
        seed=seed, settings=settings, echoes=echoes, fov_mm=SMALL_FOV_MM, supersample=1
    )
    return generate_case(seed, request.acquisition(), supersample=1)


@dataclass
class Listener:
    """A subscriber in a thread, recording everything it receives."""

    endpoint: str
    snapshot: str
    statuses: list[StatusMessage] = field(default_factory=list)
    slabs: list[SlabMessage] = field(default_factory=list)
    #: Schema 1.4: each slab's and volume's confidence message, as delivered.
    confidences: list[ConfidenceMessage] = field(default_factory=list)
    volumes: list[ReceivedVolume] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    connected: threading.Event = field(default_factory=threading.Event)
    gaps: int = 0

    def dicom_written(self, acquisition_id: str) -> str:
        """The series folder the agent reported writing for ``acquisition_id``, "" until it has.

        Lock-free (a list copy is atomic), so it can run inside :meth:`wait`, which holds the lock."""
        for status in list(self.statuses):
            body = status.body
            if status.kind == "dicom" and status.acquisition_id == acquisition_id and body["ok"]:
                return str(body["series_folder"])
        return ""

    def run(self) -> None:
        with SctClient(self.endpoint, snapshot_endpoint=self.snapshot) as client:
            while not self.stop.is_set():
                message = client.receive(0.05)
                self.connected.set()
                with self.lock:
                    if isinstance(message, StatusMessage):
                        self.statuses.append(message)
                    elif isinstance(message, SlabMessage):
                        self.slabs.append(message)
                    elif isinstance(message, ConfidenceMessage):
                        self.confidences.append(message)
                    volume = client.pop_volume()
                    if volume is not None:
                        self.volumes.append(volume)
                    self.gaps = client.gap_count

    def wait(self, predicate: Callable[[Listener], bool], timeout_s: float = SERIES_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self):
                    return
            time.sleep(0.05)
        raise AssertionError(
            f"timed out after {timeout_s} s; statuses: {[s.body for s in self.statuses][-5:]}"
        )

    def final_verdict(self, acquisition_id: str) -> StatusMessage | None:
        for status in self.statuses:
            if status.kind == "verdict" and status.acquisition_id == acquisition_id and status.body["final"]:
                return status
        return None

    def final_verdicts(self) -> list[StatusMessage]:
        return [s for s in self.statuses if s.kind == "verdict" and s.body["final"]]


@dataclass
class RunningAgent:
    pipeline: AgentService
    config: AgentConfig
    listener: Listener
    model_dir: Path

    @property
    def export(self) -> Path:
        return self.config.watch.folder

    def metrics_text(self) -> str:
        url = self.pipeline.endpoints.metrics_url
        assert url is not None
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def export_series(self, case: PhantomCase, folder: str, **options: object) -> None:
        export_case(case, ExportOptions(out_dir=self.export / folder, **options))  # type: ignore[arg-type]

    def series_count(self) -> int:
        return len(self.listener.final_verdicts())


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


@contextmanager
def running_agent(config: AgentConfig, model: Path) -> Iterator[RunningAgent]:
    """An agent started in this process with a subscriber connected to it; both stopped at the end."""
    pipeline = AgentService(config)
    pipeline.start()
    listener = Listener(pipeline.endpoints.publish, pipeline.endpoints.snapshot)
    thread = threading.Thread(target=listener.run, name="test-listener")
    thread.start()
    try:
        assert listener.connected.wait(10)
        time.sleep(0.3)  # a SUB socket needs a moment to subscribe (ZeroMQ's slow joiner)
        yield RunningAgent(pipeline, config, listener, model)
    finally:
        listener.stop.set()
        thread.join(10)
        pipeline.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    root = tmp_path_factory.mktemp("agent")
    protocols = write_test_protocol(root / "protocols")
    model = write_test_model(root / "model")
    config = agent_config(root, protocols, model, quiet_period_s=3.0)
    threads_before = set(threading.enumerate())
    with running_agent(config, model) as running:
        yield running
    # pyzmq's zero-copy garbage collector is one thread per process, started by the first copy=False send and
    # ended at exit: it belongs to the library, not to the agent.
    leaked = [
        t
        for t in set(threading.enumerate()) - threads_before
        if t.is_alive() and type(t).__name__ != "GarbageCollectorThread"
    ]
    assert not leaked, f"threads left running after stop: {leaked}"


@pytest.fixture(scope="module")
def passing_case() -> PhantomCase:
    return simulate_case(PASSING_SEED)


def test_passing_series_streams_slabs_and_volume_with_exact_geometry(
    agent: RunningAgent, passing_case: PhantomCase
) -> None:
    before = agent.series_count()
    agent.export_series(passing_case, "pass-classic", rate_files_per_s=200.0)
    agent.listener.wait(lambda listener: len(listener.volumes) >= 1)
    volume = agent.listener.volumes[-1]
    verdict = agent.listener.final_verdict(volume.acquisition_id)
    assert verdict is not None and verdict.body["outcome"] == "pass", verdict
    assert verdict.body["protocol_id"] == TEST_PROTOCOL_ID
    assert agent.series_count() == before + 1

    # Every slab arrived, in order, and they tile the volume the volume message carries.
    n_slices = passing_case.geometry.shape[0]
    expected_slabs = -(-n_slices // SMALL_SLAB_DEPTH)
    assert volume.slab_count == expected_slabs and volume.slabs_received == expected_slabs
    assert volume.complete_from_slabs and volume.matches_volume_message
    slabs = [s for s in agent.listener.slabs if s.acquisition_id == volume.acquisition_id]
    assert [s.slab_index for s in slabs] == list(range(expected_slabs))
    assert agent.listener.gaps == 0

    # Geometry: the MR grid exactly, in DICOM LPS mm.
    np.testing.assert_allclose(volume.geometry.affine, passing_case.geometry.affine, atol=1e-4)
    assert volume.hu.shape == passing_case.geometry.shape
    assert volume.model_id == "sct-lumbar-dual-echo-unet"

    # The streamed sCT equals the model run on the whole volume at once (stitching is exact).
    manifest = ModelManifest.load(agent.model_dir)
    engine = SctEngine.load(manifest, backend="torch-eager", in_plane=passing_case.geometry.shape[1:])
    try:
        expected = engine.infer_volume(passing_case.echoes)
    finally:
        engine.close()
    assert np.max(np.abs(volume.hu.astype(np.float32) - expected)) <= 0.5 + 1e-3

    # And it is a CT: bone is bright, air is air (MAE against the phantom's CT in the body, a loose bound).
    body = passing_case.ct_hu > -500
    assert float(np.mean(np.abs(volume.hu[body] - passing_case.ct_hu[body]))) < 80.0

    # A robot that connects only now gets the same volume, byte for byte, from the snapshot.
    endpoints = agent.pipeline.endpoints
    with SctClient(endpoints.publish, snapshot_endpoint=endpoints.snapshot) as late:
        deadline = time.monotonic() + 30.0
        replayed = None
        while replayed is None and time.monotonic() < deadline:
            late.receive(0.1)
            replayed = next(
                (v for v in late.completed_volumes if v.acquisition_id == volume.acquisition_id), None
            )
    assert replayed is not None and replayed.from_snapshot
    assert replayed.sha256 == volume.sha256 and replayed.hu.tobytes() == volume.hu.tobytes()
    assert np.array_equal(replayed.geometry.affine, volume.geometry.affine)

    # The sCT DICOM series: one CT file per slice in the MR's study and frame of reference, HU as streamed.
    folder = agent.config.dicom.folder
    assert folder is not None
    agent.listener.wait(lambda listener: bool(listener.dicom_written(volume.acquisition_id)))
    series_folder = folder / agent.listener.dicom_written(volume.acquisition_id)
    files = sorted(series_folder.glob("*.dcm"))
    assert len(files) == n_slices
    mr = pydicom.dcmread(
        next((agent.config.watch.folder / "pass-classic").rglob("*.dcm")), stop_before_pixels=True
    )
    datasets = [pydicom.dcmread(f) for f in files]
    first = datasets[0]
    assert first.Modality == "CT" and list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (first.StudyInstanceUID, first.FrameOfReferenceUID) == (
        mr.StudyInstanceUID,
        mr.FrameOfReferenceUID,
    )
    assert first.SeriesInstanceUID != mr.SeriesInstanceUID
    assert "SYNTHETIC" in first.SeriesDescription
    stacked = np.stack(
        [ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept) for ds in datasets]
    )
    assert np.array_equal(stacked, volume.hu.astype(np.int32))


def test_verdict_comes_from_the_first_images_and_latencies_are_recorded(agent: RunningAgent) -> None:
    verdicts = [s for s in agent.listener.statuses if s.kind == "verdict"]
    assert verdicts, "no verdict published"
    first = verdicts[0]
    assert first.body["final"] is False, "the first verdict must be provisional (from the first images)"
    assert first.body["first_image_to_verdict_s"] is not None
    assert first.body["first_image_to_verdict_s"] < 5.0
    text = agent.metrics_text()
    assert metric(text, "sct_agent_first_image_to_verdict_seconds_count") >= 1
    assert metric(text, "sct_agent_last_file_to_completion_seconds_count") >= 1


REJECTIONS = [
    pytest.param(("EchoTime2=4.8",), None, {}, "reject", "EchoTime2", id="te2-4.8ms"),
    pytest.param(("MRAcquisitionType=2D",), None, {}, "reject", "MRAcquisitionType", id="2d"),
    pytest.param((), 1, {}, "reject", "EchoCount", id="one-echo"),
    pytest.param(("PixelBandwidth=300",), None, {}, "reject", "PixelBandwidth", id="bandwidth-300"),
    pytest.param((), None, {"drop_slices": (20, 21)}, "incomplete", None, id="missing-slices"),
]


@pytest.mark.parametrize(("settings", "echoes", "options", "outcome", "attribute"), REJECTIONS)
def test_deviating_series_is_refused_with_reasons_and_not_inferred(
    agent: RunningAgent,
    settings: tuple[str, ...],
    echoes: int | None,
    options: dict[str, object],
    outcome: str,
    attribute: str | None,
) -> None:
    seen = {s.acquisition_id for s in agent.listener.final_verdicts()}
    case = simulate_case(PASSING_SEED + 1, *settings, echoes=echoes)
    agent.export_series(case, f"dev-{outcome}-{attribute}-{len(seen)}", **options)
    agent.listener.wait(lambda listener: any(s.acquisition_id not in seen for s in listener.final_verdicts()))
    verdict = next(s for s in agent.listener.final_verdicts() if s.acquisition_id not in seen)
    assert verdict.body["outcome"] == outcome, verdict.body
    reasons = verdict.body["reasons"]
    assert reasons, "a refused series must say why"
    if attribute is not None:
        named = [r for r in reasons if r["attribute"] == attribute]
        assert named, reasons
        reason = named[0]
        assert reason["found"] and reason["required"]
        assert TEST_PROTOCOL_ID in reason["text"]
    else:
        assert any(r["category"] == "completeness" for r in reasons), reasons
    acquisition = verdict.acquisition_id
    time.sleep(0.5)
    assert not [s for s in agent.listener.slabs if s.acquisition_id == acquisition], (
        "a refused series was inferred"
    )


def test_te2_deviation_is_rejected_from_its_first_echo2_image(agent: RunningAgent) -> None:
    """The technologist hears about TE2 before the series is complete: a provisional reject."""
    seen = {s.acquisition_id for s in agent.listener.statuses if s.kind == "verdict"}
    case = simulate_case(PASSING_SEED + 2, "EchoTime2=4.8")
    agent.export_series(case, "dev-provisional", rate_files_per_s=40.0)
    agent.listener.wait(
        lambda listener: any(
            s.kind == "verdict" and s.acquisition_id not in seen and s.body["outcome"] == "reject"
            for s in listener.statuses
        )
    )
    first_reject = next(
        s
        for s in agent.listener.statuses
        if s.kind == "verdict" and s.acquisition_id not in seen and s.body["outcome"] == "reject"
    )
    assert first_reject.body["final"] is False
    assert first_reject.body["slices_per_echo"][0] < case.geometry.shape[0]
    agent.listener.wait(
        lambda listener: listener.final_verdict(first_reject.acquisition_id or "") is not None
    )


def test_the_console_series_and_images_received_reach_the_wire_and_listen(
    agent: RunningAgent, tmp_path: Path
) -> None:
    """SeriesNumber and SeriesDescription name the console series in verdicts and ``received`` counts (schema
    1.3), which a real ``sct-agent listen`` process prints; the reference client takes them without complaint."""
    seen = {s.acquisition_id for s in agent.listener.statuses}
    endpoints = agent.pipeline.endpoints
    listen = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "listen", "--endpoint", endpoints.publish, "--snapshot",
         endpoints.snapshot, "--out", str(tmp_path), "--timeout", str(SERIES_TIMEOUT_S)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert listen.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(listen.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + SERIES_TIMEOUT_S
        while not any(" publisher " in line for line in lines):  # subscribed: it has heard a heartbeat
            assert time.monotonic() < deadline and listen.poll() is None, lines
            time.sleep(0.05)
        case = simulate_case(PASSING_SEED + 3, "EchoTime2=4.8")
        agent.export_series(case, "console-series", rate_files_per_s=100.0)
        agent.listener.wait(
            lambda listener: any(v.acquisition_id not in seen for v in listener.final_verdicts())
        )
        verdict = next(v for v in agent.listener.final_verdicts() if v.acquisition_id not in seen)
        acquisition = verdict.acquisition_id
        agent.listener.wait(
            lambda listener: any(s.kind == "received" and s.acquisition_id == acquisition and s.body["ended"]
                                 for s in listener.statuses)
        )  # fmt: skip
        while not any(f"received {acquisition}" in line and "ended" in line for line in lines):
            assert time.monotonic() < deadline and listen.poll() is None, lines
            time.sleep(0.05)
    finally:
        listen.send_signal(signal.SIGINT)
        status = listen.wait(10)
        reader.join(10)
        listen.stdout.close()
    assert status == 130

    name = siemens_protocol_name(case.acquisition)
    images = case.geometry.shape[0] * len(case.acquisition.echo_times_ms)
    assert verdict.schema == "sct-edge/1.4"
    assert (verdict.body["series_number"], verdict.body["series_description"]) == (
        SIEMENS_SERIES_NUMBER,
        name,
    )
    received = [
        s for s in agent.listener.statuses if s.kind == "received" and s.acquisition_id == acquisition
    ]
    counts = [s.body["images_received"] for s in received]
    assert len(received) >= 2 and counts == sorted(counts), counts
    assert all((s.body["series_number"], s.body["series_description"]) == (SIEMENS_SERIES_NUMBER, name)
               for s in received)  # fmt: skip
    assert [s.body["ended"] for s in received] == [False] * (len(received) - 1) + [True]
    assert received[-1].body["images_received"] == received[-1].body["images_expected"] == images
    assert agent.listener.gaps == 0

    label = f"series {SIEMENS_SERIES_NUMBER} {name!r}"
    assert any(f"verdict {acquisition} {label}: REJECT (final" in line for line in lines), lines
    assert any(f"received {acquisition} {label}: {images}/{images} images, ended (count)" in line
               for line in lines), lines  # fmt: skip
    assert not any("rejected a message" in line for line in lines), lines


def test_every_header_a_running_agent_sends_fits_the_protocol_schema(agent: RunningAgent) -> None:
    """docs/protocol/schema, strictly (no field the document does not name): every broadcast header of a passing
    series (verdicts, received counts, progress, DICOM outcomes, slabs, the volume, heartbeats) and a snapshot
    reply, read from raw ZeroMQ sockets as a vendor's client would."""
    check = validator(strict=True)
    endpoints = agent.pipeline.endpoints
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    headers: list[dict[str, object]] = []
    with context.socket(zmq.SUB) as sub:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoints.publish)
        assert sub.poll(10_000), "no heartbeat within 10 s"
        seen = {s.acquisition_id for s in agent.listener.final_verdicts()}
        case = simulate_case(PASSING_SEED + 4)
        agent.export_series(case, "schema-pass", rate_files_per_s=200.0)
        deadline = time.monotonic() + SERIES_TIMEOUT_S
        acquisition = None
        while time.monotonic() < deadline:
            if not sub.poll(100):
                continue
            topic, header, _ = sub.recv_multipart()
            fields = json.loads(header)
            headers.append(fields)
            if (
                fields["topic"] == "status"
                and fields["acquisition_id"] not in seen
                and fields["kind"] == "received"
            ):
                acquisition = fields["acquisition_id"]
            if (
                fields["topic"] == "status"
                and fields["kind"] == "dicom"
                and fields["acquisition_id"] == acquisition
            ):
                break
        assert acquisition is not None, "no received status for the series"
    with context.socket(zmq.DEALER) as dealer:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoints.snapshot)
        dealer.send_multipart(encode_snapshot_request(time.time(), reason="application"))
        while True:
            assert dealer.poll(10_000), "snapshot reply stalled"
            topic, header, _ = dealer.recv_multipart()
            headers.append(json.loads(header))
            if topic not in {b"sct.slab", b"sct.volume", b"confidence"}:
                break
    failures = {
        f"{h['topic']}/{h.get('kind', '')}": schema_errors(check, h)
        for h in headers
        if schema_errors(check, h)
    }
    assert not failures, failures
    sent = {f"{h['topic']}/{h.get('kind', '')}" for h in headers}
    assert {"heartbeat/", "sct.slab/", "sct.volume/", "snapshot.end/", "status/verdict", "status/received",
            "status/progress", "status/dicom", "status/flagged"} <= sent, sent  # fmt: skip
    if ModelManifest.load(agent.model_dir).confidence is not None:
        assert "confidence/" in sent, sent


def test_agent_goes_on_after_bad_files_and_processes_an_enhanced_series(
    agent: RunningAgent, passing_case: PhantomCase
) -> None:
    junk = agent.export / "junk"
    junk.mkdir()
    # Not DICOM at all (skipped), and a DICOM preamble followed by garbage (bad).
    (junk / "notes.txt").write_text("not DICOM")
    (junk / "garbage.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    volumes = len(agent.listener.volumes)
    agent.export_series(passing_case, "pass-enhanced", format=OutputFormat.ENHANCED)
    agent.listener.wait(lambda listener: len(listener.volumes) > volumes)
    volume = agent.listener.volumes[-1]
    assert volume.complete_from_slabs
    np.testing.assert_allclose(volume.geometry.affine, passing_case.geometry.affine, atol=1e-4)
    text = agent.metrics_text()
    assert metric(text, 'sct_agent_files_total{outcome="bad"}') >= 1
    assert metric(text, 'sct_agent_files_total{outcome="skipped"}') >= 1
    assert agent.pipeline.healthy()


def test_real_vendor_exports_get_their_verdicts_while_the_agent_goes_on(
    agent: RunningAgent, passing_case: PhantomCase
) -> None:
    """Real scanner files (../shared/dicom) dropped into the export folder: a Philips series whose classic,
    Enhanced and Raw Data objects share one series UID, a Siemens XA export that splits the echoes into two
    series, and a partial Siemens TSE. Each acquisition gets a final verdict with its structural reason, none
    reaches the engine, and a good series after them still streams."""
    root = shared_dicom()
    folders = (
        PHILIPS_CLASSIC,
        PHILIPS_ENHANCED,
        PHILIPS_RAW,
        SIEMENS_SPLIT_ECHO1,
        SIEMENS_SPLIT_ECHO2,
        TSE_PARTIAL,
    )
    ids = {
        tuple(sorted(str(f) for f in a.folders)): a.view.acquisition_id
        for a in check.check_path(root, []).acquisitions
        if set(str(f) for f in a.folders) <= set(folders)
    }
    assert len(ids) == 4
    volumes = len(agent.listener.volumes)
    for folder in folders:
        shutil.copytree(root / folder, agent.export / "real" / folder)
    agent.listener.wait(lambda listener: all(listener.final_verdict(a) is not None for a in ids.values()))
    verdicts = {key: agent.listener.final_verdict(value) for key, value in ids.items()}
    reasons = {
        key: {r["attribute"] for r in v.body["reasons"]} for key, v in verdicts.items() if v is not None
    }
    assert all(v is not None and v.body["outcome"] == "reject" for v in verdicts.values())
    assert "ScanningSequence" in reasons[(TSE_PARTIAL,)] and "SlicesPerEcho" in reasons[(TSE_PARTIAL,)]
    assert "MRAcquisitionType" in reasons[(SIEMENS_SPLIT_ECHO1, SIEMENS_SPLIT_ECHO2)]
    split = verdicts[(SIEMENS_SPLIT_ECHO1, SIEMENS_SPLIT_ECHO2)]
    assert split is not None and split.body["echo_times_ms"] == [10.0, 12.46]
    for philips in ((PHILIPS_CLASSIC,), (PHILIPS_ENHANCED,)):
        verdict = verdicts[philips]
        assert verdict is not None and verdict.body["slices_per_echo"] == [53, 53]
        assert "EchoTime1" in reasons[philips] and "EchoCount" not in reasons[philips]
    assert len(agent.listener.volumes) == volumes
    agent.export_series(passing_case, "pass-after-real", rate_files_per_s=400.0)
    agent.listener.wait(lambda listener: len(listener.volumes) > volumes)
    assert agent.pipeline.healthy()


def test_metrics_are_served_and_pass_promtool(agent: RunningAgent) -> None:
    text = agent.metrics_text()
    assert metric(text, "sct_agent_ready") == 1
    assert metric(text, "sct_agent_volumes_published_total") >= 1
    assert metric(text, "sct_agent_slabs_inferred_total") >= 3
    assert metric(text, 'sct_agent_acquisitions_total{outcome="reject"}') >= 1
    assert metric(text, "sct_agent_last_image_to_volume_seconds_count") >= 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_second_agent_gets_its_sct_from_a_triton_server_with_the_same_bytes(
    tmp_path: Path, passing_case: PhantomCase
) -> None:
    """The scale-out path end to end: ``sct-agent serve`` in its own process and environment, an agent whose
    engine is the ``triton`` backend, and a subscriber that receives exactly what local inference gives."""
    protocols = write_test_protocol(tmp_path / "protocols")
    model = write_test_model(tmp_path / "model")
    serve_arguments = (
        "--model",
        str(model),
        "--backend",
        "torch-eager",
        "--slab-depth",
        str(SMALL_SLAB_DEPTH),
    )
    rows, cols = passing_case.geometry.shape[1:]
    with served(tmp_path / "serve", *serve_arguments, "--matrix", f"{rows}x{cols}") as server:
        base = agent_config(tmp_path, protocols, model, quiet_period_s=3.0)
        config = replace(
            base, engine=replace(base.engine, backend="triton"), triton=TritonConfig(url=server.url)
        )
        with running_agent(config, model) as agent:
            agent.export_series(passing_case, "pass-remote", rate_files_per_s=200.0)
            agent.listener.wait(lambda listener: len(listener.volumes) >= 1)
            volume = agent.listener.volumes[-1]
            text = agent.metrics_text()

            # The server dies; the next series fails with a status that says why, and the agent goes on.
            server.kill()
            agent.export_series(simulate_case(PASSING_SEED + 7), "after-server-died", rate_files_per_s=200.0)
            agent.listener.wait(
                lambda listener: any(
                    s.kind == "error" and s.body.get("stage") == "engine" for s in listener.statuses
                )
            )
            error = next(s for s in agent.listener.statuses if s.kind == "error")
            agent.listener.wait(
                lambda listener: any(
                    s.kind == "cancelled" and s.acquisition_id == error.acquisition_id
                    for s in listener.statuses
                )
            )
            after = agent.metrics_text()
            assert len(agent.listener.volumes) == 1
    assert "engine triton" in error.body["message"] and "unavailable" in error.body["message"]
    assert server.url in error.body["message"]
    assert metric(after, 'sct_agent_engine_failures_total{cause="remote"}') == 1
    assert metric(after, "sct_agent_remote_server_up") == 0
    verdict = agent.listener.final_verdict(volume.acquisition_id)
    assert verdict is not None and verdict.body["outcome"] == "pass"
    assert volume.complete_from_slabs and volume.matches_volume_message and agent.listener.gaps == 0

    engine = SctEngine.load(
        ModelManifest.load(model), backend="torch-eager", in_plane=(rows, cols), slab_depth=SMALL_SLAB_DEPTH
    )
    try:
        local = np.round(engine.infer_volume(passing_case.echoes)).astype(np.int16)
    finally:
        engine.close()
    assert volume.hu.tobytes() == local.tobytes()

    # Hospital IT sees the remote engine and its calls: the identity probe, the warm-up and one call per slab.
    assert metric(text, 'sct_agent_remote_inference_calls_total{outcome="ok"}') >= 2 + volume.slab_count
    assert metric(text, 'sct_agent_remote_inference_calls_total{outcome="unavailable"}') == 0
    assert metric(text, "sct_agent_remote_server_up") == 1
    assert metric(text, "sct_agent_remote_fallback_windows_total") == 0
    assert f'device="triton://{server.url}"' in text and 'backend="triton"' in text
