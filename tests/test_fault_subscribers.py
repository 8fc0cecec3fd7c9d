"""Fault: subscribers that stop reading, many subscribers at once, snapshot requests nobody reads.

Twenty subscribers on one publisher: seventeen bare SUB sockets and one reference client that keep reading, one
bare SUB socket that connects and never calls recv(), and one reference client that stops reading during a
burst and reads again afterwards; beside them seventeen snapshot requests (more than the snapshot server serves
at once) whose replies are never read. The publisher must never block; every subscriber that reads gets every
message; the one that stalled lost messages (certain: the burst is larger than the kernel's socket buffers and
the queues can hold), resynchronises from a snapshot, ends with the volume byte for byte, and reports what it
lost with its snapshot request, which is how the agent counts drops (``sct_agent_subscriber_missed_messages_total``,
``sct_agent_snapshot_requests_total{reason="gap"}``): libzmq drops for a full subscriber silently.

The burst is built from 1 MiB slabs at the publisher (agent.publish.publisher with the agent's own metrics), since
only that size makes the loss certain; the agent itself is then run with the same crowd around a real series.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import zmq
from agent_support import agent_config, write_test_protocol
from fault_support import metric, scrape, small_series, write_small_model
from wire_support import kernel_tcp_buffer_bytes, random_hu, running, sample_slab, sample_volume, wait_until

from agent.client import ReceivedVolume, SctClient
from agent.ops.metrics import STATED_SNAPSHOT_REASONS, AgentMetrics
from agent.publish.publisher import Publisher
from agent.publish.snapshot_server import MAX_SESSIONS
from agent.publish.wire import SNAPSHOT_REASONS, TOPIC_HEARTBEAT, encode_snapshot_request
from agent.records import Publication, payload_sha256
from agent.service import AgentService
from engines.phantom.case import PhantomCase
from engines.scanner.export import ExportOptions, export_case
from sct_core.geometry import VolumeGeometry

LOOPBACK = "tcp://127.0.0.1:0"
#: Heartbeat interval: slow enough that a loaded machine never makes a reading client think the publisher is
#: gone (three silent intervals), so any resynchronisation in this test is the stall it provokes.
HEARTBEAT_S = 0.5
WAIT_S = 60.0
SUBSCRIBERS = 20
#: Bare SUB sockets that keep reading (with one reference client that reads, one stalled client and one socket
#: that never reads: twenty).
READERS = SUBSCRIBERS - 3
#: More snapshot requests left unread than the server serves at once.
STALLED_REQUESTS = MAX_SESSIONS + 1
ROWS, COLUMNS = 512, 1024
SEND_HWM = 4
SERIES_SEED = 900601


def samples(text: str, prefix: str) -> dict[str, float]:
    return {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


class Readers:
    """Bare SUB sockets that keep reading, in one thread; each records the sequence numbers it received."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, count: int) -> None:
        self.sockets = []
        for _ in range(count):
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, 0)  # this reader's side never drops
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(endpoint)
            self.sockets.append(sub)
        self.seqs: list[list[int]] = [[] for _ in self.sockets]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="readers")

    def _run(self) -> None:
        poller = zmq.Poller()
        for sub in self.sockets:
            poller.register(sub, zmq.POLLIN)
        index = {sub: k for k, sub in enumerate(self.sockets)}
        while not self.stop.is_set():
            for sub, _ in poller.poll(50):
                frames = sub.recv_multipart(copy=False)
                self.seqs[index[sub]].append(int(json.loads(frames[1].bytes)["seq"]))

    def heard_beyond(self, seq: int) -> bool:
        return all(seqs and seqs[-1] > seq for seqs in self.seqs)

    @contextmanager
    def running(self) -> Iterator[Readers]:
        self.thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            self.thread.join(10)
            for sub in self.sockets:
                sub.close(linger=0)


def synced(client: SctClient) -> SctClient:
    """Receive until the client has applied a snapshot and heard the live stream after it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not (client.synchronised and client.snapshots and client.last_seq):
        client.receive(0.05)
    assert client.synchronised and client.snapshots >= 1, "the client never synchronised"
    return client


def volume_of(client: SctClient, acquisition_id: str) -> ReceivedVolume:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for volume in list(client.completed_volumes):
            if volume.acquisition_id == acquisition_id:
                return volume
        client.receive(0.05)
    raise AssertionError(f"no volume {acquisition_id} within {WAIT_S} s")


def stalled_requests(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str, count: int
) -> list[zmq.Socket[bytes]]:
    """DEALER sockets that ask for a snapshot (saying no reason, as a 1.1 client) and never read the reply."""
    dealers = []
    for _ in range(count):
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVHWM, 1)
        dealer.setsockopt(zmq.RCVBUF, 4096)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        dealer.send_multipart(encode_snapshot_request(time.time()))
        dealers.append(dealer)
    return dealers


def test_the_client_and_the_metrics_know_the_same_snapshot_reasons() -> None:
    assert SNAPSHOT_REASONS == STATED_SNAPSHOT_REASONS


def test_a_reason_off_the_wire_never_becomes_a_label_of_its_own() -> None:
    """``reason`` comes from any subscriber: an unknown one counts as "other", so it cannot add series."""
    metrics = AgentMetrics()
    metrics.snapshot_requested("1.2.840.10008.5.1.4.1.1.2-not-a-reason", 0)
    metrics.snapshot_requested("", 0)
    metrics.snapshot_requested("gap", 5)
    text = _exposition(metrics)
    assert "not-a-reason" not in text
    counts = samples(text, "sct_agent_snapshot_requests_total")
    assert counts == {
        **{f'sct_agent_snapshot_requests_total{{reason="{r}"}}': 0.0 for r in STATED_SNAPSHOT_REASONS},
        'sct_agent_snapshot_requests_total{reason="gap"}': 1.0,
        'sct_agent_snapshot_requests_total{reason="unstated"}': 1.0,
        'sct_agent_snapshot_requests_total{reason="other"}': 1.0,
    }
    assert samples(text, "sct_agent_subscriber_missed_messages_total") == {
        "sct_agent_subscriber_missed_messages_total": 5.0
    }
    with pytest.raises(ValueError, match="missed must be >= 0; got -1"):
        metrics.snapshot_requested("gap", -1)


@pytest.mark.slow
@pytest.mark.usefixtures("no_thread_leaks")
def test_twenty_subscribers_a_dead_reader_and_unread_snapshots_never_block_and_the_stalled_one_heals() -> (
    None
):
    slab_bytes = ROWS * COLUMNS * 2
    n = math.ceil(kernel_tcp_buffer_bytes() / slab_bytes) + SEND_HWM + 8
    geometry = VolumeGeometry(
        shape=(n, ROWS, COLUMNS),
        spacing=(1.0, 0.5, 0.5),
        origin=(0.0, 0.0, 0.0),
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        slice_direction=(-1.0, 0.0, 0.0),
    )
    hu = np.repeat(random_hu((1, ROWS, COLUMNS), seed=3), n, axis=0)
    hu[:, 0, 0] = np.arange(n, dtype=np.int16)  # every slab differs
    burst: list[Publication] = [
        sample_slab(geometry, hu[k : k + 1], start=k, index=k, count=n, acquisition_id="acq-burst")
        for k in range(n)
    ]
    burst.append(sample_volume(geometry, hu, slab_count=n, acquisition_id="acq-burst"))

    metrics = AgentMetrics()
    sent: dict[int, int] = {}  # id(item) -> the sequence number it went out with

    def on_sent(item: Publication, seq: int, _at: float) -> None:
        sent[id(item)] = seq

    publisher = Publisher(
        LOOPBACK,
        snapshot_endpoint=LOOPBACK,
        heartbeat_s=HEARTBEAT_S,
        send_hwm=SEND_HWM,
        on_sent=on_sent,
        on_dropped=metrics.dropped,
        on_snapshot=metrics.snapshot_served,
        on_snapshot_failed=metrics.snapshot_not_served,
        on_snapshot_request=metrics.snapshot_requested,
    )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealers: list[zmq.Socket[bytes]] = []
    never = context.socket(zmq.SUB)
    try:
        with running(publisher):
            assert publisher.snapshot_endpoint is not None
            never.setsockopt(zmq.RCVHWM, 1)
            never.setsockopt(zmq.RCVBUF, 4096)
            never.setsockopt(zmq.LINGER, 0)
            never.setsockopt(zmq.SUBSCRIBE, b"")
            never.connect(publisher.endpoint)
            with (
                Readers(context, publisher.endpoint, READERS).running() as readers,
                synced(
                    SctClient(publisher.endpoint, snapshot_endpoint=publisher.snapshot_endpoint)
                ) as steady,
                synced(
                    SctClient(publisher.endpoint, snapshot_endpoint=publisher.snapshot_endpoint, rcvhwm=1)
                ) as stalled,
            ):
                assert wait_until(lambda: publisher.subscribers == SUBSCRIBERS, WAIT_S)
                before = publisher.sequence
                assert wait_until(lambda: readers.heard_beyond(before), WAIT_S), "the readers never heard it"

                got: list[ReceivedVolume] = []
                reader = threading.Thread(target=lambda: got.append(volume_of(steady, "acq-burst")))
                reader.start()
                first = publisher.sequence + 1

                def caught_up(seq: int) -> bool:
                    return readers.heard_beyond(seq - 1) and (steady.last_seq or 0) >= seq

                for item in burst:
                    # Paced as the engine paces slabs: the readers take each one before the next comes. The
                    # stalled client and the dead socket read nothing meanwhile, and their queues overflow.
                    publisher.submit(item, timeout=WAIT_S)
                    assert wait_until(partial(sent.__contains__, id(item)), WAIT_S)
                    seq = sent[id(item)]
                    assert wait_until(partial(caught_up, seq), WAIT_S), (
                        f"the readers did not keep up at {seq}"
                    )
                last = sent[id(burst[-1])]
                reader.join(WAIT_S)
                assert got, "the reading client never got the volume"
                reference = got[0]
                assert reference.complete_from_slabs and reference.matches_volume_message
                assert not reference.from_snapshot
                assert steady.gap_count == 0 and steady.missed == 0

                # More unread snapshot requests than the server serves at once, now that a snapshot is big.
                dealers = stalled_requests(context, publisher.snapshot_endpoint, STALLED_REQUESTS)

                # The stalled client reads again: it lost messages, says so, resynchronises and ends whole.
                healed = volume_of(stalled, "acq-burst")
                assert stalled.gap_count >= 1 and stalled.missed >= 1 and stalled.resyncs >= 1
                assert healed.from_snapshot
                assert healed.sha256 == reference.sha256 == payload_sha256(hu)
                assert healed.hu.tobytes() == reference.hu.tobytes()

                # A robot joining now gets the snapshot too: the unread ones did not make the server busy.
                with SctClient(publisher.endpoint, snapshot_endpoint=publisher.snapshot_endpoint) as late:
                    joined = volume_of(late, "acq-burst")
                    assert joined.from_snapshot and joined.sha256 == reference.sha256

                # Every reader got every message, heartbeats included, up to past the burst.
                assert wait_until(lambda: readers.heard_beyond(last), WAIT_S)
                for seqs in readers.seqs:
                    window = [s for s in seqs if s >= first]
                    assert window[: last - first + 1] == list(range(first, last + 1))

                # The socket that never reads lost most of the burst; it holds at most what the queues can.
                kept = 0
                while True:
                    try:
                        frames = never.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    kept += frames[0] != TOPIC_HEARTBEAT
                assert kept < n

                assert publisher.alive and publisher.errors == 0
            served = samples(_exposition(metrics), "sct_agent_")
            assert served["sct_agent_subscriber_missed_messages_total"] == stalled.missed
            assert served['sct_agent_snapshot_requests_total{reason="gap"}'] == stalled.gap_count
            assert served['sct_agent_snapshot_requests_total{reason="join"}'] == 3  # steady, stalled, late
            assert served['sct_agent_snapshot_requests_total{reason="unstated"}'] == STALLED_REQUESTS
            assert (
                sum(v for k, v in served.items() if k.startswith("sct_agent_snapshots_not_served_total")) == 0
            )
            # The publisher's own socket never refused a send: per-subscriber drops are only seen as above.
            assert served['sct_agent_publish_drops_total{topic="sct.slab"}'] == 0
    finally:
        for dealer in dealers:
            dealer.close(linger=0)
        never.close(linger=0)
        context.term()


def _exposition(metrics: AgentMetrics) -> str:
    from prometheus_client import generate_latest  # noqa: PLC0415 - only this test reads the registry raw

    return generate_latest(metrics.registry).decode()


# --------------------------------------------------------------------------------------------- in the agent


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return small_series(SERIES_SEED)


@pytest.mark.slow
def test_the_agent_serves_twenty_subscribers_while_one_never_reads_and_snapshot_replies_go_unread(
    tmp_path: Path, case: PhantomCase
) -> None:
    model = write_small_model(tmp_path / "model")
    protocols = write_test_protocol(tmp_path / "protocols")
    config = agent_config(tmp_path, protocols, model, quiet_period_s=3.0)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []
    clients: list[SctClient] = []
    try:
        with AgentService(config) as agent:
            endpoints = agent.endpoints
            url = endpoints.metrics_url
            assert url is not None
            never = context.socket(zmq.SUB)
            never.setsockopt(zmq.RCVHWM, 1)
            never.setsockopt(zmq.SUBSCRIBE, b"")
            never.connect(endpoints.publish)
            sockets.append(never)
            sockets += stalled_requests(context, endpoints.snapshot, STALLED_REQUESTS)
            clients = [
                SctClient(endpoints.publish, snapshot_endpoint=endpoints.snapshot, context=context)
                for _ in range(SUBSCRIBERS - 1)
            ]
            # One thread reads them all, round robin, as twenty robots would each read their own.
            deadline = time.monotonic() + WAIT_S
            while metric(scrape(url), "sct_agent_subscribers_connected") < SUBSCRIBERS or not all(
                c.synchronised and c.last_seq for c in clients
            ):
                assert time.monotonic() < deadline, "the subscribers never all connected and synchronised"
                for client in clients:
                    client.receive(0.01)
            export_case(case, ExportOptions(out_dir=config.watch.folder / "series", rate_files_per_s=300.0))
            received: dict[int, ReceivedVolume] = {}
            deadline = time.monotonic() + 2 * WAIT_S
            while len(received) < len(clients):
                assert time.monotonic() < deadline, (
                    f"{len(received)} of {len(clients)} subscribers got the volume"
                )
                for k, client in enumerate(clients):
                    client.receive(0.01)
                    volume = client.pop_volume()
                    if volume is not None:
                        received[k] = volume
            digests = {v.sha256 for v in received.values()}
            assert len(digests) == 1
            assert all(v.complete_from_slabs and v.matches_volume_message for v in received.values())
            assert all(c.gap_count == 0 for c in clients)
            assert agent.healthy()
            text = scrape(url)
            assert metric(text, "sct_agent_volumes_published_total") == 1
            assert metric(text, 'sct_agent_snapshot_requests_total{reason="unstated"}') == STALLED_REQUESTS
            assert metric(text, 'sct_agent_snapshot_requests_total{reason="join"}') == SUBSCRIBERS - 1
            assert metric(text, 'sct_agent_snapshots_not_served_total{reason="busy"}') == 0
    finally:
        for client in clients:
            client.close()
        for socket in sockets:
            socket.close(linger=0)
        context.term()
