"""The wire format: round trips of every message kind, integrity, schema versions and malformed input."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from wire_support import random_hu, sample_slab, sample_volume

from agent.publish.wire import (
    AXES,
    FORBIDDEN_KEYS,
    SCHEMA,
    TOPIC_HEARTBEAT,
    TOPIC_SLAB,
    TOPIC_STATUS,
    TOPIC_VOLUME,
    ChecksumError,
    HeartbeatMessage,
    SchemaVersionError,
    SlabMessage,
    StatusMessage,
    VolumeMessage,
    WireError,
    decode,
    encode,
    encode_heartbeat,
)
from agent.records import Reason, SctSlab, SctVolume, StatusEvent, Verdict
from agent.status_events import progress_event, verdict_event
from agent.vocabulary import Outcome
from sct_core.geometry import Orientation, VolumeGeometry

PUBLISHER = "0123456789abcdef"


def make_geometry(*, oblique_deg: float = 0.0) -> VolumeGeometry:
    """6 slices of 8 x 10 voxels, anisotropic spacing and an off-centre origin so no axis can be confused."""
    return VolumeGeometry.from_fov(
        center=(12.5, -40.25, 103.0),
        fov_mm=(8 * 0.9, 10 * 0.8, 6 * 2.0),
        voxel_mm=(0.9, 0.8, 2.0),
        orientation=Orientation.SAGITTAL,
        oblique_deg=oblique_deg,
    )


def make_hu(shape: tuple[int, ...], seed: int = 0) -> npt.NDArray[np.int16]:
    return random_hu(shape, seed)


def make_slab(
    geometry: VolumeGeometry, hu: npt.NDArray[np.int16], start: int, size: int, index: int
) -> SctSlab:
    return sample_slab(geometry, hu[start : start + size], start=start, index=index, count=2)


def make_volume(geometry: VolumeGeometry, hu: npt.NDArray[np.int16]) -> SctVolume:
    return sample_volume(geometry, hu, slab_count=2)


def make_verdict() -> Verdict:
    return Verdict(
        acquisition_id="acq-1f3e",
        protocol_id="lumbar-dual-echo-v1",
        protocol_version="1",
        outcome=Outcome.REJECT,
        final=True,
        reasons=(
            Reason("lumbar-dual-echo-v1", "EchoTime2", "5.1", "4.6 to 4.8 ms", "timing"),
            Reason("lumbar-dual-echo-v1", "FlipAngle", "25", "8 to 12 deg", "timing"),
        ),
        pending=(),
        decided_at=999.0,
    )


def as_bytes(frames: list[bytes | memoryview]) -> list[bytes]:
    return [bytes(f) for f in frames]


def header_of(frames: list[bytes | memoryview]) -> dict[str, Any]:
    header = json.loads(bytes(frames[1]))
    assert isinstance(header, dict)
    return header


def with_header(frames: list[bytes | memoryview], **changes: Any) -> list[bytes]:
    header = header_of(frames)
    header.update(changes)
    return [bytes(frames[0]), json.dumps(header).encode(), bytes(frames[2])]


def without(frames: list[bytes | memoryview], dotted: str) -> list[bytes]:
    header = header_of(frames)
    *parents, last = dotted.split(".")
    node = header
    for key in parents:
        node = node[key]
    del node[last]
    return [bytes(frames[0]), json.dumps(header).encode(), bytes(frames[2])]


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("oblique_deg", [0.0, 17.0])
def test_slab_round_trip_keeps_voxels_and_geometry(oblique_deg: float) -> None:
    geometry = make_geometry(oblique_deg=oblique_deg)
    hu = make_hu(geometry.shape)
    slab = make_slab(geometry, hu, start=4, size=2, index=1)

    frames = encode(slab, 7, PUBLISHER, 1234.5)
    message = decode(as_bytes(frames))

    assert isinstance(message, SlabMessage)
    assert bytes(frames[0]) == TOPIC_SLAB
    assert (message.schema, message.seq, message.sent_at, message.publisher_id) == (
        SCHEMA,
        7,
        1234.5,
        PUBLISHER,
    )
    assert (message.slab_index, message.slab_count, message.start, message.size) == (1, 2, 4, 2)
    assert message.hu.dtype == np.dtype("<i2")
    assert message.hu.shape == (2, 8, 10)
    assert message.hu.tobytes() == hu[4:6].tobytes()
    assert not message.hu.flags.writeable
    assert message.geometry.shape == geometry.shape
    assert message.geometry.spacing == geometry.spacing
    np.testing.assert_allclose(message.geometry.affine, geometry.affine, rtol=0, atol=1e-12)
    np.testing.assert_allclose(message.geometry.origin, geometry.origin, rtol=0, atol=1e-12)
    assert (message.acquisition_id, message.protocol_id) == ("acq-1f3e", "lumbar-dual-echo-v1")
    assert (message.model_id, message.model_version) == ("sct-unet", "1.2.0")
    assert (message.inputs_complete_at, message.produced_at) == (1000.25, 1001.5)
    assert message.sha256 == slab.sha256


def test_slab_header_layout() -> None:
    geometry = make_geometry()
    hu = make_hu(geometry.shape)
    header = header_of(encode(make_slab(geometry, hu, 0, 4, 0), 3, PUBLISHER, 5.0))

    assert header["schema"] == "sct-edge/1.4"
    assert header["topic"] == "sct.slab"
    assert header["volume"]["shape"] == [6, 8, 10]
    assert header["volume"]["spacing_mm"] == [2.0, 0.9, 0.8]
    assert header["volume"]["axes"] == AXES == "slice,row,column"
    assert header["volume"]["affine_lps"] == geometry.affine.tolist()
    assert header["slab"] == {"index": 0, "count": 2, "start": 0, "size": 4}
    assert header["shape"] == [4, 8, 10]
    assert (header["dtype"], header["units"], header["synthetic"]) == ("<i2", "HU", True)
    assert header["model"] == {"id": "sct-unet", "version": "1.2.0"}


def test_affine_maps_voxel_index_to_lps_mm() -> None:
    """The transmitted matrix sends (slice, row, column) to the DICOM ImagePositionPatient of that voxel."""
    geometry = make_geometry(oblique_deg=10.0)
    header = header_of(encode(make_volume(geometry, make_hu(geometry.shape)), 1, PUBLISHER, 0.0))
    affine = np.array(header["volume"]["affine_lps"])

    for k in (0, 3, 5):
        np.testing.assert_allclose(
            affine @ (k, 0, 0, 1), (*geometry.image_position_patient(k), 1.0), atol=1e-9
        )
    step_along_row = affine @ (0, 0, 1, 1) - affine @ (0, 0, 0, 1)
    np.testing.assert_allclose(step_along_row[:3], np.array(geometry.row_direction) * 0.8, atol=1e-12)


def test_volume_round_trip() -> None:
    geometry = make_geometry()
    hu = make_hu(geometry.shape, seed=3)

    frames = encode(make_volume(geometry, hu), 12, PUBLISHER, 99.0)
    message = decode(as_bytes(frames))

    assert isinstance(message, VolumeMessage)
    assert bytes(frames[0]) == TOPIC_VOLUME
    assert header_of(frames)["slab"] == {"index": 0, "count": 1, "start": 0, "size": 6}
    assert message.stitched_from_slabs == 2
    assert message.hu.tobytes() == hu.tobytes()
    assert message.geometry == geometry


def test_status_round_trip_carries_every_reason() -> None:
    event = verdict_event(make_verdict())

    frames = encode(event, 2, PUBLISHER, 10.0)
    message = decode(as_bytes(frames))

    assert isinstance(message, StatusMessage)
    assert bytes(frames[0]) == TOPIC_STATUS
    assert bytes(frames[2]) == b""
    assert (message.kind, message.acquisition_id, message.at) == ("verdict", "acq-1f3e", 999.0)
    assert message.body["outcome"] == "reject"
    assert [r["attribute"] for r in message.body["reasons"]] == ["EchoTime2", "FlipAngle"]
    assert (
        message.body["reasons"][0]["text"]
        == "EchoTime2: found 5.1, required 4.6 to 4.8 ms (protocol lumbar-dual-echo-v1)"
    )


def test_status_body_may_hold_numpy_values() -> None:
    event = StatusEvent(
        "progress", None, {"slabs_done": np.int64(3), "hu_range": np.array([-1000, 3000])}, 1.0
    )

    message = decode(as_bytes(encode(event, 1, PUBLISHER, 1.0)))

    assert isinstance(message, StatusMessage)
    assert message.acquisition_id is None
    assert dict(message.body) == {"slabs_done": 3, "hu_range": [-1000, 3000]}


def test_heartbeat_round_trip() -> None:
    frames = encode_heartbeat(41, PUBLISHER, 77.5)

    assert bytes(frames[0]) == TOPIC_HEARTBEAT
    assert decode(as_bytes(frames)) == HeartbeatMessage(SCHEMA, 41, 77.5, PUBLISHER)


def test_payload_frame_is_the_array_not_a_copy() -> None:
    geometry = make_geometry()
    hu = make_hu(geometry.shape)

    payload = encode(make_volume(geometry, hu), 1, PUBLISHER, 0.0)[2]

    assert isinstance(payload, memoryview)
    assert np.shares_memory(np.frombuffer(payload, dtype=np.uint8), hu)


def test_decoded_array_is_a_view_of_the_frame() -> None:
    geometry = make_geometry()
    frames = as_bytes(encode(make_volume(geometry, make_hu(geometry.shape)), 1, PUBLISHER, 0.0))

    message = decode(frames)

    assert isinstance(message, VolumeMessage)
    assert np.shares_memory(message.hu, np.frombuffer(frames[2], dtype=np.uint8))


def test_big_endian_or_strided_input_is_sent_little_endian() -> None:
    geometry = make_geometry()
    hu = make_hu(geometry.shape)
    awkward = np.asfortranarray(hu.astype(">i2"))

    message = decode(as_bytes(encode(make_volume(geometry, awkward), 1, PUBLISHER, 0.0)))

    assert isinstance(message, VolumeMessage)
    assert message.hu.tobytes() == hu.astype("<i2").tobytes()


# -------------------------------------------------------------------------------------------- no identifiers


def all_keys(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from all_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from all_keys(item)


def test_no_patient_identifiers_on_the_wire() -> None:
    geometry = make_geometry()
    hu = make_hu(geometry.shape)
    messages = [
        encode(make_slab(geometry, hu, 0, 3, 0), 1, PUBLISHER, 0.0),
        encode(make_volume(geometry, hu), 2, PUBLISHER, 0.0),
        encode(verdict_event(make_verdict()), 3, PUBLISHER, 0.0),
        encode(progress_event("acq-1f3e", slabs_done=1, slab_count=2, at=0.0), 4, PUBLISHER, 0.0),
        encode_heartbeat(5, PUBLISHER, 0.0),
    ]
    keys = {key for frames in messages for key in all_keys(header_of(frames))}

    assert "acquisition_id" in keys  # the walk does reach into the headers
    assert keys.isdisjoint(FORBIDDEN_KEYS)
    assert sorted(FORBIDDEN_KEYS) == [
        "AccessionNumber",
        "FrameOfReferenceUID",
        "PatientBirthDate",
        "PatientID",
        "PatientName",
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "StudyInstanceUID",
    ]


@pytest.mark.parametrize("key", sorted(FORBIDDEN_KEYS))
def test_status_body_with_a_patient_identifier_is_refused(key: str) -> None:
    event = StatusEvent("error", "acq-1f3e", {"details": [{key: "value"}]}, 0.0)

    with pytest.raises(WireError, match=rf"header\.body\.details\[0\]\.{key}"):
        encode(event, 1, PUBLISHER, 0.0)


# ---------------------------------------------------------------------------------------------- integrity


def test_flipped_payload_byte_raises_checksum_error_naming_both_digests() -> None:
    geometry = make_geometry()
    hu = make_hu(geometry.shape)
    frames = as_bytes(encode(make_slab(geometry, hu, 0, 3, 0), 5, PUBLISHER, 0.0))
    tampered = bytearray(frames[2])
    tampered[len(tampered) // 2] ^= 0x01
    expected = header_of(list(frames))["sha256"]

    with pytest.raises(ChecksumError) as caught:
        decode([frames[0], frames[1], bytes(tampered)])

    found = caught.value.found_digest
    assert caught.value.expected_digest == expected
    assert found != expected and len(found) == 64
    assert expected in str(caught.value) and found in str(caught.value)
    assert "seq 5" in str(caught.value)


def test_verify_can_be_deferred() -> None:
    geometry = make_geometry()
    frames = as_bytes(encode(make_volume(geometry, make_hu(geometry.shape)), 1, PUBLISHER, 0.0))
    tampered = bytearray(frames[2])
    tampered[0] ^= 0x80

    message = decode([frames[0], frames[1], bytes(tampered)], verify=False)

    assert isinstance(message, VolumeMessage)
    with pytest.raises(ChecksumError):
        message.verify()


def test_record_with_a_malformed_digest_is_refused() -> None:
    geometry = make_geometry()
    hu = make_hu(geometry.shape)
    volume = make_volume(geometry, hu)
    bad = SctVolume(**{f: getattr(volume, f) for f in SctVolume.__dataclass_fields__} | {"sha256": "abc"})

    with pytest.raises(WireError, match="'sha256': found 'abc'"):
        encode(bad, 1, PUBLISHER, 0.0)


# ------------------------------------------------------------------------------------------------ schema


def test_unknown_schema_major_is_refused() -> None:
    frames = encode_heartbeat(1, PUBLISHER, 0.0)

    with pytest.raises(
        SchemaVersionError, match=r"'schema': found 'sct-edge/2\.0', expected major version 1"
    ):
        decode(with_header(frames, schema="sct-edge/2.0"))


def test_newer_minor_version_is_accepted() -> None:
    frames = encode_heartbeat(1, PUBLISHER, 0.0)

    message = decode(with_header(frames, schema="sct-edge/1.7", added_in_1_7={"x": 1}))

    assert message.schema == "sct-edge/1.7"


@pytest.mark.parametrize("schema", ["sct-edge/1.0", "sct-edge/1.2", "sct-edge/1.3"])
def test_older_minor_version_is_accepted(schema: str) -> None:
    """A 1.4 decoder reads what a 1.3 (or 1.0) publisher sends: minors only add fields."""
    message = decode(with_header(encode_heartbeat(1, PUBLISHER, 0.0), schema=schema))

    assert message.schema == schema


@pytest.mark.parametrize("schema", ["other/1.0", "sct-edge", "sct-edge/1", "1.0"])
def test_foreign_schema_is_refused(schema: str) -> None:
    with pytest.raises(WireError, match="'schema'"):
        decode(with_header(encode_heartbeat(1, PUBLISHER, 0.0), schema=schema))


# ---------------------------------------------------------------------------------------------- malformed


def slab_frames() -> list[bytes | memoryview]:
    geometry = make_geometry()
    return encode(make_slab(geometry, make_hu(geometry.shape), 2, 2, 1), 9, PUBLISHER, 0.0)


def test_wrong_frame_count_is_refused() -> None:
    frames = as_bytes(slab_frames())

    with pytest.raises(WireError, match="'frames': found 2, expected 3 frames"):
        decode(frames[:2])


def test_unknown_topic_is_refused() -> None:
    frames = as_bytes(slab_frames())

    with pytest.raises(WireError, match=re.escape("'topic': found b'sct.mesh'")):
        decode([b"sct.mesh", frames[1], frames[2]])


def test_topic_frame_and_header_must_agree() -> None:
    frames = as_bytes(slab_frames())

    with pytest.raises(WireError, match=re.escape("'topic': found 'sct.slab', expected 'sct.volume'")):
        decode([TOPIC_VOLUME, frames[1], frames[2]])


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_bad_json_is_refused(header: bytes) -> None:
    with pytest.raises(WireError, match="'header'"):
        decode([TOPIC_HEARTBEAT, header, b""])


@pytest.mark.parametrize(
    "field",
    [
        "seq",
        "sent_at",
        "publisher_id",
        "acquisition_id",
        "sha256",
        "shape",
        "dtype",
        "synthetic",
        "volume.affine_lps",
        "volume.spacing_mm",
        "volume.shape",
        "slab.start",
        "model.version",
        "inputs_complete_at",
    ],
)
def test_missing_field_is_named(field: str) -> None:
    with pytest.raises(WireError, match=re.escape(f"'{field}': found 'missing'")):
        decode(without(slab_frames(), field))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"seq": 0}, "seq"),
        ({"seq": "9"}, "seq"),
        ({"seq": True}, "seq"),
        ({"sent_at": "now"}, "sent_at"),
        ({"dtype": "<f4"}, "dtype"),
        ({"units": "mm"}, "units"),
        ({"synthetic": False}, "synthetic"),
        ({"shape": [2, 8]}, "shape"),
        ({"slab": {"index": 2, "count": 2, "start": 2, "size": 2}}, "slab.index"),
        ({"slab": {"index": 1, "count": 2, "start": 5, "size": 2}}, "slab.start/size"),
    ],
)
def test_wrong_field_value_is_named(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(WireError, match=re.escape(f"'{field}': found")):
        decode(with_header(slab_frames(), **changes))


def test_shape_that_does_not_match_the_payload_length_is_refused() -> None:
    frames = as_bytes(slab_frames())

    with pytest.raises(
        WireError, match=r"'shape': found \[2, 8, 10\], expected a shape matching the 318-byte"
    ):
        decode([frames[0], frames[1], frames[2][:-2]])


def test_affine_that_is_not_a_rotation_times_spacing_is_refused() -> None:
    header = header_of(slab_frames())
    affine = header["volume"]["affine_lps"]
    affine[0][0] *= 3.0

    with pytest.raises(WireError, match=re.escape("'volume.affine_lps'")):
        decode(with_header(slab_frames(), volume=header["volume"] | {"affine_lps": affine}))


def test_payload_on_a_heartbeat_is_refused() -> None:
    frames = as_bytes(encode_heartbeat(1, PUBLISHER, 0.0))

    with pytest.raises(WireError, match="'payload': found '4 bytes'"):
        decode([frames[0], frames[1], b"abcd"])


def test_record_whose_array_does_not_fit_its_slab_is_refused() -> None:
    geometry = make_geometry()
    hu = make_hu(geometry.shape)
    slab = make_slab(geometry, hu, 0, 3, 0)
    wrong = SctSlab(**{f: getattr(slab, f) for f in SctSlab.__dataclass_fields__} | {"size": 2})

    with pytest.raises(WireError, match=r"'SctSlab.hu.shape': found \(3, 8, 10\), expected \(2, 8, 10\)"):
        encode(wrong, 1, PUBLISHER, 0.0)


def test_float_array_is_refused() -> None:
    geometry = make_geometry()
    volume = make_volume(geometry, make_hu(geometry.shape))
    floats = SctVolume(
        **{f: getattr(volume, f) for f in SctVolume.__dataclass_fields__} | {"hu": np.zeros(geometry.shape)}
    )

    with pytest.raises(WireError, match=re.escape("'SctVolume.hu.dtype': found 'float64', expected int16")):
        encode(floats, 1, PUBLISHER, 0.0)


def test_sequence_numbers_start_at_one() -> None:
    with pytest.raises(WireError, match="'seq': found 0"):
        encode_heartbeat(0, PUBLISHER, time.time())
