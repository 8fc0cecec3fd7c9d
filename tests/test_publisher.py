"""Publisher and SctClient over real ZeroMQ sockets on loopback (random ports, no mocks).

The clients here subscribe only (``snapshot_endpoint=None``): these tests pin down the broadcast itself, gaps
and drops included. Snapshots and gap healing are tests/test_clone.py's."""

from __future__ import annotations

import gc
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
import pytest
import zmq
from wire_support import (
    kernel_tcp_buffer_bytes,
    random_hu,
    running,
    sample_slab,
    sample_volume,
    slabs_and_volume,
    wait_until,
)

from agent.client import Gap, SctClient
from agent.publish.publisher import Publisher, PublishError
from agent.publish.snapshot_store import MAX_IN_FLIGHT
from agent.publish.wire import (
    ChecksumError,
    HeartbeatMessage,
    Message,
    SlabMessage,
    StatusMessage,
    VolumeMessage,
    encode,
    encode_heartbeat,
)
from agent.records import Publication, Reason, SctSlab, SctVolume, StatusEvent, Verdict, payload_sha256
from agent.status_events import verdict_event
from agent.vocabulary import Outcome
from sct_core.geometry import Orientation, VolumeGeometry

LOOPBACK = "tcp://127.0.0.1:0"
#: Heartbeat interval for tests: subscribers see the publisher within a few tens of milliseconds.
FAST_HEARTBEAT_S = 0.05
#: Generous bound on anything that should take milliseconds (two shared CPU cores).
WAIT_S = 10.0


pytestmark = pytest.mark.usefixtures("no_thread_leaks")


# ------------------------------------------------------------------------------------------------ helpers


def oblique_geometry() -> VolumeGeometry:
    return VolumeGeometry.from_fov(
        center=(5.0, -30.0, 80.0),
        fov_mm=(12 * 0.9, 9 * 1.1, 6 * 2.5),
        voxel_mm=(0.9, 1.1, 2.5),
        orientation=Orientation.SAGITTAL,
        oblique_deg=12.0,
    )


def grid(slices: int, rows: int, columns: int) -> VolumeGeometry:
    return VolumeGeometry(
        shape=(slices, rows, columns),
        spacing=(2.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        slice_direction=(-1.0, 0.0, 0.0),
    )


def hu_volume(shape: tuple[int, int, int], seed: int = 0) -> npt.NDArray[np.int16]:
    return random_hu(shape, seed)


def slab_of(
    geometry: VolumeGeometry,
    hu: npt.NDArray[np.int16],
    *,
    start: int,
    size: int,
    index: int,
    count: int,
    acquisition_id: str = "acq-7",
    digest: str | None = None,
) -> SctSlab:
    assert size == hu.shape[0]
    return sample_slab(
        geometry, hu, start=start, index=index, count=count, acquisition_id=acquisition_id, digest=digest
    )


def volume_of(geometry: VolumeGeometry, hu: npt.NDArray[np.int16], slab_count: int) -> SctVolume:
    return sample_volume(geometry, hu, slab_count=slab_count, acquisition_id="acq-7")


def two_slabs_and_volume(geometry: VolumeGeometry, hu: npt.NDArray[np.int16]) -> list[Publication]:
    return list(slabs_and_volume(geometry, hu, acquisition_id="acq-7"))


def status(n: int) -> StatusEvent:
    return StatusEvent("progress", "acq-7", {"slabs_done": n, "slab_count": 9}, at=time.time())


def heard(client: SctClient, timeout_s: float = WAIT_S) -> HeartbeatMessage:
    """Wait for a heartbeat: once one arrives the subscription is in place (ZeroMQ's slow joiner)."""
    message = client.wait_for(lambda m: isinstance(m, HeartbeatMessage), timeout_s)
    assert isinstance(message, HeartbeatMessage), "no heartbeat from the publisher"
    return message


def receive_until(client: SctClient, predicate: Callable[[Message], bool]) -> list[Message]:
    received: list[Message] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        message = client.receive(0.1)
        if message is not None:
            received.append(message)
            if predicate(message):
                return received
    raise AssertionError(f"gave up after {WAIT_S} s; received {[type(m).__name__ for m in received]}")


# ------------------------------------------------------------------------------------------ lifecycle


def test_bind_failure_names_the_endpoint() -> None:
    context = zmq.Context()
    squatter = context.socket(zmq.PUB)
    try:
        port = squatter.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{port}"
        publisher = Publisher(endpoint)

        with pytest.raises(PublishError, match=f"cannot bind publisher to {endpoint}") as caught:
            publisher.start()

        assert caught.value.endpoint == endpoint
        assert not publisher.alive
    finally:
        squatter.close(linger=0)
        context.term()


def test_endpoint_reports_the_port_chosen() -> None:
    publisher = Publisher(LOOPBACK)
    with pytest.raises(PublishError, match="not bound yet"):
        _ = publisher.endpoint

    with running(publisher):
        host, _, port = publisher.endpoint.rpartition(":")
        assert host == "tcp://127.0.0.1"
        assert int(port) > 0


def test_stop_drains_the_queue_joins_the_thread_and_refuses_more() -> None:
    publisher = Publisher(LOOPBACK, heartbeat_s=FAST_HEARTBEAT_S)
    publisher.start()
    try:
        with SctClient(publisher.endpoint, snapshot_endpoint=None) as client:
            heard(client)
            for n in range(5):
                publisher.submit(status(n))
            publisher.stop()

            assert not publisher.alive
            assert not [t for t in threading.enumerate() if t.name == "sct-publisher"]
            got = [m for m in iter(lambda: client.receive(0.5), None) if isinstance(m, StatusMessage)]
            assert [m.body["slabs_done"] for m in got] == [0, 1, 2, 3, 4]
    finally:
        publisher.stop()
    with pytest.raises(PublishError, match="not running"):
        publisher.submit(status(5))
    publisher.stop()  # a second stop is harmless


def test_submit_before_start_is_refused() -> None:
    with pytest.raises(PublishError, match="not running; cannot submit StatusEvent"):
        Publisher(LOOPBACK).submit(status(0))


# -------------------------------------------------------------------------------- publishing to a client


def test_two_slab_volume_is_reassembled_byte_identical_with_geometry() -> None:
    geometry = oblique_geometry()
    hu = hu_volume(geometry.shape)
    sent: list[tuple[Publication, int, float]] = []
    items: list[Publication] = [verdict_event(rejected_verdict()), *two_slabs_and_volume(geometry, hu)]

    publisher = Publisher(LOOPBACK, heartbeat_s=FAST_HEARTBEAT_S, on_sent=lambda *a: sent.append(a))
    with running(publisher), SctClient(publisher.endpoint, snapshot_endpoint=None) as client:
        first = heard(client)
        for item in items:
            publisher.submit(item)
        received = receive_until(client, lambda m: isinstance(m, VolumeMessage))
        volume = client.pop_volume()

    kinds = [type(m) for m in received if not isinstance(m, HeartbeatMessage)]
    assert kinds == [StatusMessage, SlabMessage, SlabMessage, VolumeMessage]
    assert volume is not None
    assert volume.complete_from_slabs and volume.matches_volume_message
    assert (volume.slabs_received, volume.slab_count) == (2, 2)
    assert volume.hu.tobytes() == hu.tobytes()
    assert_same_geometry(volume.geometry, geometry)
    assert (volume.model_id, volume.model_version, volume.protocol_id) == (
        "sct-unet",
        "1.2.0",
        "lumbar-dual-echo-v1",
    )
    seqs = [first.seq] + [m.seq for m in received]
    assert seqs == list(range(first.seq, first.seq + len(seqs)))
    assert client.gaps == []
    assert [item for item, _, _ in sent] == items
    assert [seq for _, seq, _ in sent] == [m.seq for m in received if not isinstance(m, HeartbeatMessage)]


def assert_same_geometry(found: VolumeGeometry, expected: VolumeGeometry) -> None:
    """Equal up to the last bit of the direction cosines (the wire carries their product with the spacing)."""
    assert found.shape == expected.shape
    assert found.spacing == expected.spacing
    np.testing.assert_allclose(found.affine, expected.affine, rtol=0, atol=1e-12)
    for name in ("origin", "row_direction", "column_direction", "slice_direction"):
        np.testing.assert_allclose(getattr(found, name), getattr(expected, name), rtol=0, atol=1e-12)


def rejected_verdict() -> Verdict:
    return Verdict(
        acquisition_id="acq-7",
        protocol_id="lumbar-dual-echo-v1",
        protocol_version="1",
        outcome=Outcome.REJECT,
        final=False,
        reasons=(Reason("lumbar-dual-echo-v1", "EchoTime2", "5.1", "4.6 to 4.8 ms", "timing"),),
        pending=("EchoTime2",),
        decided_at=time.time(),
    )


def test_heartbeats_arrive_when_idle_with_consecutive_sequence_numbers() -> None:
    publisher = Publisher(LOOPBACK, heartbeat_s=FAST_HEARTBEAT_S)
    with running(publisher), SctClient(publisher.endpoint, snapshot_endpoint=None) as client:
        beats = [heard(client) for _ in range(4)]

    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + 4))
    assert {b.publisher_id for b in beats} == {publisher.publisher_id}
    intervals = np.diff([b.sent_at for b in beats])
    assert np.all(intervals >= FAST_HEARTBEAT_S * 0.9)
    assert publisher.heartbeats >= 4


def test_no_heartbeat_while_busy() -> None:
    """Heartbeats fill silence only: a publisher sending more often than heartbeat_s never sends one."""
    publisher = Publisher(LOOPBACK, heartbeat_s=0.5)
    with running(publisher):
        deadline = time.monotonic() + 1.5
        n = 0
        while time.monotonic() < deadline:
            publisher.submit(status(n))
            n += 1
            time.sleep(0.05)
        assert publisher.heartbeats == 0
        assert publisher.sequence == n


def test_subscriber_count_follows_connections() -> None:
    counts: list[int] = []
    publisher = Publisher(LOOPBACK, on_subscribers=counts.append)
    with running(publisher):
        with SctClient(publisher.endpoint, snapshot_endpoint=None):
            assert wait_until(lambda: publisher.subscribers == 1)
            with SctClient(publisher.endpoint, snapshot_endpoint=None):
                assert wait_until(lambda: publisher.subscribers == 2)
            assert wait_until(lambda: publisher.subscribers == 1)
        assert wait_until(lambda: publisher.subscribers == 0)

    assert counts[-1] == 0
    assert max(counts) == 2


def test_bad_item_and_failing_callback_are_counted_and_the_thread_carries_on() -> None:
    def explode(item: Publication, seq: int, sent_at: float) -> None:
        raise RuntimeError("callback bug")

    publisher = Publisher(LOOPBACK, heartbeat_s=FAST_HEARTBEAT_S, on_sent=explode)
    with running(publisher), SctClient(publisher.endpoint, snapshot_endpoint=None) as client:
        heard(client)
        publisher.submit(StatusEvent("error", "acq-7", {"detail": object()}, 0.0))  # not JSON: never sent
        publisher.submit(status(1))
        got = client.wait_for(lambda m: isinstance(m, StatusMessage), WAIT_S)

        assert isinstance(got, StatusMessage)
        assert got.body["slabs_done"] == 1
        assert publisher.alive
        assert wait_until(lambda: publisher.errors == 2)  # the encoding error and the callback's
        assert client.gaps == []  # the refused item used no sequence number


# ------------------------------------------------------------------------------- slow and lost subscribers


def test_subscriber_that_falls_behind_sees_exactly_the_messages_it_lost_as_gaps() -> None:
    """More bytes than libzmq and the kernel can buffer for a subscriber that is not reading must be lost.

    The count comes from the kernel's own buffer maxima, so the loss is certain, not a race.
    """
    rows, columns = 512, 1024
    slab_bytes = rows * columns * 2
    send_hwm, rcvhwm = 4, 1
    n = math.ceil(kernel_tcp_buffer_bytes() / slab_bytes) + send_hwm + rcvhwm + 8
    geometry = grid(n, rows, columns)
    shared = hu_volume((1, rows, columns))
    digest = payload_sha256(shared)

    publisher = Publisher(LOOPBACK, heartbeat_s=FAST_HEARTBEAT_S, send_hwm=send_hwm)
    with running(publisher), SctClient(publisher.endpoint, snapshot_endpoint=None, rcvhwm=rcvhwm) as client:
        heard(client)
        first = publisher.sequence + 1
        for k in range(n):  # the client reads nothing meanwhile
            publisher.submit(slab_of(geometry, shared, start=k, size=1, index=k, count=n, digest=digest))
        assert wait_until(lambda: publisher.sequence >= first + n - 1)
        last = publisher.sequence
        received = receive_until(client, lambda m: isinstance(m, HeartbeatMessage) and m.seq > last)

    seqs = [m.seq for m in received]
    assert seqs == sorted(set(seqs))
    slabs = [m for m in received if isinstance(m, SlabMessage)]
    assert 0 < len(slabs) < n
    missing = set(range(seqs[0], seqs[-1] + 1)) - set(seqs)
    assert missing
    assert {k for gap in client.gaps for k in range(gap.expected, gap.got)} == missing
    assert all(gap.got > gap.expected for gap in client.gaps)


def test_slow_subscriber_blocks_neither_submit_nor_memory() -> None:
    """50 x 1 MB slabs to a subscriber that never reads: all are sent, and only send_hwm or so stay referenced.

    Each slab belongs to its own acquisition, so the snapshot store (which keeps every slab of the acquisitions
    in flight) holds at most MAX_IN_FLIGHT of them: memory is bounded by the queue and the store, not by the
    number of slabs sent.
    """
    rows, columns, count = 512, 1024, 50
    geometry = grid(count, rows, columns)
    send_hwm = 8
    alive: list[weakref.ref[npt.NDArray[np.int16]]] = []

    publisher = Publisher(LOOPBACK, heartbeat_s=FAST_HEARTBEAT_S, send_hwm=send_hwm, queue_depth=4)
    with running(publisher), SctClient(publisher.endpoint, snapshot_endpoint=None, rcvhwm=1) as slow:
        heard(slow)  # subscribed; from now on it reads nothing
        first = publisher.sequence + 1
        started = time.monotonic()
        for k in range(count):
            hu = np.full((1, rows, columns), k, dtype=np.int16)
            alive.append(weakref.ref(hu))
            slab = slab_of(geometry, hu, start=k, size=1, index=k, count=count, acquisition_id=f"acq-{k}")
            publisher.submit(slab, timeout=WAIT_S)
            del slab
            del hu
        submit_s = time.monotonic() - started

        assert wait_until(lambda: publisher.sequence >= first + count - 1)
        assert publisher.alive
        assert submit_s < WAIT_S

        def referenced() -> int:
            gc.collect()
            return sum(ref() is not None for ref in alive)

        # libzmq holds at most send_hwm queued messages plus the one being written to the kernel; the snapshot
        # store holds the slabs of the last MAX_IN_FLIGHT acquisitions.
        bound = send_hwm + 2 + MAX_IN_FLIGHT
        assert wait_until(lambda: referenced() <= bound), f"{referenced()} slabs still referenced"
        assert publisher.store.slab_count == MAX_IN_FLIGHT


# ----------------------------------------------------------------------- client behaviour on crafted input


@contextmanager
def raw_publisher() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A bare PUB socket, so a test can send exactly the sequence numbers and bytes it wants."""
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    try:
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        yield socket, f"tcp://127.0.0.1:{port}"
    finally:
        socket.close(linger=0)
        context.term()


def synchronise(socket: zmq.Socket[bytes], client: SctClient, publisher_id: str) -> int:
    """Send heartbeats until the client hears them; return the last sequence number used."""
    seq = 0
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        seq += 1
        socket.send_multipart(encode_heartbeat(seq, publisher_id, time.time()))
        if client.receive(0.02) is not None:
            while client.receive(0.1) is not None:
                pass
            assert client.last_seq == seq
            return seq
    raise AssertionError("the client never heard the raw publisher")


def test_client_records_a_gap_and_uses_the_volume_message_when_a_slab_was_lost() -> None:
    geometry = oblique_geometry()
    hu = hu_volume(geometry.shape, seed=5)
    slab0, _lost, volume = two_slabs_and_volume(geometry, hu)

    with raw_publisher() as (socket, endpoint), SctClient(endpoint, snapshot_endpoint=None) as client:
        seq = synchronise(socket, client, "pub-a")
        socket.send_multipart(encode(slab0, seq + 1, "pub-a", time.time()))
        socket.send_multipart(encode(volume, seq + 3, "pub-a", time.time()))  # seq + 2 never sent
        received = client.receive_volume(WAIT_S)

    assert client.gaps == [Gap(expected=seq + 2, got=seq + 3)]
    assert received is not None
    assert not received.complete_from_slabs
    assert not received.matches_volume_message
    assert (received.slabs_received, received.slab_count) == (1, 2)
    assert received.hu.tobytes() == hu.tobytes()


def test_client_rejects_a_tampered_payload_and_counts_it() -> None:
    geometry = oblique_geometry()
    hu = hu_volume(geometry.shape)
    slab = two_slabs_and_volume(geometry, hu)[0]

    with raw_publisher() as (socket, endpoint), SctClient(endpoint, snapshot_endpoint=None) as client:
        seq = synchronise(socket, client, "pub-a")
        topic, header, payload = (bytes(f) for f in encode(slab, seq + 1, "pub-a", time.time()))
        tampered = bytearray(payload)
        tampered[7] ^= 0x10
        socket.send_multipart([topic, header, bytes(tampered)])
        socket.send_multipart(encode_heartbeat(seq + 2, "pub-a", time.time()))
        message = client.receive(WAIT_S)

    assert isinstance(message, HeartbeatMessage)
    assert message.seq == seq + 2
    assert client.rejected == 1
    assert isinstance(client.last_error, ChecksumError)
    assert client.gaps == [Gap(expected=seq + 1, got=seq + 2)]


def test_a_new_publisher_id_restarts_sequence_tracking() -> None:
    with raw_publisher() as (socket, endpoint), SctClient(endpoint, snapshot_endpoint=None) as client:
        synchronise(socket, client, "before-restart")
        socket.send_multipart(encode_heartbeat(1, "after-restart", time.time()))
        socket.send_multipart(encode_heartbeat(3, "after-restart", time.time()))
        messages = [client.receive(WAIT_S), client.receive(WAIT_S)]

    assert [m.seq for m in messages if m is not None] == [1, 3]
    assert client.publisher_id == "after-restart"
    assert client.gaps == [Gap(expected=2, got=3)]


def test_receive_times_out_with_no_publisher() -> None:
    with SctClient("tcp://127.0.0.1:9", snapshot_endpoint=None) as client:
        started = time.monotonic()
        assert client.receive(0.1) is None
        assert time.monotonic() - started >= 0.09
        assert client.seconds_since_last_message is None
