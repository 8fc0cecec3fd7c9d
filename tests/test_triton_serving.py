"""Many scanners, one GPU pool: the ``triton`` backend against a real Triton server started by ``sct-agent serve``.

The server runs in its own process from the serve environment (tests/triton_support.py), on loopback, with the
eager CPU engine; the agent side is the real ``triton`` backend over gRPC. What must hold across the network:
stitched sCT equal to the local engine's, a server with other weights refused with both named, a token and TLS
that are really required, and a server killed mid-series that gives the configured behaviour (the window fails
after the configured attempts, or the local fallback computes it) without hanging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from agent_support import SMALL_FOV_MM, SMALL_SLAB_DEPTH
from test_status_page_access import make_certificate
from triton_support import RunningServer, free_ports, served
from tritonclient.utils import InferenceServerException

from agent.inference.engine_stage import failure_cause
from agent.ops.config import AgentConfig, EngineConfig, TritonConfig
from agent.ops.metrics import ENGINE_FAILURE_CAUSES, REMOTE_OUTCOMES
from agent.ops.preflight import Status, check_engine
from engines.backends.base import BackendOptions, Precision
from engines.backends.remote_link import RemoteInferenceError, RemoteLink, RemoteLinkError, RemoteOutcome
from engines.backends.triton_client import TritonBackend, classify
from engines.inference.engine import SctEngine
from engines.model.manifest import DEFAULT_MODEL_DIR, ModelManifest, default_manifest
from engines.phantom.generate import generate_case
from engines.scanner.export import SimulationRequest
from engines.serving.contract import (
    GRPC_TOKEN_HEADER,
    WINDOW_INPUT,
    ServedIdentity,
    ServedModelMismatchError,
    served_model_name,
)
from engines.serving.triton_server import ServeConfigError, ServeSettings, serve_environment_problem
from engines.serving.window_runner import WindowRunner, WindowShapeError

#: The served model's id and version.
IDENTITY = (default_manifest().model_id, default_manifest().version)
#: The small phantom's in-plane matrix (SMALL_FOV_MM at 0.74 mm): windows of 2 x 48 x 168 x 168.
MATRIX = "162x162"
SERVE_ARGS = ("--backend", "torch-eager", "--slab-depth", str(SMALL_SLAB_DEPTH), "--matrix", MATRIX)


@dataclass
class Recorder:
    """The agent's metrics as the backend sees them (engines.backends.remote_link.RemoteCallObserver)."""

    calls: list[tuple[str, float]] = field(default_factory=list)
    fallbacks: int = 0
    connected: list[bool] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def remote_call(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.calls.append((outcome, seconds))

    def remote_fallback(self) -> None:
        self.fallbacks += 1

    def remote_connected(self, up: bool) -> None:
        self.connected.append(up)

    def outcomes(self) -> list[str]:
        return [outcome for outcome, _ in self.calls]


@pytest.fixture(scope="module")
def echoes() -> np.ndarray:
    request = SimulationRequest(seed=900211, settings=(), echoes=None, fov_mm=SMALL_FOV_MM, supersample=1)
    return generate_case(900211, request.acquisition(), supersample=1).echoes


@pytest.fixture(scope="module")
def local_hu(echoes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    engine = SctEngine.load(backend="torch-eager", in_plane=echoes.shape[-2:], slab_depth=SMALL_SLAB_DEPTH)
    try:
        return engine.infer_volume_with_confidence(echoes)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with served(tmp_path_factory.mktemp("serve"), *SERVE_ARGS) as running:
        yield running


def remote_engine(
    link: RemoteLink, in_plane: tuple[int, int], manifest: ModelManifest | None = None
) -> SctEngine:
    return SctEngine.load(
        manifest,
        backend="triton",
        options=BackendOptions(remote=link),
        in_plane=in_plane,
        slab_depth=SMALL_SLAB_DEPTH,
    )


def test_stitched_sct_through_triton_equals_the_local_engine(
    server: RunningServer, echoes: np.ndarray, local_hu: tuple[np.ndarray, np.ndarray]
) -> None:
    recorder = Recorder()
    engine = remote_engine(
        RemoteLink(url=server.url, observer=recorder), (echoes.shape[-2], echoes.shape[-1])
    )
    try:
        hu, confidence = engine.infer_volume_with_confidence(echoes)
        info = engine.info
    finally:
        engine.close()
    expected_hu, expected_confidence = local_hu
    assert float(np.max(np.abs(hu - expected_hu))) <= 1.0
    assert np.array_equal(np.round(hu).astype(np.int16), np.round(expected_hu).astype(np.int16))
    assert np.array_equal(confidence, expected_confidence)
    # Identity probe, warm-up window, then one call per slab window; all answered.
    windows = -(-echoes.shape[1] // SMALL_SLAB_DEPTH)
    assert recorder.outcomes() == ["ok"] * (2 + windows)
    assert recorder.connected == [True, False]  # connected once; closed with the engine
    assert info.backend == "triton" and info.device == f"triton://{server.url}"
    assert info.details["engine"] == "torch-eager fp32 on cpu"
    assert info.details["served_model"] == served_model_name(info.model_id, info.model_version)


def test_a_server_with_other_weights_is_refused_naming_both(server: RunningServer, tmp_path: Path) -> None:
    # The agent's model: the shipped network with one weight changed, so its manifest hash differs.
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    manifest_path = folder / "manifest.json"
    data = json.loads(manifest_path.read_text())
    weights = torch.load(folder / data["weights"]["file"], weights_only=True)
    first = next(iter(weights))
    weights[first] = weights[first] + 1e-3
    torch.save(weights, folder / data["weights"]["file"])
    data["weights"]["sha256"] = hashlib.sha256((folder / data["weights"]["file"]).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(data, indent=2))
    ours = ModelManifest.load(folder)
    served_sha = default_manifest().weights_sha256

    recorder = Recorder()
    with pytest.raises(ServedModelMismatchError) as refused:
        remote_engine(RemoteLink(url=server.url, observer=recorder), (162, 162), ours)
    message = str(refused.value)
    assert f"weights_sha256: server {served_sha!r}, manifest {ours.weights_sha256!r}" in message
    assert server.url in message and "refusing" in message
    assert refused.value.attribute == "triton.model"
    assert "mismatch" in recorder.outcomes() and recorder.connected == []


def test_a_server_on_another_port_is_told_apart_from_a_slow_one() -> None:
    assert (
        classify("StatusCode.UNAVAILABLE", "failed to connect to all addresses") is RemoteOutcome.UNAVAILABLE
    )
    assert classify("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded") is RemoteOutcome.TIMEOUT
    assert classify("StatusCode.UNAVAILABLE", "Exceeds maximum queue size") is RemoteOutcome.CAPACITY
    assert (
        classify("StatusCode.UNAVAILABLE", "This protocol is restricted, expecting header 'triton-grpc-…'")
        is RemoteOutcome.REFUSED
    )
    assert (
        classify("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found")
        is RemoteOutcome.UNAVAILABLE
    )
    assert classify("StatusCode.INVALID_ARGUMENT", "unexpected shape") is RemoteOutcome.REFUSED
    assert classify("StatusCode.INTERNAL", "boom") is RemoteOutcome.ERROR


def test_token_and_tls_are_required_and_a_server_killed_mid_series_fails_or_falls_back(
    tmp_path: Path, echoes: np.ndarray, local_hu: tuple[np.ndarray, np.ndarray]
) -> None:
    certificate, key = make_certificate(tmp_path, "serve")
    token = tmp_path / "token"
    token.write_text("a-long-random-token\n")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    in_plane = (echoes.shape[-2], echoes.shape[-1])
    arguments = (
        *SERVE_ARGS,
        "--tls-cert",
        str(certificate),
        "--tls-key",
        str(key),
        "--token-file",
        str(token),
        # One window computing and one waiting at most: a third agent's window is refused at once.
        "--max-batch",
        "1",
        "--max-queue",
        "1",
    )
    with served(tmp_path / "serve", *arguments, ssl_ca=certificate) as server:
        assert_full_queue_refuses_at_once(server.url, certificate, token.read_text().strip())
        # Without the token, or with another one: refused at start, at once, and not retried.
        for token_file in (None, wrong):
            recorder = Recorder()
            started = time.monotonic()
            with pytest.raises(RemoteInferenceError) as refused:
                remote_engine(
                    RemoteLink(
                        url=server.url, tls_ca_file=certificate, token_file=token_file, observer=recorder
                    ),
                    in_plane,
                )
            assert refused.value.outcome is RemoteOutcome.REFUSED, refused.value
            assert recorder.outcomes() == ["refused"] and time.monotonic() - started < 10
        # Plaintext against the TLS endpoint does not get through either.
        with pytest.raises(RemoteInferenceError):
            engine = remote_engine(
                RemoteLink(url=server.url, token_file=token, attempts=1, timeout_s=5), in_plane
            )
            engine.infer_volume(echoes)

        link = partial(
            RemoteLink,
            url=server.url,
            tls_ca_file=certificate,
            token_file=token,
            attempts=2,
            backoff_s=0.2,
            timeout_s=30,
        )
        failing, falling_back = Recorder(), Recorder()
        plain = remote_engine(link(observer=failing), in_plane)
        with_fallback = remote_engine(
            link(fallback="torch-eager", retry_s=600.0, max_retry_s=600.0, observer=falling_back), in_plane
        )
        try:
            expected_hu, _ = local_hu
            first = plain.infer_volume(echoes)
            assert np.array_equal(np.round(first), np.round(expected_hu))

            server.kill()  # mid-series for both engines: the next windows find no server

            started = time.monotonic()
            with pytest.raises(RemoteInferenceError) as failed:
                plain.infer_volume(echoes)
            assert failed.value.outcome is RemoteOutcome.UNAVAILABLE
            assert "after 2 attempts" in str(failed.value) and server.url in str(failed.value)
            assert time.monotonic() - started < 30, "a dead server must not hold the series for long"
            assert (
                failing.outcomes()[-2:] == ["unavailable", "unavailable"] and failing.connected[-1] is False
            )

            hu = with_fallback.infer_volume(echoes)
            assert np.array_equal(np.round(hu), np.round(expected_hu))
            windows = -(-echoes.shape[1] // SMALL_SLAB_DEPTH)
            assert falling_back.fallbacks == windows
            # The first failed window tried the server (twice); the next ones wait retry_s without calling it.
            assert falling_back.outcomes().count("unavailable") == 2
        finally:
            plain.close()
            with_fallback.close()

    # A server down when the agent starts: the engine loads (warning) and each window fails clearly.
    recorder = Recorder()
    down = remote_engine(RemoteLink(url=server.url, attempts=1, observer=recorder), in_plane)
    try:
        with pytest.raises(RemoteInferenceError) as failed:
            down.infer_volume(echoes)
        assert failed.value.outcome is RemoteOutcome.UNAVAILABLE
    finally:
        down.close()


def assert_full_queue_refuses_at_once(url: str, certificate: Path, token: str) -> None:
    """Four windows at once against a server that computes one and queues one: the others are refused at once,
    as "capacity", which the link retries with backoff."""
    window = np.zeros((1, 2, 48, 168, 168), dtype=np.float32)
    outcomes: list[str] = []

    def send() -> None:
        client = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(certificate))
        request = grpcclient.InferInput(WINDOW_INPUT, list(window.shape), "FP32")
        request.set_data_from_numpy(window)
        try:
            client.infer(served_model_name(*IDENTITY[:2]), [request], headers={GRPC_TOKEN_HEADER: token})
            outcomes.append("ok")
        except InferenceServerException as exc:
            outcomes.append(classify(str(exc.status()), str(exc.message())).value)
        finally:
            client.close()

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcomes.count("capacity") >= 1 and outcomes.count("ok") >= 1, outcomes
    assert set(outcomes) <= {"ok", "capacity"}, outcomes


def test_a_slow_server_times_out_and_the_window_fails_after_its_attempts(
    server: RunningServer, echoes: np.ndarray
) -> None:
    recorder = Recorder()
    link = RemoteLink(url=server.url, timeout_s=0.05, attempts=2, backoff_s=0.1, observer=recorder)
    engine = remote_engine(link, (echoes.shape[-2], echoes.shape[-1]))  # its warm-up times out: a warning
    try:
        with pytest.raises(RemoteInferenceError) as failed:
            engine.infer_volume(echoes)
    finally:
        engine.close()
    assert failed.value.outcome is RemoteOutcome.TIMEOUT and "after 2 attempts" in str(failed.value)
    assert recorder.outcomes().count("timeout") >= 3  # warm-up, then both attempts of the first window


def test_link_settings_that_cannot_work_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(RemoteLinkError, match=r"triton\.url: found 'gpu-1', expected host:port"):
        RemoteLink(url="gpu-1")
    with pytest.raises(RemoteLinkError, match=r"triton\.attempts"):
        RemoteLink(url="gpu-1:8001", attempts=0)
    with pytest.raises(RemoteLinkError, match="both"):
        RemoteLink(url="gpu-1:8001", tls_ca_file=tmp_path / "ca", tls_cert_file=tmp_path / "c")
    with pytest.raises(RemoteLinkError, match=r"triton\.token_file"):
        RemoteLink(url="gpu-1:8001", token_file=tmp_path / "missing").token()


def test_serve_refuses_to_serve_other_hosts_in_the_clear(tmp_path: Path) -> None:
    manifest = default_manifest()
    with pytest.raises(ServeConfigError, match=r"serve\.address: found '0\.0\.0\.0'.*TLS"):
        ServeSettings(manifest, address="0.0.0.0").check()
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    with pytest.raises(ServeConfigError, match=r"serve\.token_file"):
        ServeSettings(manifest, address="10.1.2.3", tls_cert_file=cert, tls_key_file=key).check()
    ServeSettings(
        manifest, address="10.1.2.3", tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=cert
    ).check()
    ServeSettings(manifest, address="0.0.0.0", insecure=True).check()
    ServeSettings(manifest).check()
    with pytest.raises(ServeConfigError, match="three different ports"):
        ServeSettings(manifest, grpc_port=9000, metrics_port=9000).check()


def test_serve_in_an_environment_without_pytriton_says_how_to_get_one() -> None:
    # The agent's own environment has no PyTriton (it lives in the serve environment): refused, not a traceback.
    problem = serve_environment_problem()
    assert problem is not None and "sct-edge-agent[serve]" in problem
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2 and problem in result.stderr


def test_identity_names_every_difference_and_ignores_the_engine() -> None:
    ours = ServedIdentity.of(default_manifest())
    theirs = ServedIdentity(
        ours.model_id,
        "2.0.0",
        "f" * 64,
        ours.confidence_sha256,
        ours.outputs,
        engine="tensorrt fp16 on cuda:0",
    )
    assert theirs.differences(ours) == [
        f"model_version: server '2.0.0', manifest {ours.model_version!r}",
        f"weights_sha256: server {'f' * 64!r}, manifest {ours.weights_sha256!r}",
    ]
    same_model = ServedIdentity(**{**json.loads(ours.to_json()), "engine": "torch-cuda fp16 on cuda:0"})
    same_model.check(ours, "gpu-1:8001")
    with pytest.raises(ServedModelMismatchError, match="served model identity"):
        ServedIdentity.from_json(b"<html>")


def test_the_window_runner_refuses_shapes_the_network_cannot_take_and_batches_exactly() -> None:
    manifest = default_manifest()
    runner = WindowRunner(manifest, "torch-eager", BackendOptions(), max_shapes=1)
    try:
        for shape in ((3, 48, 64, 64), (2, 48, 60, 64), (2, 512, 512, 512)):
            with pytest.raises(WindowShapeError, match="window shape"):
                runner.check(shape)
        rng = np.random.default_rng(1)
        windows = rng.random((2, 2, 40, 32, 32), dtype=np.float32)
        batch = runner.run(windows)
        alone = runner.run(windows[1:])
        assert batch.shape == (2, manifest.network_outputs, 40, 32, 32)
        assert np.array_equal(batch[1], alone[0])
        runner.run(rng.random((1, 2, 40, 32, 40), dtype=np.float32))
        assert runner.shapes == [(2, 40, 32, 40)]  # the least recently used engine was closed
    finally:
        runner.close()


def test_doctor_says_whether_the_server_answers_with_the_manifests_model(server: RunningServer) -> None:
    manifest = default_manifest()
    config = dataclasses.replace(
        AgentConfig(), engine=EngineConfig(backend="triton"), triton=TritonConfig(url=server.url)
    )
    check = check_engine(config, manifest)
    assert check.status is Status.OK and check.attribute == "triton.url", check
    assert manifest.weights_sha256[:16] in check.message and "torch-eager fp32 on cpu" in check.message

    (port,) = free_ports(1)
    nobody = dataclasses.replace(config, triton=TritonConfig(url=f"127.0.0.1:{port}", fallback="torch-eager"))
    check = check_engine(nobody, manifest)
    assert check.status is Status.WARN and "unavailable" in check.message, check
    assert "the local 'torch-eager' fallback computes" in check.message


def test_the_metric_labels_are_the_links_outcomes_and_a_remote_failure_has_its_cause() -> None:
    assert tuple(outcome.value for outcome in RemoteOutcome) == REMOTE_OUTCOMES
    error = RemoteInferenceError("down", outcome=RemoteOutcome.UNAVAILABLE, server="gpu-1:8001")
    mismatch = ServedModelMismatchError("other weights", found="{}", expected="{}")
    assert failure_cause(error) == failure_cause(mismatch) == "remote"
    assert "remote" in ENGINE_FAILURE_CAUSES


def test_windows_through_shared_memory_give_the_same_sct_and_leave_no_region_behind(
    server: RunningServer, echoes: np.ndarray, local_hu: tuple[np.ndarray, np.ndarray]
) -> None:
    mine = f"sct-{os.getpid()}-"
    before = {p.name for p in Path("/dev/shm").glob(f"{mine}*")}
    engine = remote_engine(
        RemoteLink(url=server.url, shared_memory=True), (echoes.shape[-2], echoes.shape[-1])
    )
    try:
        regions = {p for p in Path("/dev/shm").glob(f"{mine}*") if p.name not in before}
        assert len(regions) == 2 and all(p.stat().st_mode & 0o777 == 0o660 for p in regions)
        hu, confidence = engine.infer_volume_with_confidence(echoes)
        assert engine.info.details["shared_memory"] is True
    finally:
        engine.close()
    expected_hu, expected_confidence = local_hu
    assert np.array_equal(np.round(hu), np.round(expected_hu)) and np.array_equal(
        confidence, expected_confidence
    )
    assert {p.name for p in Path("/dev/shm").glob(f"{mine}*")} == before


def test_tritons_own_metrics_are_served_beside_ours_and_pass_promtool(server: RunningServer) -> None:
    # After the other tests of this module, the served model has answered requests.
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    name = served_model_name(default_manifest().model_id, default_manifest().version)
    success = [line for line in text.splitlines() if line.startswith("nv_inference_request_success{")]
    assert any(f'model="{name}"' in line for line in success), text[:2000]
    assert "nv_inference_queue_duration_us" in text and "nv_inference_exec_count" in text
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian: prometheus; .ci/run installs it)")
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line.lower()]
    assert not errors, errors


def test_the_link_goes_back_to_a_server_that_restarted(
    tmp_path: Path, echoes: np.ndarray, local_hu: tuple[np.ndarray, np.ndarray]
) -> None:
    in_plane = (echoes.shape[-2], echoes.shape[-1])
    expected = np.round(local_hu[0])
    windows = -(-echoes.shape[1] // SMALL_SLAB_DEPTH)
    with served(tmp_path / "first", *SERVE_ARGS) as first:
        ports = first.ports
        falling_back, failing = Recorder(), Recorder()
        link = partial(RemoteLink, url=first.url, attempts=1, retry_s=0.5, max_retry_s=0.5)
        with_fallback = remote_engine(link(fallback="torch-eager", observer=falling_back), in_plane)
        plain = remote_engine(link(observer=failing), in_plane)
        first.kill()
    try:
        assert np.array_equal(np.round(with_fallback.infer_volume(echoes)), expected)
        assert falling_back.fallbacks == windows
        with pytest.raises(RemoteInferenceError):
            plain.infer_volume(echoes)  # this series fails: no fallback

        with served(tmp_path / "second", *SERVE_ARGS, ports=ports):
            time.sleep(0.6)  # past retry_s: the next window tries the server again
            assert np.array_equal(np.round(with_fallback.infer_volume(echoes)), expected)
            assert np.array_equal(np.round(plain.infer_volume(echoes)), expected)  # the next series works
    finally:
        with_fallback.close()
        plain.close()
    assert falling_back.fallbacks == windows, (
        "the restarted server computed every window of the second series"
    )
    assert falling_back.outcomes()[-windows:] == ["ok"] * windows
    assert falling_back.connected.count(True) == 2 and failing.connected.count(True) == 2


def test_the_agent_reports_the_servers_precision_once_it_has_answered() -> None:
    manifest = default_manifest()
    backend = TritonBackend(manifest, (2, 48, 32, 32), BackendOptions(remote=RemoteLink(url="gpu-1:8001")))
    seen = [backend.precision]  # nothing heard yet: the options' default
    backend.server_identity = dataclasses.replace(
        ServedIdentity.of(manifest), engine="tensorrt fp16 on cuda:0", precision="fp16"
    )
    seen.append(backend.precision)
    backend.server_identity = dataclasses.replace(backend.server_identity, precision="fp4")
    seen.append(backend.precision)  # a precision this agent has no name for
    assert seen == [Precision.FP32, Precision.FP16, Precision.FP32]
