"""The Clone pattern over real sockets on loopback: late joiners, restarted subscribers, gaps healed by a
snapshot, a restarted publisher found again through heartbeats, and the snapshot server's own rules."""

from __future__ import annotations

import socket as socketlib
import threading
import time

import numpy as np
import numpy.typing as npt
import pytest
import zmq
from wire_support import random_hu, running, sample_slab, sample_volume, wait_until

from agent.client import ReceivedVolume, SctClient
from agent.ops.config import PublishConfig
from agent.publish.publisher import Publisher
from agent.publish.snapshot_store import SnapshotStore
from agent.publish.wire import (
    SCHEMA,
    TOPIC_SNAPSHOT_END,
    TOPIC_SNAPSHOT_ERROR,
    Message,
    SchemaVersionError,
    SlabMessage,
    decode_snapshot_reply,
    encode_snapshot_request,
)
from agent.records import Publication, SctSlab, StatusEvent, payload_sha256
from sct_core.geometry import VolumeGeometry

FAST_HEARTBEAT_S = 0.05
WAIT_S = 15.0
SLABS = 6
SLAB_DEPTH = 4
DEEP_HWM = 100


pytestmark = pytest.mark.usefixtures("no_thread_leaks")


def free_port() -> int:
    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def geometry_of(slices: int, rows: int = 64, columns: int = 48) -> VolumeGeometry:
    return VolumeGeometry(
        shape=(slices, rows, columns),
        spacing=(1.5, 0.8, 0.8),
        origin=(-20.0, 10.0, 30.0),
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        slice_direction=(-1.0, 0.0, 0.0),
    )


def series(acquisition_id: str, seed: int, slabs: int = SLABS, depth: int = SLAB_DEPTH) -> list[Publication]:
    """The slabs of one acquisition, a progress status after each, and the stitched volume last."""
    geometry = geometry_of(slabs * depth)
    hu = random_hu(geometry.shape, seed)
    out: list[Publication] = []
    for k in range(slabs):
        part = np.ascontiguousarray(hu[k * depth : (k + 1) * depth])
        out.append(
            sample_slab(geometry, part, start=k * depth, index=k, count=slabs, acquisition_id=acquisition_id)
        )
        out.append(StatusEvent("progress", acquisition_id, {"slabs_done": k + 1}, time.time()))
    out.append(sample_volume(geometry, hu, slab_count=slabs, acquisition_id=acquisition_id))
    return out


def snapshot_publisher(**options: object) -> Publisher:
    """A publisher whose queues take the tests' bursts: loss is provoked only where a test asks for it."""
    options.setdefault("send_hwm", DEEP_HWM)
    return Publisher(
        "tcp://127.0.0.1:0",
        snapshot_endpoint="tcp://127.0.0.1:0",
        heartbeat_s=FAST_HEARTBEAT_S,
        **options,  # type: ignore[arg-type]
    )


def client_of(publisher: Publisher, **options: object) -> SctClient:
    return SctClient(publisher.endpoint, snapshot_endpoint=publisher.snapshot_endpoint, **options)  # type: ignore[arg-type]


def synced(client: SctClient) -> SctClient:
    """Receive until the client has applied a snapshot and heard the live stream after it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not (client.synchronised and client.snapshots and client.last_seq):
        client.receive(0.05)
    assert client.synchronised and client.snapshots >= 1, "the client never synchronised"
    heard = client.last_seq
    assert client.wait_for(lambda m: m.seq > (heard or 0), WAIT_S) is not None
    return client


def submit_all(publisher: Publisher, items: list[Publication]) -> None:
    for item in items:
        publisher.submit(item, timeout=WAIT_S)


def volume_of(client: SctClient, acquisition_id: str) -> ReceivedVolume:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for volume in list(client.completed_volumes):
            if volume.acquisition_id == acquisition_id:
                client.completed_volumes.remove(volume)
                return volume
        client.receive(0.05)
    raise AssertionError(f"no volume {acquisition_id} within {WAIT_S} s")


def assert_identical(got: ReceivedVolume, reference: ReceivedVolume, expected: npt.NDArray[np.int16]) -> None:
    assert got.sha256 == reference.sha256 == payload_sha256(expected)
    assert got.hu.tobytes() == reference.hu.tobytes() == expected.tobytes()
    assert got.geometry == reference.geometry
    assert np.array_equal(got.geometry.affine, reference.geometry.affine)
    assert payload_sha256(got.hu) == got.sha256  # verified again here, not only inside the client


# ------------------------------------------------------------------------------------- late and restarted


def test_late_joiner_and_restarted_subscriber_end_with_the_same_volume_as_one_present_from_the_start() -> (
    None
):
    items = series("acq-late", seed=3)
    expected = items[-1].hu  # type: ignore[union-attr]
    half = len(items) // 2
    with running(snapshot_publisher()) as publisher, synced(client_of(publisher)) as early:
        restarting = synced(client_of(publisher))
        submit_all(publisher, items[:half])
        assert wait_until(lambda: publisher.store.slab_count == half // 2)
        # The restarting robot saw the first slabs, then goes away; the late one starts only now.
        seen = 0
        while seen < half // 2 and restarting.wait_for(lambda m: isinstance(m, SlabMessage), WAIT_S):
            seen += 1
        assert seen == half // 2
        restarting.close()
        with synced(client_of(publisher)) as late, synced(client_of(publisher)) as restarted:
            submit_all(publisher, items[half:])
            reference = volume_of(early, "acq-late")
            for joined in (late, restarted):
                got = volume_of(joined, "acq-late")
                assert_identical(got, reference, expected)
                # The slabs before the join came in the snapshot, the rest live: together the whole volume.
                assert got.complete_from_slabs and got.matches_volume_message
                assert joined.snapshots >= 1 and joined.gap_count == 0
        assert reference.complete_from_slabs and reference.matches_volume_message
        assert early.gap_count == 0 and early.resyncs == 0


def test_a_subscriber_joining_after_the_volume_gets_it_from_the_snapshot_once() -> None:
    first, second = series("acq-a", seed=1), series("acq-b", seed=2)
    with running(snapshot_publisher(snapshot_volumes=2)) as publisher, synced(client_of(publisher)) as early:
        submit_all(publisher, first + second)
        references = [volume_of(early, "acq-a"), volume_of(early, "acq-b")]
        with client_of(publisher) as late:
            got = [volume_of(late, "acq-a"), volume_of(late, "acq-b")]
            for volume, reference, items in zip(got, references, (first, second), strict=True):
                assert volume.from_snapshot and not reference.from_snapshot
                assert_identical(volume, reference, items[-1].hu)  # type: ignore[union-attr]
            # Heartbeats keep coming; the snapshot's volumes are never handed over a second time.
            mark = late.last_seq or 0
            assert late.wait_for(lambda m: m.seq > mark + 3, WAIT_S) is not None
            assert not late.completed_volumes
            # A resync (as after a gap) replays the snapshot, and still nothing is handed over twice.
            late.resync("test")
            mark = publisher.sequence
            assert late.wait_for(lambda m: m.seq > mark + 3, WAIT_S) is not None
            assert late.snapshots >= 2
            assert not late.completed_volumes


def test_the_snapshot_keeps_only_the_latest_volumes_and_drops_cancelled_streams() -> None:
    volumes = [series(f"acq-{k}", seed=k, slabs=2)[-1] for k in range(3)]
    in_flight = series("acq-live", seed=9, slabs=3)[:2]  # one slab and its progress
    cancelled = series("acq-gone", seed=8, slabs=3)[:2]
    with running(snapshot_publisher(snapshot_volumes=2)) as publisher:
        submit_all(publisher, [*volumes, *in_flight, *cancelled])
        publisher.submit(StatusEvent("cancelled", "acq-gone", {"reason": "verdict reject"}, time.time()))
        assert wait_until(lambda: publisher.sequence >= 8)
        with client_of(publisher) as late:
            messages: list[Message] = []
            while (message := late.receive(0.3)) is not None and len(messages) < 50:
                messages.append(message)
    ids = [
        getattr(m, "acquisition_id", None) for m in messages if not m.__class__.__name__.startswith("Heart")
    ]
    assert [i for i in ids if i is not None] == ["acq-1", "acq-2", "acq-live"]


# ------------------------------------------------------------------------------------------ gaps and loss


def test_a_gap_is_detected_and_healed_by_a_snapshot() -> None:
    """A subscriber that stops reading loses slabs at the high-water marks, sees the gap, resyncs, and ends
    with exactly the volume a subscriber that kept up received."""
    big = geometry_of(24 * 4, rows=512, columns=512)  # 0.5 MB per slice: queues overflow quickly
    hu = random_hu(big.shape, seed=4)
    items: list[Publication] = []
    for k in range(24):
        part = np.ascontiguousarray(hu[k * 4 : (k + 1) * 4])
        items.append(sample_slab(big, part, start=k * 4, index=k, count=24, acquisition_id="acq-gap"))
    items.append(sample_volume(big, hu, slab_count=24, acquisition_id="acq-gap"))
    with (
        running(snapshot_publisher(send_hwm=1, snapshot_volumes=1)) as publisher,
        synced(client_of(publisher)) as steady,
        synced(client_of(publisher, rcvhwm=1)) as lossy,
    ):
        reference_box: list[ReceivedVolume] = []
        reader = threading.Thread(target=lambda: reference_box.append(volume_of(steady, "acq-gap")))
        reader.start()
        submit_all(publisher, items)  # the lossy client reads nothing meanwhile
        assert wait_until(lambda: publisher.sequence >= len(items) + 1)
        got = volume_of(lossy, "acq-gap")
        reader.join(WAIT_S)
        assert reference_box, "the steady subscriber never got the volume"
        assert lossy.gap_count >= 1, "the test did not provoke a loss"
        assert lossy.resyncs >= 1
        assert_identical(got, reference_box[0], hu)


def test_a_restarted_publisher_is_found_again_through_missing_heartbeats() -> None:
    port, snapshot_port = free_port(), free_port()
    endpoint, snapshot = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{snapshot_port}"
    before, after = series("acq-1", seed=1, slabs=2), series("acq-2", seed=2, slabs=2)
    first = Publisher(endpoint, snapshot_endpoint=snapshot, heartbeat_s=FAST_HEARTBEAT_S)
    with running(first):
        client = synced(
            SctClient(endpoint, snapshot_endpoint=snapshot, heartbeat_liveness=3, snapshot_timeout_s=1.0)
        )
        submit_all(first, before)
        volume_of(client, "acq-1")
        old_id = first.publisher_id
    with client:
        # Nothing arrives now: after three heartbeat intervals the client drops the link and connects afresh.
        assert wait_until(lambda: client.receive(0.05) is None and client.reconnects >= 1, 5.0)
        second = Publisher(endpoint, snapshot_endpoint=snapshot, heartbeat_s=FAST_HEARTBEAT_S)
        with running(second):
            submit_all(second, after)
            got = volume_of(client, "acq-2")
            assert got.publisher_id == second.publisher_id != old_id
    assert got.hu.tobytes() == after[-1].hu.tobytes()  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------- snapshot server


def raw_request(endpoint: str, frames: list[bytes]) -> list[list[bytes]]:
    """Send one request on a bare DEALER and collect the reply up to its end or error."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    replies: list[list[bytes]] = []
    try:
        dealer.send_multipart(frames)
        while dealer.poll(int(WAIT_S * 1000)):
            reply = dealer.recv_multipart()
            replies.append(reply)
            if reply[0] in (TOPIC_SNAPSHOT_END, TOPIC_SNAPSHOT_ERROR):
                break
    finally:
        dealer.close()
    return replies


def test_snapshot_end_carries_the_sequence_number_and_items_in_their_original_order() -> None:
    items = series("acq-x", seed=5, slabs=3)[:5]  # three slabs, two progress messages
    with running(snapshot_publisher()) as publisher:
        submit_all(publisher, items)
        assert wait_until(lambda: publisher.store.slab_count == 3)
        assert publisher.snapshot_endpoint is not None
        replies = raw_request(publisher.snapshot_endpoint, encode_snapshot_request(time.time()))
        current = publisher.sequence
    decoded = [decode_snapshot_reply(r) for r in replies]
    *slabs, end = decoded
    assert [type(m).__name__ for m in slabs] == ["SlabMessage"] * 3
    assert [m.seq for m in slabs] == sorted(m.seq for m in slabs)
    assert end.__class__.__name__ == "SnapshotEnd"
    assert end.items == 3 and end.heartbeat_s == FAST_HEARTBEAT_S  # type: ignore[union-attr]
    assert slabs[-1].seq <= end.seq <= current
    assert [m.hu.tobytes() for m in slabs] == [i.hu.tobytes() for i in items if isinstance(i, SctSlab)]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("frames", "says"),
    [
        ([b"snapshot.request", b"{not json", b""], "UTF-8 JSON"),
        (
            [
                b"snapshot.request",
                b'{"schema":"sct-edge/9.0","topic":"snapshot.request","seq":0,"sent_at":1,"publisher_id":""}',
                b"",
            ],
            "major version",
        ),
        ([b"hello"], "3 frames"),
    ],
)
def test_a_bad_snapshot_request_gets_an_error_naming_what_was_wrong(frames: list[bytes], says: str) -> None:
    with running(snapshot_publisher()) as publisher:
        assert publisher.snapshot_endpoint is not None
        replies = raw_request(publisher.snapshot_endpoint, frames)
        assert publisher.alive
    assert len(replies) == 1 and replies[0][0] == TOPIC_SNAPSHOT_ERROR
    error = decode_snapshot_reply(replies[0])
    assert says in error.error  # type: ignore[union-attr]


def test_the_client_refuses_a_schema_major_it_does_not_know() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        with SctClient(f"tcp://127.0.0.1:{port}", snapshot_endpoint=None) as client:
            header = SCHEMA.replace("/1.", "/2.")
            deadline = time.monotonic() + WAIT_S
            with pytest.raises(SchemaVersionError, match="major version 1"):
                while time.monotonic() < deadline:
                    body = (
                        f'{{"schema":"{header}","topic":"heartbeat","seq":1,"sent_at":1,"publisher_id":"p"}}'
                    )
                    pub.send_multipart([b"heartbeat", body.encode(), b""])
                    client.receive(0.05)
            assert client.rejected >= 1
    finally:
        pub.close(linger=0)


def test_slabs_of_a_stream_that_stopped_without_a_volume_expire_from_snapshots() -> None:
    slab = series("acq-stalled", seed=6, slabs=2)[0]
    store = SnapshotStore(2, expiry_s=0.05)
    store.record(slab, 1, [b"sct.slab", b"{}", b""])
    assert store.slab_count == 1 and len(store.messages()) == 1
    time.sleep(0.1)
    assert store.messages() == [] and store.slab_count == 0


@pytest.mark.parametrize(
    ("endpoint", "snapshot"),
    [
        ("tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557"),
        ("tcp://[::1]:6000", "tcp://[::1]:6001"),
        ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
        ("ipc:///run/sct-agent/pub", "ipc:///run/sct-agent/pub.snapshot"),
    ],
)
def test_the_client_and_the_agent_derive_the_same_default_snapshot_endpoint(
    endpoint: str, snapshot: str
) -> None:
    with SctClient(endpoint) as client:
        assert client.snapshot_endpoint == snapshot
    assert PublishConfig(endpoint=endpoint).snapshot == snapshot
