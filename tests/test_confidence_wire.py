"""The confidence topic (schema 1.4) over real sockets: each slab's and volume's confidence follows it with the
same sequence number, the volume's carries the regions flagged, late joiners get it from snapshots, a lost one
is noticed, and subscribers built for 1.3 see exactly the stream they saw before."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
import zmq
from wire_support import random_hu, running, sample_slab, sample_volume, wait_until, with_confidence

from agent.client import SctClient
from agent.publish.publisher import Publisher
from agent.publish.wire import (
    ALL_TOPICS,
    TOPIC_CONFIDENCE,
    TOPIC_SNAPSHOT_END,
    ChecksumError,
    ConfidenceMessage,
    SlabMessage,
    VolumeMessage,
    WireError,
    decode,
    decode_snapshot_reply,
    encode,
    encode_confidence,
    encode_heartbeat,
    encode_snapshot_request,
)
from agent.records import SctSlab, SctVolume, UntrustedRegion
from sct_core.geometry import VolumeGeometry

pytestmark = pytest.mark.usefixtures("no_thread_leaks")

WAIT_S = 15.0
DEPTH = 4
SLABS = 3
PUBLISHER = "0123456789abcdef"
REGION = UntrustedRegion(1, 5, 9, 10, 20, 4, 12, 320, 0.307, 11)


def grid(slices: int = SLABS * DEPTH) -> VolumeGeometry:
    return VolumeGeometry(
        shape=(slices, 32, 24),
        spacing=(1.2, 0.8, 0.8),
        origin=(-20.0, 10.0, 30.0),
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        slice_direction=(-1.0, 0.0, 0.0),
    )


def confidence_of(shape: tuple[int, ...], seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


def flagged_series(acquisition_id: str, seed: int) -> tuple[list[SctSlab | SctVolume], npt.NDArray[np.uint8]]:
    """Slabs and the volume of one acquisition, each with its confidence; the volume with one region."""
    geometry = grid()
    hu = random_hu(geometry.shape, seed)
    confidence = confidence_of(geometry.shape, seed)
    items: list[SctSlab | SctVolume] = []
    for k in range(SLABS):
        part = slice(k * DEPTH, (k + 1) * DEPTH)
        slab = sample_slab(geometry, np.ascontiguousarray(hu[part]), start=k * DEPTH, index=k, count=SLABS,
                           acquisition_id=acquisition_id)  # fmt: skip
        items.append(with_confidence(slab, np.ascontiguousarray(confidence[part])))
    volume = sample_volume(geometry, hu, slab_count=SLABS, acquisition_id=acquisition_id)
    items.append(with_confidence(volume, confidence, regions=(REGION,)))
    return items, confidence


def as_bytes(frames: Sequence[bytes | memoryview] | None) -> list[bytes]:
    assert frames is not None
    return [bytes(f) for f in frames]


# ------------------------------------------------------------------------------------------------ encoding


def test_a_slabs_confidence_follows_it_with_its_seq_grid_and_placement() -> None:
    items, confidence = flagged_series("acq-c1", 1)
    slab = items[1]
    assert isinstance(slab, SctSlab)
    data = decode(as_bytes(encode(slab, 41, PUBLISHER, 5.0)))
    companion = decode(as_bytes(encode_confidence(slab, 41, PUBLISHER, 5.0)))

    assert isinstance(data, SlabMessage) and isinstance(companion, ConfidenceMessage)
    assert data.confidence_sha256 == companion.sha256 == slab.confidence_sha256
    assert (companion.seq, companion.accompanies, companion.is_volume) == (41, "sct.slab", False)
    assert companion.geometry == data.geometry
    assert (companion.slab_index, companion.slab_count, companion.start, companion.size) == (1, 3, 4, 4)
    assert companion.confidence.tobytes() == confidence[4:8].tobytes()
    assert not companion.confidence.flags.writeable
    assert (companion.method, companion.threshold, companion.flagged) == ("feature-mahalanobis", 64, None)


def test_the_volumes_confidence_carries_the_regions_flagged() -> None:
    items, confidence = flagged_series("acq-c2", 2)
    volume = items[-1]
    assert isinstance(volume, SctVolume)
    header = json.loads(as_bytes(encode(volume, 7, PUBLISHER, 5.0))[1])
    assert header["confidence"] == {"sha256": volume.confidence_sha256, "dtype": "|u1",
                                    "method": "feature-mahalanobis", "threshold": 64}  # fmt: skip
    companion = decode(as_bytes(encode_confidence(volume, 7, PUBLISHER, 5.0)))

    assert isinstance(companion, ConfidenceMessage) and companion.is_volume
    assert (companion.flagged, companion.regions) == (1, (REGION,))
    assert companion.confidence.tobytes() == confidence.tobytes()


def test_without_confidence_the_header_says_null_and_nothing_follows() -> None:
    geometry = grid()
    volume = sample_volume(geometry, random_hu(geometry.shape, 3), slab_count=1)

    assert json.loads(as_bytes(encode(volume, 1, PUBLISHER, 0.0))[1])["confidence"] is None
    assert encode_confidence(volume, 1, PUBLISHER, 0.0) is None
    decoded = decode(as_bytes(encode(volume, 1, PUBLISHER, 0.0)))
    assert isinstance(decoded, VolumeMessage) and decoded.confidence_sha256 is None


def altered(frames: list[bytes], **changes: object) -> list[bytes]:
    header = json.loads(frames[1])
    header.update(changes)
    return [frames[0], json.dumps(header).encode(), frames[2]]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"dtype": "<i2"}, "dtype"),
        ({"units": "HU"}, "units"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": 256}, "threshold"),
        ({"accompanies": "status"}, "accompanies"),
        ({"synthetic": False}, "synthetic"),
        ({"flagged": 2}, "regions"),
        ({"regions": [{**REGION.as_json(), "slices": [5, 99]}]}, "regions[0].slices"),
        ({"regions": [{**REGION.as_json(), "min_confidence": 300}]}, "regions[0].min_confidence"),
        ({"shape": [12, 32, 25]}, "shape"),
    ],
)
def test_a_confidence_message_that_breaks_a_rule_is_refused_naming_the_field(
    changes: dict[str, object], field: str
) -> None:
    items, _ = flagged_series("acq-c3", 4)
    frames = as_bytes(encode_confidence(items[-1], 3, PUBLISHER, 0.0))

    with pytest.raises(WireError) as refused:
        decode(altered(frames, **changes))
    assert refused.value.attribute == field


def test_a_confidence_payload_that_does_not_match_its_sha256_is_refused() -> None:
    items, _ = flagged_series("acq-c4", 5)
    frames = as_bytes(encode_confidence(items[0], 3, PUBLISHER, 0.0))
    damaged = bytearray(frames[2])
    damaged[0] ^= 0xFF

    with pytest.raises(ChecksumError):
        decode([frames[0], frames[1], bytes(damaged)])


# ------------------------------------------------------------------------------------------------ sockets


def publisher(heartbeat_s: float = 0.1) -> Publisher:
    return Publisher(
        "tcp://127.0.0.1:0", snapshot_endpoint="tcp://127.0.0.1:0", heartbeat_s=heartbeat_s, send_hwm=200
    )


def test_the_client_gets_each_volume_with_its_confidence_and_regions_live_and_by_snapshot() -> None:
    first, first_confidence = flagged_series("acq-live", 6)
    second, second_confidence = flagged_series("acq-late", 7)
    with running(publisher()) as agent:
        assert agent.snapshot_endpoint is not None
        with SctClient(agent.endpoint, snapshot_endpoint=agent.snapshot_endpoint) as live:
            time.sleep(0.3)  # the subscription reaches the publisher
            for item in first:
                agent.submit(item)
            delivered = []
            deadline = time.monotonic() + WAIT_S
            while not live.completed_volumes and time.monotonic() < deadline:
                delivered.append(live.receive(0.5))
            delivered.extend(iter(lambda: live.receive(0), None))  # what is already in hand
            volume = live.pop_volume()
            assert volume is not None and volume.confidence is not None
            assert volume.confidence.tobytes() == first_confidence.tobytes()
            assert (volume.flagged, volume.regions, volume.confidence_threshold) == (1, (REGION,), 64)
            assert volume.complete_from_slabs and volume.matches_volume_message and live.gap_count == 0
            # Each data message is handed over with its confidence message right behind it.
            kinds = [type(m).__name__ for m in delivered if isinstance(m, SlabMessage | VolumeMessage |
                                                                        ConfidenceMessage)]  # fmt: skip
            assert kinds == ["SlabMessage", "ConfidenceMessage"] * SLABS + [
                "VolumeMessage",
                "ConfidenceMessage",
            ]
            for item in second:
                agent.submit(item)
            assert wait_until(lambda: agent.store.volume_count == 2)
        # A robot that joins now gets both volumes, each with its confidence, from the snapshot.
        with SctClient(agent.endpoint, snapshot_endpoint=agent.snapshot_endpoint) as late:
            volumes = [late.receive_volume(WAIT_S), late.receive_volume(WAIT_S)]
    assert [v.acquisition_id for v in volumes if v is not None] == ["acq-live", "acq-late"]
    late_volume = volumes[1]
    assert late_volume is not None and late_volume.from_snapshot and late_volume.confidence is not None
    assert late_volume.confidence.tobytes() == second_confidence.tobytes()
    assert late_volume.flagged == 1 and late_volume.regions == (REGION,)


def test_a_1_3_subscriber_sees_an_unbroken_sequence_and_a_1_3_snapshot_holds_no_confidence() -> None:
    """What a 1.3 robot does: subscribe to the four topics, count, and ask for snapshots as 1.3."""
    items, _ = flagged_series("acq-old", 8)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with running(publisher(heartbeat_s=5.0)) as agent:  # quiet between messages: receive_all ends
        old = context.socket(zmq.SUB)
        everything = context.socket(zmq.SUB)
        try:
            for topic in ALL_TOPICS:
                old.setsockopt(zmq.SUBSCRIBE, topic)
            everything.setsockopt(zmq.SUBSCRIBE, b"")
            old.connect(agent.endpoint)
            everything.connect(agent.endpoint)
            time.sleep(0.3)
            for item in items:
                agent.submit(item)
            assert wait_until(lambda: agent.store.volume_count == 1)
            seen = receive_all(old)
            heard = receive_all(everything)
            request = old_snapshot(context, agent)
        finally:
            old.close(linger=0)
            everything.close(linger=0)
    sequenced = [(t, s) for t, s in heard if t != TOPIC_CONFIDENCE]
    assert [t for t, _ in seen] == [t for t, _ in sequenced]
    assert TOPIC_CONFIDENCE not in {t for t, _ in seen}
    numbers = [s for _, s in seen]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # no gap for a 1.3 subscriber
    # Every confidence message sits right behind its data message, with that message's number.
    for position, (topic, seq) in enumerate(heard):
        if topic == TOPIC_CONFIDENCE:
            assert heard[position - 1] in ((b"sct.slab", seq), (b"sct.volume", seq))
    assert sum(t == TOPIC_CONFIDENCE for t, _ in heard) == SLABS + 1
    topics, end = request
    assert TOPIC_CONFIDENCE not in topics and end["items"] == len(topics) == 1  # the volume alone


def receive_all(socket: zmq.Socket[bytes]) -> list[tuple[bytes, int]]:
    """(topic, seq) of every message queued on ``socket`` until it stays quiet for 0.3 s."""
    out = []
    while socket.poll(300):
        frames = socket.recv_multipart()
        if frames[0] != b"heartbeat":
            out.append((frames[0], int(json.loads(frames[1])["seq"])))
    return out


def old_snapshot(
    context: zmq.Context[zmq.Socket[bytes]], agent: Publisher
) -> tuple[list[bytes], dict[str, int]]:
    """A snapshot asked for as a 1.3 client asks: topics of the reply, and its end."""
    dealer = context.socket(zmq.DEALER)
    try:
        assert agent.snapshot_endpoint is not None
        dealer.connect(agent.snapshot_endpoint)
        request = as_bytes(encode_snapshot_request(time.time(), reason="join"))
        header = json.loads(request[1])
        header["schema"] = "sct-edge/1.3"
        dealer.send_multipart([request[0], json.dumps(header).encode(), request[2]])
        topics: list[bytes] = []
        while True:
            assert dealer.poll(int(WAIT_S * 1000))
            frames = dealer.recv_multipart()
            decode_snapshot_reply(frames)
            if frames[0] == TOPIC_SNAPSHOT_END:
                return topics, json.loads(frames[1])
            topics.append(frames[0])
    finally:
        dealer.close(linger=0)


def test_a_confidence_message_that_does_not_come_is_counted_as_lost() -> None:
    """A publisher of our own on a raw PUB socket: a slab announces its confidence, the next message is a
    heartbeat. The subscriber (without snapshots, so it only records) counts one message lost."""
    items, _ = flagged_series("acq-lost", 9)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{port}"
        with SctClient(endpoint, snapshot_endpoint=None) as client:
            time.sleep(0.3)
            pub.send_multipart(encode(items[0], 1, PUBLISHER, time.time()))
            pub.send_multipart(encode_heartbeat(2, PUBLISHER, time.time(), 1.0))
            pub.send_multipart(encode(items[1], 3, PUBLISHER, time.time()))
            pub.send_multipart(encode_confidence(items[1], 3, PUBLISHER, time.time()) or [])
            pub.send_multipart(encode_heartbeat(4, PUBLISHER, time.time(), 1.0))
            received = [m for m in iter(lambda: client.receive(1.0), None)]
            assert (client.gap_count, client.missed) == (1, 1)
    finally:
        pub.close(linger=0)
    assert [type(m).__name__ for m in received] == [
        "SlabMessage", "HeartbeatMessage", "SlabMessage", "ConfidenceMessage", "HeartbeatMessage",
    ]  # fmt: skip
