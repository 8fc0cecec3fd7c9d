"""AgentMetrics and its HTTP endpoint, scraped for real over loopback."""

from __future__ import annotations

import itertools
import math
import queue
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.ops.metrics import MAX_QUEUES, REASON_CATEGORIES, AgentMetrics
from agent.ops.metrics_server import MetricsServer, MetricsServerError, serve
from agent.vocabulary import Outcome

#: Sample name plus sorted label pairs -> value, as scraped.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

SCRAPE_TIMEOUT_S = 5.0


def fetch(server: MetricsServer) -> str:
    with urllib.request.urlopen(server.url, timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        body: bytes = response.read()
    return body.decode("utf-8")


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics() -> AgentMetrics:
    return AgentMetrics()


@pytest.fixture
def server(metrics: AgentMetrics) -> Iterator[MetricsServer]:
    with serve(metrics, "127.0.0.1", 0) as handle:
        yield handle


def test_counters_histograms_and_gauges_come_through_http(
    metrics: AgentMetrics, server: MetricsServer
) -> None:
    assert server.port > 0
    before = parse(fetch(server))
    # Every allowed series exists at zero before the first event.
    assert value(before, "sct_agent_files_total", outcome="duplicate") == 0
    assert value(before, "sct_agent_reasons_total", category="consistency") == 0
    assert value(before, "sct_agent_errors_total", stage="journal") == 0

    metrics.file_seen("accepted")
    metrics.file_seen("accepted")
    metrics.file_seen("bad")
    metrics.completion_detected(0.03)
    metrics.verdict("pass", False, 0.12, [])
    metrics.verdict(Outcome.REJECT, True, None, ["timing", "timing", "geometry"])
    metrics.slab_inferred(0.02, 1.5)
    metrics.slab_inferred(0.04, 2.5)
    metrics.slab_published(None)
    metrics.slab_published(3.0)
    metrics.volume_published(3.2)
    metrics.published("sct.slab", 1000)
    metrics.published("sct.slab", 24)
    metrics.published("status", 7)
    metrics.dropped("heartbeat")
    metrics.error("engine")
    metrics.set_subscribers(3)
    metrics.set_acquisitions_open(2)
    metrics.set_ready(True)
    beat_from = time.time()
    metrics.heartbeat()
    beat_to = time.time()
    metrics.set_engine_info(
        model_id="unet3d",
        model_version="1.2",
        backend="torch",
        precision="fp32",
        device="cpu",
        engine="cached",
    )
    metrics.set_engine_acceptance(
        mean_abs_hu=0.11, p999_abs_hu=1.1, max_abs_hu=3.1, passed=True, build_s=65.0, refusals=1
    )
    scrapes = itertools.count(1)
    metrics.watch_gpu_memory(lambda: 5e8, lambda: 1e9 * next(scrapes))

    s = parse(fetch(server))
    assert value(s, "sct_agent_files_total", outcome="accepted") == 2
    assert value(s, "sct_agent_files_total", outcome="bad") == 1
    assert value(s, "sct_agent_files_total", outcome="skipped") == 0
    assert value(s, "sct_agent_last_file_to_completion_seconds_count") == 1
    assert value(s, "sct_agent_last_file_to_completion_seconds_bucket", le="0.025") == 0
    assert value(s, "sct_agent_last_file_to_completion_seconds_bucket", le="0.05") == 1
    # A provisional verdict counts as a verdict, not as an acquisition; its latency is observed.
    assert value(s, "sct_agent_verdicts_total", outcome="pass", kind="provisional") == 1
    assert value(s, "sct_agent_acquisitions_total", outcome="pass") == 0
    assert value(s, "sct_agent_first_image_to_verdict_seconds_count") == 1
    assert value(s, "sct_agent_first_image_to_verdict_seconds_sum") == pytest.approx(0.12)
    # A final verdict counts the acquisition and each failed rule by category.
    assert value(s, "sct_agent_verdicts_total", outcome="reject", kind="final") == 1
    assert value(s, "sct_agent_acquisitions_total", outcome="reject") == 1
    assert value(s, "sct_agent_reasons_total", category="timing") == 2
    assert value(s, "sct_agent_reasons_total", category="geometry") == 1
    assert value(s, "sct_agent_reasons_total", category="sequence") == 0
    assert value(s, "sct_agent_slabs_inferred_total") == 2
    assert value(s, "sct_agent_slab_read_seconds_sum") == pytest.approx(0.06)
    assert value(s, "sct_agent_slab_inference_seconds_count") == 2
    assert value(s, "sct_agent_slab_inference_seconds_bucket", le="2.0") == 1
    assert value(s, "sct_agent_slab_inference_seconds_bucket", le="4.0") == 2
    assert value(s, "sct_agent_slabs_published_total") == 2
    assert value(s, "sct_agent_last_image_to_last_slab_seconds_count") == 1
    assert value(s, "sct_agent_last_image_to_last_slab_seconds_sum") == pytest.approx(3.0)
    assert value(s, "sct_agent_volumes_published_total") == 1
    assert value(s, "sct_agent_last_image_to_volume_seconds_sum") == pytest.approx(3.2)
    assert value(s, "sct_agent_published_messages_total", topic="sct.slab") == 2
    assert value(s, "sct_agent_published_bytes_total", topic="sct.slab") == 1024
    assert value(s, "sct_agent_published_bytes_total", topic="status") == 7
    assert value(s, "sct_agent_publish_drops_total", topic="heartbeat") == 1
    assert value(s, "sct_agent_errors_total", stage="engine") == 1
    assert value(s, "sct_agent_subscribers_connected") == 3
    assert value(s, "sct_agent_acquisitions_open") == 2
    assert value(s, "sct_agent_ready") == 1
    assert beat_from <= value(s, "sct_agent_last_heartbeat_timestamp_seconds") <= beat_to
    engine = dict(
        model_id="unet3d",
        model_version="1.2",
        backend="torch",
        precision="fp32",
        device="cpu",
        engine="cached",
    )
    assert value(s, "sct_agent_engine_info", **engine) == 1
    assert value(s, "sct_agent_engine_acceptance_abs_hu", statistic="mean") == pytest.approx(0.11)
    assert value(s, "sct_agent_engine_acceptance_abs_hu", statistic="max") == pytest.approx(3.1)
    assert value(s, "sct_agent_engine_accepted") == 1
    assert value(s, "sct_agent_engine_build_seconds") == 65.0
    assert value(s, "sct_agent_engine_refusals") == 1
    assert value(s, "sct_agent_gpu_memory_bytes", kind="allocated") == 5e8
    # Read at each scrape, not when set.
    assert value(s, "sct_agent_gpu_memory_bytes", kind="reserved") == 1e9
    assert value(parse(fetch(server)), "sct_agent_gpu_memory_bytes", kind="reserved") == 2e9
    assert value(s, "sct_agent_build_info", version=__version__) == 1

    metrics.set_ready(False)
    assert value(parse(fetch(server)), "sct_agent_ready") == 0


def test_queue_depth_is_read_at_each_scrape(metrics: AgentMetrics, server: MetricsServer) -> None:
    files: queue.Queue[int] = queue.Queue(maxsize=8)
    slabs: queue.Queue[int] = queue.Queue()
    metrics.watch_queue("files", files)
    metrics.watch_queue("slabs", slabs)
    for i in range(3):
        files.put(i)
    slabs.put(0)
    s = parse(fetch(server))
    assert value(s, "sct_agent_queue_depth", queue="files") == 3
    assert value(s, "sct_agent_queue_depth", queue="slabs") == 1
    files.get()
    slabs.get()
    s = parse(fetch(server))
    assert value(s, "sct_agent_queue_depth", queue="files") == 2
    assert value(s, "sct_agent_queue_depth", queue="slabs") == 0


def test_negative_latency_from_a_clock_step_counts_as_zero(metrics: AgentMetrics) -> None:
    metrics.volume_published(-0.2)
    assert metrics.registry.get_sample_value("sct_agent_last_image_to_volume_seconds_sum") == 0
    assert metrics.registry.get_sample_value("sct_agent_last_image_to_volume_seconds_count") == 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m: m.file_seen("1.2.840.10008.5.1.4.1.1.4"),
            r"'outcome' must be one of accepted, skipped, bad",
        ),
        (lambda m: m.verdict("maybe", True, None, []), r"'outcome' must be one of pass, reject, incomplete"),
        (
            lambda m: m.verdict("reject", True, None, ["timing", "TR"]),
            r"'category' must be one of sequence, echoes",
        ),
        (lambda m: m.published("sct.slab.7", 10), r"'topic' must be one of status, sct\.slab, sct\.volume"),
        (lambda m: m.dropped("/data/export"), r"'topic' must be one of status"),
        (lambda m: m.error("database"), r"'stage' must be one of watcher, assembler, validator"),
        (lambda m: m.watch_queue("files/../x", queue.Queue()), r"'queue' must be an identifier"),
        (lambda m: m.watch_queue("", queue.Queue()), r"'queue' must be an identifier"),
        (lambda m: m.completion_detected(math.nan), r"delay_s must be a finite number"),
        (lambda m: m.slab_inferred(0.1, math.inf), r"inference_s must be a finite number"),
        (lambda m: m.published("status", -1), r"nbytes must be >= 0"),
        (lambda m: m.set_subscribers(-1), r"subscribers must be >= 0"),
    ],
)
def test_unknown_label_values_and_bad_numbers_are_refused(
    metrics: AgentMetrics, call: Callable[[AgentMetrics], None], match: str
) -> None:
    before = metrics.registry.collect()
    snapshot = [
        (s.name, s.labels, s.value) for f in before for s in f.samples if not s.name.endswith("_created")
    ]
    with pytest.raises(ValueError, match=match):
        call(metrics)
    after = [(s.name, s.labels, s.value) for f in metrics.registry.collect() for s in f.samples]
    # Nothing was counted and no series was created by the refused call.
    assert [x for x in after if not x[0].endswith("_created")] == snapshot


def test_verdict_with_one_bad_category_counts_nothing(metrics: AgentMetrics) -> None:
    with pytest.raises(ValueError, match="category"):
        metrics.verdict("reject", True, 0.1, [REASON_CATEGORIES[0], "patient-name"])
    get = metrics.registry.get_sample_value
    assert get("sct_agent_verdicts_total", {"outcome": "reject", "kind": "final"}) == 0
    assert get("sct_agent_reasons_total", {"category": REASON_CATEGORIES[0]}) == 0
    assert get("sct_agent_first_image_to_verdict_seconds_count") == 0


def test_queue_names_are_unique_and_capped(metrics: AgentMetrics) -> None:
    metrics.watch_queue("q0", queue.Queue())
    with pytest.raises(ValueError, match="'q0' is already watched"):
        metrics.watch_queue("q0", queue.Queue())
    for i in range(1, MAX_QUEUES):
        metrics.watch_queue(f"q{i}", queue.Queue())
    with pytest.raises(ValueError, match=f"at most {MAX_QUEUES} queues"):
        metrics.watch_queue("one_more", queue.Queue())


def test_exposition_passes_promtool(metrics: AgentMetrics, server: MetricsServer) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus provides it)")
    metrics.file_seen("accepted")
    metrics.verdict("reject", True, 0.2, ["field"])
    metrics.slab_inferred(0.1, 1.0)
    metrics.watch_queue("files", queue.Queue())
    metrics.set_engine_info(
        model_id="unet3d", model_version="1", backend="onnxruntime", precision="fp32", device="cpu"
    )
    metrics.heartbeat()
    text = fetch(server)

    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")

    # The same check does catch a badly named metric, so the clean result above means something.
    bad = "# HELP sct_latency_milliseconds x\n# TYPE sct_latency_milliseconds gauge\nsct_latency_milliseconds 1\n"
    flagged = subprocess.run(
        [promtool, "check", "metrics"], input=bad, capture_output=True, text=True, check=False
    )
    assert flagged.returncode == 3
    assert "milliseconds" in flagged.stdout + flagged.stderr


def test_close_stops_the_server_and_leaves_no_thread(metrics: AgentMetrics) -> None:
    threads_before = set(threading.enumerate())
    server = serve(metrics, "127.0.0.1", 0)
    assert set(threading.enumerate()) - threads_before, "serve() should run a server thread"
    for _ in range(3):
        fetch(server)
    server.close()
    server.close()  # idempotent
    assert set(threading.enumerate()) - threads_before == set()
    with pytest.raises(urllib.error.URLError):
        fetch(server)


def test_two_agents_in_one_process_do_not_collide() -> None:
    first, second = AgentMetrics(), AgentMetrics()
    with serve(first, "127.0.0.1", 0) as a, serve(second, "127.0.0.1", 0) as b:
        assert a.port != b.port
        first.file_seen("accepted")
        first.file_seen("accepted")
        second.file_seen("skipped")
        sa, sb = parse(fetch(a)), parse(fetch(b))
    assert value(sa, "sct_agent_files_total", outcome="accepted") == 2
    assert value(sa, "sct_agent_files_total", outcome="skipped") == 0
    assert value(sb, "sct_agent_files_total", outcome="accepted") == 0
    assert value(sb, "sct_agent_files_total", outcome="skipped") == 1


def test_a_taken_port_is_an_error_naming_host_and_port(metrics: AgentMetrics) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(
            MetricsServerError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}\b"
        ) as caught:
            serve(metrics, "127.0.0.1", port)
    assert isinstance(caught.value, OSError)
    assert caught.value.errno is not None


def test_a_silent_client_cannot_hold_close_up(
    metrics: AgentMetrics, capfd: pytest.CaptureFixture[str]
) -> None:
    threads_before = set(threading.enumerate())
    server = serve(metrics, "127.0.0.1", 0, request_timeout_s=0.2)
    with socket.create_connection(("127.0.0.1", server.port), timeout=SCRAPE_TIMEOUT_S) as silent:
        fetch(server)  # other scrapes are served meanwhile
        time.sleep(0.05)  # let the server accept the silent connection
        started = time.perf_counter()
        server.close()
        took = time.perf_counter() - started
        assert silent.recv(1) == b""  # the server hung up on it
    assert took < 2.0
    assert set(threading.enumerate()) - threads_before == set()
    assert capfd.readouterr().err == ""  # dropped quietly, no traceback
