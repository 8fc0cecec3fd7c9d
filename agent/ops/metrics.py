"""Prometheus metrics for every stage, on a registry of the agent's own (:mod:`agent.ops.metrics_server` serves it).

Why the agent does not use prometheus_client's global ``REGISTRY``: a second ``AgentMetrics`` in the same process
(a test, the benchmark running two agents) would collide on metric names. Each ``AgentMetrics`` therefore holds
its own ``CollectorRegistry`` and serves only that one.

One module on purpose: every metric name, help text, bucket and label set the agent exposes is decided here, so
hospital IT has one file to read for its dashboards and alerts, and cardinality is checked in one place.

Why callers never see a prometheus object: stages report plain values (``file_seen("accepted")``,
``slab_inferred(read_s, inference_s)``) and this module decides names, buckets and labels in one place. Every
label value is checked against a fixed set here, because one careless label (a UID, a path, a protocol name from
a file) turns a handful of series into one per acquisition and takes hospital IT's Prometheus down with it; an
unknown value raises ``ValueError`` naming the label and the values allowed, so bounded cardinality is enforced
rather than hoped for. Every allowed combination is created at zero up front so that dashboards and ``rate()``
see the series before the first event.

Latencies come from wall-clock stamps taken in different stages (``records.py``: ``*_at`` is ``time.time()``),
so an NTP step can make one slightly negative; such a value is recorded as 0 rather than failing the stage that
reported it. A NaN or infinite duration is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from agent import __version__
from agent.vocabulary import FileOutcome, Outcome

#: Prefix of every metric name, so the agent's series are easy to find among a node's others.
NAMESPACE: Final = "sct_agent"

#: What became of a file the watcher handed over.
FILE_OUTCOMES: Final = tuple(outcome.value for outcome in FileOutcome)
#: A verdict's outcome (``records.Outcome``).
ACQUISITION_OUTCOMES: Final = tuple(outcome.value for outcome in Outcome)
#: ``records.Reason.category``.
REASON_CATEGORIES: Final = (
    "sequence",
    "echoes",
    "timing",
    "bandwidth",
    "field",
    "geometry",
    "image",
    "completeness",
    "consistency",
)
#: ZeroMQ topics the publisher sends on.
TOPICS: Final = ("status", "sct.slab", "sct.volume", "heartbeat", "confidence")
#: Pipeline stages that can report an error.
STAGES: Final = (
    "watcher",
    "assembler",
    "validator",
    "streamer",
    "engine",
    "regions",
    "publisher",
    "dicom",
    "dicom_store",
    "journal",
    "retention",
)
#: What the confidence check found on a published volume: regions flagged, none, or not checked (the model has no
#: confidence output).
FLAGGED_OUTCOMES: Final = ("flagged", "clear", "unchecked")
#: The publisher's sockets, and why a peer failed the security handshake (agent.publish.publisher).
PUBLISH_SOCKETS: Final = ("publish", "snapshot")
REJECT_REASONS: Final = ("auth", "protocol", "handshake")
#: What became of a DICOM series write, and of its C-STORE.
DICOM_OUTCOMES: Final = ("written", "failed")
STORE_OUTCOMES: Final = ("stored", "failed")
#: How a C-STORE association request ended (agent.ingest.store_scp): accepted, or refused and why.
RECEIVE_ASSOCIATION_OUTCOMES: Final = (
    "accepted",
    "refused_calling_ae_title",
    "refused_called_ae_title",
    "refused_address",
    "refused_busy",
)
#: What became of one C-STORE instance: stored (on disk and handed to the assembler), out_of_resources (disk full
#: or short, a write that failed: status 0xA700, the sender retries), invalid (not a dataset we can store).
RECEIVE_INSTANCE_OUTCOMES: Final = ("stored", "out_of_resources", "invalid")
#: Why a proposed presentation context was refused: a SOP class the agent does not take, or only transfer
#: syntaxes it does not read (lossy compression).
RECEIVE_CONTEXT_REFUSALS: Final = ("sop_class", "transfer_syntax")
#: Whether a verdict is the provisional one from the first images or the final one.
VERDICT_KINDS: Final = ("provisional", "final")
#: What retention bounds (agent.ops.retention), and where a write can find its filesystem full.
RETENTION_STORES: Final = ("dicom", "snapshot", "journal", "received")
#: Folders whose filesystems keep ``retention.min_free_mb`` free (agent.ops.disk_space).
DISK_FOLDERS: Final = ("state", "dicom")
#: The journal's tables: what a write that found the disk full was for.
JOURNAL_TABLES: Final = ("files", "acquisitions", "verdicts", "slabs", "publications", "volumes")
#: Why the engine failed a series (agent.inference.engine_stage): its worker process ended (killed by the
#: kernel's OOM killer, a crash), the GPU ran out of memory, or anything else the engine raised.
ENGINE_FAILURE_CAUSES: Final = ("worker_ended", "out_of_memory", "remote", "error")
#: How a call to the Triton server ended (engines.backends.remote_link.RemoteOutcome; a test checks they agree).
REMOTE_OUTCOMES: Final = ("ok", "unavailable", "timeout", "capacity", "refused", "mismatch", "error")
#: Why a snapshot request got no snapshot: refused (too many in progress, a malformed request), or the reply was
#: abandoned (the peer took nothing for the stall limit, or went away).
SNAPSHOT_FAILURES: Final = ("busy", "malformed", "stalled", "gone")
#: Why a subscriber asked for a snapshot, as the wire spells it (agent.publish.wire.SNAPSHOT_REASONS; a test
#: checks the two agree).
STATED_SNAPSHOT_REASONS: Final = (
    "join",
    "reconnect",
    "gap",
    "publisher_changed",
    "incomplete",
    "application",
)
#: Those, "unstated" from a client that does not say (schema 1.1), "other" for a reason this agent does not know.
SNAPSHOT_REQUEST_REASONS: Final = (*STATED_SNAPSHOT_REASONS, "unstated", "other")

#: What became of a request the status page let in (agent.status_page.http_server): a page, file or event stream
#: served (or a redirect after a token), no such route (404), a route that raised (500).
PAGE_OUTCOMES: Final = ("served", "not_found", "failed")
#: Why the status page refused a request: no credentials, wrong ones, too many wrong ones from the address
#: (throttled), a method other than GET/HEAD, too many clients or connections (busy), a malformed or oversized
#: request (or a Host that is not this machine's on an unauthenticated loopback page), a failed TLS handshake.
PAGE_REFUSALS: Final = (
    "no_credentials",
    "bad_credentials",
    "throttled",
    "method",
    "busy",
    "bad_request",
    "tls",
)

#: Queue names are chosen by the composing module, not listed here; they must be short identifiers and there
#: may be at most ``MAX_QUEUES`` of them, which bounds the queue-depth series just as a fixed set would.
MAX_QUEUES: Final = 16
_QUEUE_NAME_MAX_LENGTH: Final = 32

# Buckets, in seconds. Each brackets the target figure for what it measures (docs/architecture.md, Target
# figures), with room on both sides to see how far off a miss is.
#: Verdicts: target ≤ 0.5 s from the first image; mostly milliseconds.
VERDICT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Completion detection: target ≤ 0.1 s from counts; the quiet-period fallback takes seconds to a minute or more.
COMPLETION_BUCKETS_S: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: Reading one slab's pixels: tens of milliseconds from page cache, longer from a network share.
SLAB_READ_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Inference per slab: about 1 to 6 s on CPU, tens of milliseconds on a GPU.
INFERENCE_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
#: End to end, last image to last slab or volume published: 0.25 s on a GPU, seconds to a minute on CPU.
END_TO_END_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 300.0)


class QueueLike(Protocol):
    """Anything with a ``qsize()``: ``queue.Queue`` and friends."""

    def qsize(self) -> int: ...


def _check_label(label: str, value: str, allowed: tuple[str, ...]) -> str:
    """Return ``value`` as a plain string if it is one of ``allowed``, else raise naming the label."""
    text = str(value)
    if text not in allowed:
        raise ValueError(f"metric label {label!r} must be one of {', '.join(allowed)}; got {text!r}")
    return text


def _check_queue_name(name: str) -> str:
    if (
        not name
        or len(name) > _QUEUE_NAME_MAX_LENGTH
        or not name[0].isascii()
        or not name[0].isalpha()
        or not all(c.isascii() and (c.isalnum() or c == "_") for c in name)
    ):
        raise ValueError(
            f"metric label 'queue' must be an identifier of at most {_QUEUE_NAME_MAX_LENGTH} characters "
            f"(letters, digits, underscore); got {name!r}"
        )
    return name


def _seconds(what: str, value: float) -> float:
    """A duration fit for a histogram: finite, and 0 where a clock step made it negative."""
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds; got {value!r}")
    return max(0.0, float(value))


class AgentMetrics:
    """Every metric the agent exposes, on its own registry, behind methods that take plain values."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        ns = NAMESPACE

        self._files = Counter(
            "files", "Files handed over by the watcher, by outcome.", ["outcome"], namespace=ns, registry=reg
        )
        self._verdicts = Counter(
            "verdicts",
            "Verdicts decided, by outcome and kind.",
            ["outcome", "kind"],
            namespace=ns,
            registry=reg,
        )
        self._acquisitions = Counter(
            "acquisitions",
            "Acquisitions ended with a final verdict, by outcome.",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self._reasons = Counter(
            "reasons",
            "Failed rules in final verdicts, by category.",
            ["category"],
            namespace=ns,
            registry=reg,
        )
        self._slabs_inferred = Counter("slabs_inferred", "sCT slabs inferred.", namespace=ns, registry=reg)
        self._slabs_published = Counter("slabs_published", "sCT slabs published.", namespace=ns, registry=reg)
        self._volumes_published = Counter(
            "volumes_published", "sCT volumes published.", namespace=ns, registry=reg
        )
        self._flagged_volumes = Counter(
            "flagged_volumes",
            "sCT volumes published, by what their confidence check found: flagged (regions not to trust), "
            "clear (checked, none), unchecked (the model has no confidence output).",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self._flagged_regions = Counter(
            "flagged_regions",
            "Regions of published sCT volumes flagged as not to trust (confidence below the calibrated threshold).",
            namespace=ns,
            registry=reg,
        )
        self._region_search = Histogram(
            "region_search_seconds",
            "Time to find the regions not to trust in a finished volume (the regions stage's thread).",
            namespace=ns,
            registry=reg,
            buckets=INFERENCE_BUCKETS_S,
        )
        self._messages = Counter(
            "published_messages", "Messages published, by topic.", ["topic"], namespace=ns, registry=reg
        )
        self._bytes = Counter(
            "published_bytes",
            "Bytes published (all frames), by topic.",
            ["topic"],
            namespace=ns,
            registry=reg,
        )
        self._drops = Counter(
            "publish_drops",
            "Messages dropped instead of published, by topic.",
            ["topic"],
            namespace=ns,
            registry=reg,
        )
        self._errors = Counter("errors", "Errors, by stage.", ["stage"], namespace=ns, registry=reg)
        self._rejected = Counter(
            "subscribers_rejected",
            "Peers refused by the security handshake (no key, wrong key, not on the allow-list), by socket and "
            "reason.",
            ["socket", "reason"],
            namespace=ns,
            registry=reg,
        )
        self._snapshots = Counter(
            "snapshots_served",
            "Snapshots sent to late or resynchronising subscribers.",
            namespace=ns,
            registry=reg,
        )
        self._snapshot_bytes = Counter(
            "snapshot_payload_bytes", "Payload bytes sent in snapshots.", namespace=ns, registry=reg
        )
        self._snapshot_failures = Counter(
            "snapshots_not_served",
            "Snapshot requests that got no complete snapshot, by reason (busy, malformed, stalled, gone).",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self._snapshot_requests = Counter(
            "snapshot_requests",
            "Snapshot requests, by the reason the subscriber gave (gap: it lost messages).",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self._subscriber_missed = Counter(
            "subscriber_missed_messages",
            "Broadcast messages subscribers lost (dropped for a full subscriber), as they reported when they "
            "resynchronised.",
            namespace=ns,
            registry=reg,
        )
        self._engine_failures = Counter(
            "engine_failures",
            "Series the engine failed (nothing of them published as a volume), by cause.",
            ["cause"],
            namespace=ns,
            registry=reg,
        )
        self._remote_calls = Counter(
            "remote_inference_calls",
            "Calls to the Triton server (identity probes and windows), by outcome.",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self._remote_seconds = Histogram(
            "remote_inference_seconds",
            "Time of each answered call to the Triton server, the window's transfer both ways included.",
            namespace=ns,
            registry=reg,
            buckets=INFERENCE_BUCKETS_S,
        )
        self._remote_fallback = Counter(
            "remote_fallback_windows",
            "Windows the local fallback engine computed because the Triton server failed them.",
            namespace=ns,
            registry=reg,
        )
        self._remote_up = Gauge(
            "remote_server_up",
            "1 while the Triton server is connected and serves the manifest's model; 0 otherwise.",
            namespace=ns,
            registry=reg,
        )
        self._watch_folder = Gauge(
            "watch_folder_available",
            "1 while the export folder is watched; 0 while it is missing, unreadable or unmounted.",
            namespace=ns,
            registry=reg,
        )
        self._watch_folder_losses = Counter(
            "watch_folder_losses",
            "Times the export folder became unavailable (deleted, unreadable, unmounted, replaced).",
            namespace=ns,
            registry=reg,
        )
        self._security = Gauge(
            "publish_curve",
            "1 when the publisher encrypts and authenticates with CURVE, 0 when it publishes in plain.",
            namespace=ns,
            registry=reg,
        )
        self._dicom = Counter(
            "dicom_series", "sCT DICOM series written, by outcome.", ["outcome"], namespace=ns, registry=reg
        )
        self._store = Counter(
            "dicom_store",
            "sCT DICOM series sent by C-STORE, by outcome.",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )

        self._verdict_latency = Histogram(
            "first_image_to_verdict_seconds",
            "Time from an acquisition's first image to its verdict.",
            namespace=ns,
            registry=reg,
            buckets=VERDICT_BUCKETS_S,
        )
        self._completion_latency = Histogram(
            "last_file_to_completion_seconds",
            "Time from an acquisition's last file to the agent knowing it is complete.",
            namespace=ns,
            registry=reg,
            buckets=COMPLETION_BUCKETS_S,
        )
        self._slab_read = Histogram(
            "slab_read_seconds",
            "Time to read one slab's pixels.",
            namespace=ns,
            registry=reg,
            buckets=SLAB_READ_BUCKETS_S,
        )
        self._inference = Histogram(
            "slab_inference_seconds",
            "Time to infer one sCT slab.",
            namespace=ns,
            registry=reg,
            buckets=INFERENCE_BUCKETS_S,
        )
        self._last_slab_latency = Histogram(
            "last_image_to_last_slab_seconds",
            "Time from an acquisition's last image to its last sCT slab published.",
            namespace=ns,
            registry=reg,
            buckets=END_TO_END_BUCKETS_S,
        )
        self._volume_latency = Histogram(
            "last_image_to_volume_seconds",
            "Time from an acquisition's last image to its sCT volume published.",
            namespace=ns,
            registry=reg,
            buckets=END_TO_END_BUCKETS_S,
        )

        self._queue_depth = Gauge(
            "queue_depth", "Items waiting in a stage queue.", ["queue"], namespace=ns, registry=reg
        )
        self._acquisitions_open = Gauge(
            "acquisitions_open", "Acquisitions still receiving images.", namespace=ns, registry=reg
        )
        self._subscribers = Gauge(
            "subscribers_connected", "ZeroMQ subscribers connected.", namespace=ns, registry=reg
        )
        self._ready = Gauge(
            "ready", "1 once the agent is ready to process acquisitions, else 0.", namespace=ns, registry=reg
        )
        self._heartbeat = Gauge(
            "last_heartbeat_timestamp_seconds",
            "Wall-clock time of the pipeline's last heartbeat.",
            namespace=ns,
            registry=reg,
        )
        self._engine = Info("engine", "The sCT model and the backend running it.", namespace=ns, registry=reg)
        self._engine_acceptance = Gauge(
            "engine_acceptance_abs_hu",
            "The running engine's |ΔHU| against the fp32 eager reference on the stored phantom window, "
            "measured when it was accepted at start.",
            ["statistic"],
            namespace=ns,
            registry=reg,
        )
        self._engine_accepted = Gauge(
            "engine_accepted",
            "1 when the running compiled engine passed acceptance at start; 0 for one that did not; "
            "absent for backends without a compiled engine.",
            namespace=ns,
            registry=reg,
        )
        self._engine_build = Gauge(
            "engine_build_seconds",
            "Seconds the running compiled engine took to build (on this start or the one that cached it).",
            namespace=ns,
            registry=reg,
        )
        self._engine_refusals = Gauge(
            "engine_refusals",
            "Cached engines refused at start (key, file hash or acceptance) and rebuilt.",
            namespace=ns,
            registry=reg,
        )
        self._gpu_memory = Gauge(
            "gpu_memory_bytes",
            "GPU memory held by the engine's process, read at each scrape: allocated by tensors, reserved by "
            "the caching allocator.",
            ["kind"],
            namespace=ns,
            registry=reg,
        )
        self._build = Info("build", "The agent's version.", namespace=ns, registry=reg)
        self._build.info({"version": __version__})
        self._init_storage(reg)
        self._init_status_page(reg)
        self._init_receive(reg)

        self._queue_lock = threading.Lock()
        self._queues: set[str] = set()

        for outcome in FILE_OUTCOMES:
            self._files.labels(outcome=outcome)
        for outcome in ACQUISITION_OUTCOMES:
            self._acquisitions.labels(outcome=outcome)
            for kind in VERDICT_KINDS:
                self._verdicts.labels(outcome=outcome, kind=kind)
        for category in REASON_CATEGORIES:
            self._reasons.labels(category=category)
        for topic in TOPICS:
            self._messages.labels(topic=topic)
            self._bytes.labels(topic=topic)
            self._drops.labels(topic=topic)
        for stage in STAGES:
            self._errors.labels(stage=stage)
        for outcome in FLAGGED_OUTCOMES:
            self._flagged_volumes.labels(outcome=outcome)
        for socket_name in PUBLISH_SOCKETS:
            for reason in REJECT_REASONS:
                self._rejected.labels(socket=socket_name, reason=reason)
        for outcome in DICOM_OUTCOMES:
            self._dicom.labels(outcome=outcome)
        for outcome in STORE_OUTCOMES:
            self._store.labels(outcome=outcome)
        for cause in ENGINE_FAILURE_CAUSES:
            self._engine_failures.labels(cause=cause)
        for outcome in REMOTE_OUTCOMES:
            self._remote_calls.labels(outcome=outcome)
        for reason in SNAPSHOT_FAILURES:
            self._snapshot_failures.labels(reason=reason)
        for reason in SNAPSHOT_REQUEST_REASONS:
            self._snapshot_requests.labels(reason=reason)

    # ------------------------------------------------------------------------------------------------ ingest

    def file_seen(self, outcome: str) -> None:
        """Count one file the watcher handed over: accepted, skipped, bad or duplicate."""
        self._files.labels(outcome=_check_label("outcome", outcome, FILE_OUTCOMES)).inc()

    def completion_detected(self, delay_s: float) -> None:
        """Record how long after its last file an acquisition was known to be complete."""
        self._completion_latency.observe(_seconds("delay_s", delay_s))

    def set_watch_folder(self, available: bool) -> None:
        """Say whether the export folder is watched (1) or unavailable (0); a loss also counts once."""
        if not available:
            self._watch_folder_losses.inc()
        self._watch_folder.set(1 if available else 0)

    def set_acquisitions_open(self, n: int) -> None:
        """Set how many acquisitions are still receiving images."""
        if n < 0:
            raise ValueError(f"acquisitions open must be >= 0; got {n}")
        self._acquisitions_open.set(n)

    # ------------------------------------------------------------------------------------------- validation

    def verdict(
        self, outcome: str, final: bool, first_image_to_verdict_s: float | None, categories: Iterable[str]
    ) -> None:
        """Count one verdict.

        Every verdict counts in ``verdicts_total``; only a final one counts the acquisition and its reasons (one
        per failed rule, so pass ``[r.category for r in verdict.reasons]``), because the provisional verdict's
        reasons come back in the final one. ``first_image_to_verdict_s`` is observed when given: pass it for the
        first verdict of an acquisition, ``None`` for later ones.
        """
        outcome_label = _check_label("outcome", outcome, ACQUISITION_OUTCOMES)
        category_labels = [_check_label("category", c, REASON_CATEGORIES) for c in categories]
        latency = (
            None
            if first_image_to_verdict_s is None
            else _seconds("first_image_to_verdict_s", first_image_to_verdict_s)
        )
        self._verdicts.labels(outcome=outcome_label, kind="final" if final else "provisional").inc()
        if latency is not None:
            self._verdict_latency.observe(latency)
        if final:
            self._acquisitions.labels(outcome=outcome_label).inc()
            for category in category_labels:
                self._reasons.labels(category=category).inc()

    # ----------------------------------------------------------------------------------- inference, publish

    def slab_inferred(self, read_s: float, inference_s: float) -> None:
        """Count one slab inferred, with the time to read its pixels and the time to infer it."""
        read = _seconds("read_s", read_s)
        inference = _seconds("inference_s", inference_s)
        self._slab_read.observe(read)
        self._inference.observe(inference)
        self._slabs_inferred.inc()

    def slab_published(self, last_image_to_publish_s: float | None) -> None:
        """Count one slab published; pass the latency from the last image for an acquisition's last slab only."""
        latency = (
            None
            if last_image_to_publish_s is None
            else _seconds("last_image_to_publish_s", last_image_to_publish_s)
        )
        self._slabs_published.inc()
        if latency is not None:
            self._last_slab_latency.observe(latency)

    def volume_published(self, latency_s: float) -> None:
        """Count one volume published, with the time from its acquisition's last image."""
        self._volume_latency.observe(_seconds("latency_s", latency_s))
        self._volumes_published.inc()

    def volume_flagged(self, regions: int | None, search_s: float | None = None) -> None:
        """What the confidence check found on a published volume: ``regions`` flagged (0: none; None: the model
        has no confidence output, nothing was checked), and how long the search took."""
        if regions is None:
            outcome = "unchecked"
        elif regions < 0:
            raise ValueError(f"regions must be >= 0 or None; got {regions}")
        else:
            outcome = "flagged" if regions else "clear"
            self._flagged_regions.inc(regions)
        self._flagged_volumes.labels(outcome=outcome).inc()
        if search_s is not None:
            self._region_search.observe(_seconds("search_s", search_s))

    def published(self, topic: str, nbytes: int) -> None:
        """Count one message sent on ``topic`` and its size in bytes (all frames)."""
        label = _check_label("topic", topic, TOPICS)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0; got {nbytes}")
        self._messages.labels(topic=label).inc()
        self._bytes.labels(topic=label).inc(nbytes)

    def dropped(self, topic: str) -> None:
        """Count one message on ``topic`` dropped rather than sent (a slow subscriber, a full queue)."""
        self._drops.labels(topic=_check_label("topic", topic, TOPICS)).inc()

    def subscriber_rejected(self, socket_name: str, reason: str) -> None:
        """Count one peer that failed the security handshake on ``socket_name`` ("publish" or "snapshot")."""
        self._rejected.labels(
            socket=_check_label("socket", socket_name, PUBLISH_SOCKETS),
            reason=_check_label("reason", reason, REJECT_REASONS),
        ).inc()

    def snapshot_served(self, items: int, nbytes: int) -> None:
        """Count one snapshot of ``items`` messages and ``nbytes`` payload bytes."""
        if items < 0 or nbytes < 0:
            raise ValueError(f"items and nbytes must be >= 0; got {items}, {nbytes}")
        self._snapshots.inc()
        self._snapshot_bytes.inc(nbytes)

    def snapshot_not_served(self, reason: str) -> None:
        """Count one snapshot request refused (busy, malformed) or whose reply was abandoned (stalled, gone)."""
        self._snapshot_failures.labels(reason=_check_label("reason", reason, SNAPSHOT_FAILURES)).inc()

    def snapshot_requested(self, reason: str, missed: int) -> None:
        """Count one snapshot request by the subscriber's reason ("" = unstated; unknown ones as "other") and the
        messages it says it lost. ``reason`` comes off the wire, so it is mapped, never trusted as a label."""
        if missed < 0:
            raise ValueError(f"missed must be >= 0; got {missed}")
        label = "unstated" if not reason else reason if reason in STATED_SNAPSHOT_REASONS else "other"
        self._snapshot_requests.labels(reason=label).inc()
        self._subscriber_missed.inc(missed)

    def engine_failure(self, cause: str) -> None:
        """Count one series the engine failed, by cause (see ``ENGINE_FAILURE_CAUSES``)."""
        self._engine_failures.labels(cause=_check_label("cause", cause, ENGINE_FAILURE_CAUSES)).inc()

    # The engines.backends.remote_link.RemoteCallObserver protocol: told on the engine thread, returns at once.
    def remote_call(self, outcome: str, seconds: float) -> None:
        """Count one call to the Triton server by outcome; time the answered ones."""
        self._remote_calls.labels(outcome=_check_label("outcome", outcome, REMOTE_OUTCOMES)).inc()
        if outcome == "ok":
            self._remote_seconds.observe(seconds)

    def remote_fallback(self) -> None:
        self._remote_fallback.inc()

    def remote_connected(self, up: bool) -> None:
        self._remote_up.set(1 if up else 0)

    def set_curve(self, on: bool) -> None:
        self._security.set(1 if on else 0)

    def dicom_series(self, outcome: str) -> None:
        self._dicom.labels(outcome=_check_label("outcome", outcome, DICOM_OUTCOMES)).inc()

    def dicom_store(self, outcome: str) -> None:
        self._store.labels(outcome=_check_label("outcome", outcome, STORE_OUTCOMES)).inc()

    def set_subscribers(self, n: int) -> None:
        """Set how many subscribers are connected."""
        if n < 0:
            raise ValueError(f"subscribers must be >= 0; got {n}")
        self._subscribers.set(n)

    def set_engine_info(
        self,
        *,
        model_id: str,
        model_version: str,
        backend: str,
        precision: str,
        device: str,
        engine: str = "",
    ) -> None:
        """Describe the engine in use (``engine``: "cached", "built" or "" for backends without a compiled
        engine). One series whatever the values, so these need no fixed set."""
        self._engine.info(
            {
                "model_id": model_id,
                "model_version": model_version,
                "backend": backend,
                "precision": precision,
                "device": device,
                "engine": engine,
            }
        )

    def set_engine_acceptance(
        self,
        *,
        mean_abs_hu: float,
        p999_abs_hu: float,
        max_abs_hu: float,
        passed: bool,
        build_s: float,
        refusals: int,
    ) -> None:
        """Record the running engine's acceptance figures and how it came to be (see engines' acceptance)."""
        for statistic, value in (("mean", mean_abs_hu), ("p99.9", p999_abs_hu), ("max", max_abs_hu)):
            self._engine_acceptance.labels(statistic=statistic).set(value)
        self._engine_accepted.set(1 if passed else 0)
        self._engine_build.set(build_s)
        self._engine_refusals.set(refusals)

    def watch_gpu_memory(self, allocated: Callable[[], float], reserved: Callable[[], float]) -> None:
        """Expose the GPU memory readers as ``gpu_memory_bytes{kind=...}``, read at each scrape."""
        self._gpu_memory.labels(kind="allocated").set_function(allocated)
        self._gpu_memory.labels(kind="reserved").set_function(reserved)

    # ----------------------------------------------------------------------------------------- operations

    def error(self, stage: str) -> None:
        """Count one error in ``stage``."""
        self._errors.labels(stage=_check_label("stage", stage, STAGES)).inc()

    def set_ready(self, flag: bool) -> None:
        """Say whether the agent is ready (1) or not (0)."""
        self._ready.set(1 if flag else 0)

    def heartbeat(self) -> None:
        """Stamp the pipeline's heartbeat with the current wall-clock time."""
        self._heartbeat.set_to_current_time()

    def watch_queue(self, name: str, q: QueueLike) -> None:
        """Expose ``q.qsize()`` as ``queue_depth{queue=name}``, read at each scrape (nothing to update)."""
        label = _check_queue_name(name)
        with self._queue_lock:
            if label in self._queues:
                raise ValueError(f"metric label 'queue': {label!r} is already watched")
            if len(self._queues) >= MAX_QUEUES:
                raise ValueError(
                    f"metric label 'queue': at most {MAX_QUEUES} queues may be watched; {label!r} is one too many"
                )
            self._queues.add(label)
        self._queue_depth.labels(queue=label).set_function(q.qsize)

    # ------------------------------------------------------------------------------------- C-STORE receive

    def _init_receive(self, reg: CollectorRegistry) -> None:
        ns = NAMESPACE
        self._receive_associations = Counter(
            "receive_associations",
            "C-STORE association requests, by outcome (accepted, or refused and why).",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self._receive_instances = Counter(
            "receive_instances",
            "Instances received by C-STORE, by outcome.",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self._receive_bytes = Counter(
            "receive_bytes", "Bytes of instances stored from C-STORE.", namespace=ns, registry=reg
        )
        self._receive_contexts = Counter(
            "receive_contexts_refused",
            "Presentation contexts refused at association time, by reason (sop_class, transfer_syntax).",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self._receive_open = Gauge(
            "receive_associations_open",
            "C-STORE associations open now, read at each scrape.",
            namespace=ns,
            registry=reg,
        )
        for outcome in RECEIVE_ASSOCIATION_OUTCOMES:
            self._receive_associations.labels(outcome=outcome)
        for outcome in RECEIVE_INSTANCE_OUTCOMES:
            self._receive_instances.labels(outcome=outcome)
        for reason in RECEIVE_CONTEXT_REFUSALS:
            self._receive_contexts.labels(reason=reason)

    def receive_association(self, outcome: str) -> None:
        """Count one C-STORE association request: accepted, or refused and why."""
        label = _check_label("outcome", outcome, RECEIVE_ASSOCIATION_OUTCOMES)
        self._receive_associations.labels(outcome=label).inc()

    def receive_instance(self, outcome: str, nbytes: int = 0) -> None:
        """Count one instance received by C-STORE; ``nbytes`` of a stored one."""
        label = _check_label("outcome", outcome, RECEIVE_INSTANCE_OUTCOMES)
        if nbytes < 0:
            raise ValueError(f"received bytes must be >= 0; got {nbytes}")
        self._receive_instances.labels(outcome=label).inc()
        self._receive_bytes.inc(nbytes)

    def receive_context_refused(self, reason: str) -> None:
        """Count one presentation context refused at association time."""
        self._receive_contexts.labels(reason=_check_label("reason", reason, RECEIVE_CONTEXT_REFUSALS)).inc()

    def watch_receive_associations(self, open_count: Callable[[], int]) -> None:
        """Expose ``open_count()`` as ``receive_associations_open``, read at each scrape."""
        self._receive_open.set_function(lambda: float(open_count()))

    # ---------------------------------------------------------------------- disk space, retention, full disks

    def _init_storage(self, reg: CollectorRegistry) -> None:
        ns = NAMESPACE
        self._disk_free = Gauge(
            "disk_free_bytes",
            "Bytes free for the agent on the filesystem of a folder it writes, read at each scrape.",
            ["folder"],
            namespace=ns,
            registry=reg,
        )
        self._min_free = Gauge(
            "disk_min_free_bytes",
            "Free bytes each written folder's filesystem must keep for a new acquisition to be taken "
            "(retention.min_free_mb; 0 = no check).",
            namespace=ns,
            registry=reg,
        )
        self._accepting = Gauge(
            "accepting",
            "1 while new acquisitions are taken, 0 while they wait for free disk space; read at each scrape.",
            namespace=ns,
            registry=reg,
        )
        self._refused = Counter(
            "acquisitions_refused",
            "New acquisitions not taken for want of free disk space, by the folder that was short (each once "
            "until it is taken).",
            ["folder"],
            namespace=ns,
            registry=reg,
        )
        self._held = Gauge(
            "files_held",
            "Files of refused acquisitions waiting in the export folder to be read when there is room.",
            namespace=ns,
            registry=reg,
        )
        self._disk_full = Counter(
            "disk_full",
            "Writes that failed because their filesystem was full, by store.",
            ["store"],
            namespace=ns,
            registry=reg,
        )
        self._journal_failures = Counter(
            "journal_write_failures",
            "Journal writes lost because the state folder's disk was full, by table (acquisition states are "
            "kept and written again when there is room).",
            ["table"],
            namespace=ns,
            registry=reg,
        )
        self._journal_pending = Gauge(
            "journal_pending_states",
            "Acquisition states waiting for room in the journal.",
            namespace=ns,
            registry=reg,
        )
        self._retention_bytes = Gauge(
            "retention_bytes",
            "Bytes a store holds after the last retention run.",
            ["store"],
            namespace=ns,
            registry=reg,
        )
        self._retention_items = Gauge(
            "retention_items",
            "Items a store holds after the last retention run (series, volumes, journal rows).",
            ["store"],
            namespace=ns,
            registry=reg,
        )
        self._pruned_items = Counter(
            "retention_pruned_items",
            "Items removed by retention (series, volumes, journal rows), by store.",
            ["store"],
            namespace=ns,
            registry=reg,
        )
        self._pruned_bytes = Counter(
            "retention_pruned_bytes",
            "Bytes freed by retention, by store.",
            ["store"],
            namespace=ns,
            registry=reg,
        )
        self._retention_runs = Counter(
            "retention_runs", "Retention runs completed.", namespace=ns, registry=reg
        )
        self._retention_last = Gauge(
            "retention_last_run_timestamp_seconds",
            "Wall-clock time the last retention run ended.",
            namespace=ns,
            registry=reg,
        )
        for folder in DISK_FOLDERS:
            self._refused.labels(folder=folder)
        for store in RETENTION_STORES:
            self._disk_full.labels(store=store)
            self._pruned_items.labels(store=store)
            self._pruned_bytes.labels(store=store)
        for table in JOURNAL_TABLES:
            self._journal_failures.labels(table=table)
        self._accepting.set(1)

    def watch_disk_free(self, folder: str, free_bytes: Callable[[], float]) -> None:
        """Expose ``free_bytes()`` as ``disk_free_bytes{folder}`` ("state" or "dicom"), read at each scrape."""
        self._disk_free.labels(folder=_check_label("folder", folder, DISK_FOLDERS)).set_function(free_bytes)

    def watch_accepting(self, accepting: Callable[[], bool]) -> None:
        """Expose ``accepting()`` as the ``accepting`` gauge (1 or 0), read at each scrape."""
        self._accepting.set_function(lambda: 1.0 if accepting() else 0.0)

    def set_min_free(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"min free bytes must be >= 0; got {nbytes}")
        self._min_free.set(nbytes)

    def acquisition_refused(self, folder: str) -> None:
        """Count one acquisition not taken because ``folder``'s filesystem was short of space."""
        self._refused.labels(folder=_check_label("folder", folder, DISK_FOLDERS)).inc()

    def set_files_held(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"files held must be >= 0; got {n}")
        self._held.set(n)

    def disk_full(self, store: str) -> None:
        """Count one write to ``store`` that failed because its filesystem was full."""
        self._disk_full.labels(store=_check_label("store", store, RETENTION_STORES)).inc()

    def journal_write_failed(self, table: str) -> None:
        """Count one journal write to ``table`` lost to a full disk."""
        self._journal_failures.labels(table=_check_label("table", table, JOURNAL_TABLES)).inc()

    def set_journal_pending(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"pending journal states must be >= 0; got {n}")
        self._journal_pending.set(n)

    def retention_pruned(
        self, store: str, *, removed: int, removed_bytes: int, kept: int, kept_bytes: int
    ) -> None:
        """Record one store's part of a retention run: what it removed and what it holds now."""
        label = _check_label("store", store, RETENTION_STORES)
        if min(removed, removed_bytes, kept, kept_bytes) < 0:
            raise ValueError(
                f"retention figures must be >= 0; got {removed}, {removed_bytes}, {kept}, {kept_bytes}"
            )
        self._pruned_items.labels(store=label).inc(removed)
        self._pruned_bytes.labels(store=label).inc(removed_bytes)
        self._retention_items.labels(store=label).set(kept)
        self._retention_bytes.labels(store=label).set(kept_bytes)

    def retention_ran(self) -> None:
        """Count one retention run and stamp when it ended."""
        self._retention_runs.inc()
        self._retention_last.set_to_current_time()

    # ------------------------------------------------------------------------------------------ status page

    def _init_status_page(self, reg: CollectorRegistry) -> None:
        ns = NAMESPACE
        self._page_requests = Counter(
            "page_requests",
            "Status page requests let in, by outcome (served, not_found, failed).",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self._page_refused = Counter(
            "page_refused",
            "Status page requests refused, by reason (no_credentials, bad_credentials, throttled, method, busy, "
            "bad_request, tls).",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self._page_streams = Gauge(
            "page_event_streams",
            "Status page event streams open (browsers showing the page live).",
            namespace=ns,
            registry=reg,
        )
        for outcome in PAGE_OUTCOMES:
            self._page_requests.labels(outcome=outcome)
        for reason in PAGE_REFUSALS:
            self._page_refused.labels(reason=reason)

    def page_request(self, outcome: str) -> None:
        """Count one status page request that was let in: served, not_found or failed."""
        self._page_requests.labels(outcome=_check_label("outcome", outcome, PAGE_OUTCOMES)).inc()

    def page_refused(self, reason: str) -> None:
        """Count one status page request refused, by reason (``PAGE_REFUSALS``)."""
        self._page_refused.labels(reason=_check_label("reason", reason, PAGE_REFUSALS)).inc()

    def set_page_event_streams(self, n: int) -> None:
        """Set how many status page event streams are open."""
        if n < 0:
            raise ValueError(f"page event streams must be >= 0; got {n}")
        self._page_streams.set(n)
