"""The wire format of the sCT publisher: one module owns it, the publisher and the subscriber library share it.

Every message is three ZeroMQ frames (docs/protocol.md §2, the zguide Clone pattern, pyzmq's ``send_array``):

1. the topic, a byte prefix SUB sockets filter on: ``status``, ``sct.slab``, ``sct.volume``, ``heartbeat``;
2. a JSON header (UTF-8) with the schema version, a publisher-wide sequence number, the sending publisher's
   random id, and for data messages the full-volume geometry, the slab's place in the volume, dtype, units,
   sha256 of the payload, model and protocol ids and an explicit ``synthetic`` flag;
3. the payload: the int16 HU voxels as raw little-endian bytes, C order ``[slice, row, column]``; empty for
   status and heartbeat messages.

The sequence number counts every message a publisher sends (heartbeats included), so a subscriber that
listens to all four topics and sees a number skipped knows it lost something. ``publisher_id`` changes when the
publisher restarts, which tells a subscriber to start counting afresh.

A volume message is framed like a slab that covers the whole volume: ``slab`` is ``{index 0, count 1, start 0,
size slices}`` so a consumer may treat both alike; ``stitched_from_slabs`` says how many ``sct.slab`` messages
preceded it.

Since 1.4 a slab or volume of a model with a confidence output is followed by a ``confidence`` message: the
same geometry and placement, a uint8 payload (255 = as typical as the calibration data), the method and the
calibrated threshold, and for the volume the regions flagged. It reuses the ``seq`` of the ``sct.slab`` or
``sct.volume`` it accompanies instead of taking a number of its own, so the sequence of the four topics above is
unchanged and a 1.3 subscriber, which does not subscribe to ``confidence``, sees no gap; a 1.4 subscriber knows
one is due from the ``confidence`` field of the data message's header (its sha256) and resynchronises if it does
not come next.

The snapshot exchange (the Clone pattern's state request; schema 1.1) uses the same three-frame messages on a
second socket: a subscriber sends ``snapshot.request``; the publisher answers with the stored ``sct.volume`` and
``sct.slab`` messages exactly as they were first sent (same header, same seq, same payload), then
``snapshot.end`` whose ``seq`` is the last sequence number the snapshot reflects, or ``snapshot.error``.
``docs/protocol.md`` is the specification; this module is its implementation.

Nothing here carries a patient name, ID, birth date, accession number or DICOM instance UID: the records have
none (an acquisition is named by its opaque ``acquisition_id``), and :func:`encode` refuses a status body that
tries to smuggle one in under its DICOM keyword.

One module on purpose: the encoder and the decoder of every message sit side by side, so a field cannot be
written one way and read another, and docs/protocol.md has a single module to be checked against.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import zmq

from agent.records import (
    CONFIDENCE_DTYPE,
    PAYLOAD_DTYPE,
    Publication,
    SctSlab,
    SctVolume,
    StatusEvent,
    UntrustedRegion,
)
from sct_core.errors import SctError
from sct_core.geometry import VolumeGeometry

# ----------------------------------------------------------------------------------------------- constants

#: Schema name and version. A decoder accepts any minor version of its major (minors only add fields).
SCHEMA_NAME: Final = "sct-edge"
SCHEMA_MAJOR: Final = 1
#: 1.1 added the snapshot exchange and ``heartbeat_s`` in heartbeats; 1.2 the status kind ``watch`` and why a
#: subscriber asks for a snapshot (``reason``, ``missed`` in ``snapshot.request``); 1.3 the status kind
#: ``received`` and the console's series number and description in verdicts; 1.4 the ``confidence`` topic (a
#: companion of the data messages, outside the sequence), the ``confidence`` field of data messages and the
#: status kind ``flagged``.
SCHEMA_MINOR: Final = 4
SCHEMA: Final = f"{SCHEMA_NAME}/{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

TOPIC_STATUS: Final = b"status"
TOPIC_SLAB: Final = b"sct.slab"
TOPIC_VOLUME: Final = b"sct.volume"
TOPIC_HEARTBEAT: Final = b"heartbeat"
#: Every topic of the broadcast sequence; a subscriber must take all of them for sequence gaps to mean loss.
#: The set is fixed within a major version: a new sequenced topic would look like loss to every older subscriber.
ALL_TOPICS: Final = (TOPIC_STATUS, TOPIC_SLAB, TOPIC_VOLUME, TOPIC_HEARTBEAT)
#: 1.4: the per-voxel confidence of a slab or volume, sent right after it with its ``seq`` (not a new number).
TOPIC_CONFIDENCE: Final = b"confidence"
#: What a 1.4 subscriber subscribes to: the sequenced topics and the confidence companion.
SUBSCRIBED_TOPICS: Final = (*ALL_TOPICS, TOPIC_CONFIDENCE)
#: The first minor version that knows the confidence topic: snapshot replies carry confidence messages only to
#: requests of this minor or later (a 1.3 client would refuse the unknown topic and count its reply incomplete).
CONFIDENCE_MINOR: Final = 4
#: The snapshot exchange, on the snapshot socket only (never broadcast).
TOPIC_SNAPSHOT_REQUEST: Final = b"snapshot.request"
TOPIC_SNAPSHOT_END: Final = b"snapshot.end"
TOPIC_SNAPSHOT_ERROR: Final = b"snapshot.error"
SNAPSHOT_TOPICS: Final = (TOPIC_SNAPSHOT_REQUEST, TOPIC_SNAPSHOT_END, TOPIC_SNAPSHOT_ERROR)
#: Why a subscriber asks for a snapshot (``snapshot.request`` ``reason``, schema 1.2): it joins, it connected
#: afresh after silence, it saw a sequence gap (``missed`` says how many messages), the publisher changed, the
#: last snapshot arrived incomplete, or the application asked. A receiver accepts other values (later minors).
SNAPSHOT_REASONS: Final = ("join", "reconnect", "gap", "publisher_changed", "incomplete", "application")

#: Payload dtype (numpy's notation: little-endian signed 16-bit), units and axis order.
WIRE_DTYPE: Final = PAYLOAD_DTYPE
UNITS: Final = "HU"
#: The confidence payload: one unsigned byte per voxel, 0 (far outside the calibration data) to 255.
CONFIDENCE_WIRE_DTYPE: Final = CONFIDENCE_DTYPE
CONFIDENCE_UNITS: Final = "confidence"
CONFIDENCE_RANGE: Final = (0, 255)
AXES: Final = "slice,row,column"
FRAME_COUNT: Final = 3

#: A header is a few kB; anything far larger is not one of ours and is refused before parsing.
MAX_HEADER_BYTES: Final = 256 * 1024
#: Geometry read from the wire must have orthonormal direction cosines and column norms equal to the spacing
#: to this tolerance (JSON carries floats exactly, so only the sender's own rounding is allowed for).
AFFINE_TOLERANCE: Final = 1e-6

#: Keys that would carry a patient identifier or a DICOM instance UID; refused anywhere in a header.
FORBIDDEN_KEYS: Final = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
    }
)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SCHEMA_RE = re.compile(r"(?P<name>[a-z0-9-]+)/(?P<major>\d+)\.(?P<minor>\d+)")
_FOUND_REPR_MAX = 80


# ------------------------------------------------------------------------------------------------- errors


class WireError(SctError, ValueError):
    """A message that is not a valid sct-edge message; names the field, the value found and what was expected."""

    def __init__(self, field: str, found: object, expected: str) -> None:
        shown = repr(found)
        if len(shown) > _FOUND_REPR_MAX:
            shown = shown[: _FOUND_REPR_MAX - 3] + "..."
        super().__init__(
            f"wire message field {field!r}: found {shown}, expected {expected}",
            attribute=field,
            found=found,
            expected=expected,
        )


class SchemaVersionError(WireError):
    """A header written in a schema major version this decoder does not know: its layout cannot be trusted."""


class ChecksumError(WireError):
    """A payload whose sha256 differs from the header's: corrupted or tampered with on the way; never use it."""

    def __init__(self, topic: str, seq: int, expected: str, found: str) -> None:
        super().__init__("sha256", found, f"{expected} (header of {topic} seq {seq})")
        self.expected_digest = expected
        self.found_digest = found


# ------------------------------------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True, eq=False)
class _Envelope:
    """Fields every message has."""

    schema: str
    seq: int
    #: Wall-clock time the publisher sent the message (``time.time()``).
    sent_at: float
    publisher_id: str


@dataclass(frozen=True, slots=True)
class HeartbeatMessage(_Envelope):
    """Sent when the publisher has been idle for its heartbeat interval: it is alive, nothing was lost."""

    #: The publisher's heartbeat interval (s); None from a 1.0 publisher, which did not state it.
    heartbeat_s: float | None = None


@dataclass(frozen=True, slots=True)
class SnapshotRequest(_Envelope):
    """A subscriber asks for the current state (``seq`` 0 and ``publisher_id`` "" from a subscriber)."""

    #: Why (one of ``SNAPSHOT_REASONS`` from this client; "" from a 1.1 client, which did not say).
    reason: str = ""
    #: Broadcast messages the subscriber lost, for a ``gap`` (0 otherwise).
    missed: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotEnd(_Envelope):
    """The end of a snapshot: ``seq`` is the last sequence number it reflects (0: nothing sent yet).

    A subscriber drops broadcast messages of this ``publisher_id`` with ``seq`` at or below it, and expects the
    next one to be ``seq + 1``.
    """

    items: int
    heartbeat_s: float


@dataclass(frozen=True, slots=True)
class SnapshotError(_Envelope):
    """The publisher could not serve a snapshot request (busy, malformed request, unknown schema)."""

    error: str


@dataclass(frozen=True, slots=True)
class StatusMessage(_Envelope):
    """A verdict, progress report or error for people and dashboards."""

    kind: str
    acquisition_id: str | None
    body: Mapping[str, Any]
    #: When the event happened (wall clock), as opposed to when it was sent.
    at: float


@dataclass(frozen=True, slots=True, eq=False)
class _DataMessage(_Envelope):
    """Fields of slab and volume messages."""

    acquisition_id: str
    protocol_id: str
    model_id: str
    model_version: str
    #: The whole volume's grid, whatever part of it the payload covers.
    geometry: VolumeGeometry
    #: Read-only int16 HU view of the payload frame.
    hu: npt.NDArray[np.int16]
    sha256: str
    produced_at: float
    #: 1.4: the sha256 of the ``confidence`` message that follows this one (same ``seq``); None when none
    #: follows (the model has no confidence output, or the publisher is older than 1.4).
    confidence_sha256: str | None = field(default=None, kw_only=True)

    def verify(self) -> None:
        """Raise :class:`ChecksumError` unless the payload hashes to the header's sha256."""
        found = hashlib.sha256(self.hu.data).hexdigest()
        if found != self.sha256:
            topic = TOPIC_SLAB if isinstance(self, SlabMessage) else TOPIC_VOLUME
            raise ChecksumError(topic.decode(), self.seq, self.sha256, found)


@dataclass(frozen=True, slots=True, eq=False)
class SlabMessage(_DataMessage):
    """One slab: ``hu`` covers slices ``start .. start + size - 1`` of the volume."""

    slab_index: int
    slab_count: int
    start: int
    size: int
    inputs_complete_at: float


@dataclass(frozen=True, slots=True, eq=False)
class VolumeMessage(_DataMessage):
    """A finished volume: ``hu`` has the geometry's full shape."""

    stitched_from_slabs: int
    #: Sent again by a restarted agent from its archive (same content and sha256 as when first published).
    republished: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class ConfidenceMessage(_Envelope):
    """1.4: the per-voxel confidence of the slab or volume sent just before it with the same ``seq``.

    ``confidence`` is a read-only uint8 view of the payload (255 = as typical as the model's calibration data,
    0 = far outside it), on the grid and placement the header states, which are those of the data message it
    accompanies. Voxels below ``threshold`` are untrusted; the volume's message lists the regions flagged.
    """

    accompanies: str
    acquisition_id: str
    protocol_id: str
    model_id: str
    model_version: str
    geometry: VolumeGeometry
    slab_index: int
    slab_count: int
    start: int
    size: int
    confidence: npt.NDArray[np.uint8]
    sha256: str
    method: str
    threshold: int
    produced_at: float
    #: Volume only: how many regions were flagged (0: checked, none) and the regions; None on a slab's.
    flagged: int | None = None
    regions: tuple[UntrustedRegion, ...] = ()
    republished: bool = False

    @property
    def is_volume(self) -> bool:
        return self.accompanies == TOPIC_VOLUME.decode()

    def verify(self) -> None:
        """Raise :class:`ChecksumError` unless the payload hashes to the header's sha256."""
        found = hashlib.sha256(self.confidence.data).hexdigest()
        if found != self.sha256:
            raise ChecksumError(TOPIC_CONFIDENCE.decode(), self.seq, self.sha256, found)


Message = StatusMessage | SlabMessage | VolumeMessage | HeartbeatMessage | ConfidenceMessage


# ------------------------------------------------------------------------------------------------ encoding


def encode(publication: Publication, seq: int, publisher_id: str, sent_at: float) -> list[bytes | memoryview]:
    """Frame one publication. The payload frame is a view of the record's array, not a copy.

    The array is converted (copied) only when it is not already C-contiguous little-endian int16. The caller must
    not change the array while ZeroMQ may still be sending it (records are immutable by convention).
    """
    header = _envelope_header(seq, publisher_id, sent_at)
    if isinstance(publication, StatusEvent):
        header["topic"] = TOPIC_STATUS.decode()
        header.update(
            kind=publication.kind,
            acquisition_id=publication.acquisition_id,
            body=dict(publication.body),
            at=publication.at,
        )
        return [TOPIC_STATUS, _dump_header(header), b""]
    if isinstance(publication, SctSlab):
        topic = TOPIC_SLAB
        geometry = publication.geometry
        slab = {
            "index": publication.slab_index,
            "count": publication.slab_count,
            "start": publication.start,
            "size": publication.size,
        }
        _check_slab_placement(slab, geometry, "SctSlab.")
        expected_shape = (publication.size, geometry.shape[1], geometry.shape[2])
        extra: dict[str, Any] = {"inputs_complete_at": publication.inputs_complete_at}
    elif isinstance(publication, SctVolume):
        topic = TOPIC_VOLUME
        geometry = publication.geometry
        slab = {"index": 0, "count": 1, "start": 0, "size": geometry.shape[0]}
        expected_shape = geometry.shape
        extra = {"stitched_from_slabs": publication.slab_count}
        if publication.republished:
            extra["republished"] = True
    else:
        raise WireError("publication", type(publication).__name__, "StatusEvent, SctSlab or SctVolume")
    hu = _wire_array(publication.hu, expected_shape, type(publication).__name__)
    if not _SHA256_HEX.fullmatch(publication.sha256):
        raise WireError("sha256", publication.sha256, "64 lower-case hex digits")
    header["topic"] = topic.decode()
    header.update(_data_fields(publication, slab, hu.shape, publication.sha256))
    header.update(dtype=WIRE_DTYPE, units=UNITS, **extra)
    if publication.confidence is not None:
        header["confidence"] = {
            "sha256": publication.confidence_sha256,
            "dtype": CONFIDENCE_WIRE_DTYPE,
            "method": publication.confidence_method,
            "threshold": publication.confidence_threshold,
        }
    else:
        header["confidence"] = None
    return [topic, _dump_header(header), hu.data.cast("B")]


def encode_confidence(
    publication: SctSlab | SctVolume, seq: int, publisher_id: str, sent_at: float
) -> list[bytes | memoryview] | None:
    """Frame the ``confidence`` message that follows the data message of ``publication`` (with the same ``seq``),
    or None when the publication has no confidence. The payload is a view of the record's array."""
    if publication.confidence is None:
        return None
    geometry = publication.geometry
    if isinstance(publication, SctSlab):
        slab = {"index": publication.slab_index, "count": publication.slab_count, "start": publication.start,
                "size": publication.size}  # fmt: skip
        accompanies = TOPIC_SLAB
        expected_shape: tuple[int, ...] = (publication.size, geometry.shape[1], geometry.shape[2])
    else:
        slab = {"index": 0, "count": 1, "start": 0, "size": geometry.shape[0]}
        accompanies = TOPIC_VOLUME
        expected_shape = geometry.shape
    _check_slab_placement(slab, geometry, f"{type(publication).__name__}.")
    confidence = np.asarray(publication.confidence)
    if confidence.dtype != np.uint8:
        raise WireError(f"{type(publication).__name__}.confidence.dtype", str(confidence.dtype), "uint8")
    if confidence.shape != expected_shape:
        raise WireError(
            f"{type(publication).__name__}.confidence.shape", confidence.shape, f"{expected_shape}, as the HU"
        )
    confidence = np.ascontiguousarray(confidence)
    if not _SHA256_HEX.fullmatch(publication.confidence_sha256):
        raise WireError("confidence.sha256", publication.confidence_sha256, "64 lower-case hex digits")
    header = _envelope_header(seq, publisher_id, sent_at)
    header["topic"] = TOPIC_CONFIDENCE.decode()
    header["accompanies"] = accompanies.decode()
    header.update(_data_fields(publication, slab, confidence.shape, publication.confidence_sha256))
    header.update(
        dtype=CONFIDENCE_WIRE_DTYPE,
        units=CONFIDENCE_UNITS,
        method=publication.confidence_method,
        threshold=publication.confidence_threshold,
    )
    if isinstance(publication, SctVolume):
        header["stitched_from_slabs"] = publication.slab_count
        if publication.republished:
            header["republished"] = True
        if publication.flagged is not None:
            header["flagged"] = publication.flagged.count
            header["regions"] = [r.as_json() for r in publication.flagged.regions]
    return [TOPIC_CONFIDENCE, _dump_header(header), confidence.data.cast("B")]


def _data_fields(
    publication: SctSlab | SctVolume, slab: Mapping[str, int], shape: tuple[int, ...], sha256: str
) -> dict[str, Any]:
    """The header fields data and confidence messages share: the acquisition, the whole grid, the placement."""
    geometry = publication.geometry
    return {
        "acquisition_id": publication.acquisition_id,
        "volume": {
            "shape": list(geometry.shape),
            "spacing_mm": list(geometry.spacing),
            "affine_lps": geometry.affine.tolist(),
            "axes": AXES,
        },
        "slab": dict(slab),
        "shape": list(shape),
        "sha256": sha256,
        "model": {"id": publication.model_id, "version": publication.model_version},
        "protocol_id": publication.protocol_id,
        "synthetic": True,
        "produced_at": publication.produced_at,
    }


def encode_heartbeat(
    seq: int, publisher_id: str, sent_at: float, heartbeat_s: float | None = None
) -> list[bytes | memoryview]:
    """Frame a heartbeat (the zguide's HUGZ): header only, empty payload."""
    header = _envelope_header(seq, publisher_id, sent_at)
    header["topic"] = TOPIC_HEARTBEAT.decode()
    if heartbeat_s is not None:
        header["heartbeat_s"] = heartbeat_s
    return [TOPIC_HEARTBEAT, _dump_header(header), b""]


def encode_snapshot_request(sent_at: float, *, reason: str = "", missed: int = 0) -> list[bytes]:
    """Frame a subscriber's snapshot request (seq 0: requests are not part of the publisher's sequence), saying
    why when ``reason`` is given, and for a gap how many messages were lost."""
    header: dict[str, Any] = {"schema": SCHEMA, "topic": TOPIC_SNAPSHOT_REQUEST.decode(), "seq": 0,
                              "sent_at": sent_at, "publisher_id": ""}  # fmt: skip
    if reason:
        header["reason"] = reason
        header["missed"] = missed
    return [TOPIC_SNAPSHOT_REQUEST, _dump_header(header), b""]


def encode_snapshot_end(
    seq: int, publisher_id: str, sent_at: float, *, items: int, heartbeat_s: float
) -> list[bytes]:
    """Frame the end of a snapshot that reflects every message up to ``seq``."""
    header = _envelope_header(seq, publisher_id, sent_at, minimum_seq=0)
    header.update(topic=TOPIC_SNAPSHOT_END.decode(), items=items, heartbeat_s=heartbeat_s)
    return [TOPIC_SNAPSHOT_END, _dump_header(header), b""]


def encode_snapshot_error(seq: int, publisher_id: str, sent_at: float, error: str) -> list[bytes]:
    """Frame a refusal to serve a snapshot; ``error`` says why in words."""
    header = _envelope_header(seq, publisher_id, sent_at, minimum_seq=0)
    header.update(topic=TOPIC_SNAPSHOT_ERROR.decode(), error=error)
    return [TOPIC_SNAPSHOT_ERROR, _dump_header(header), b""]


def _envelope_header(seq: int, publisher_id: str, sent_at: float, *, minimum_seq: int = 1) -> dict[str, Any]:
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < minimum_seq:
        raise WireError("seq", seq, f"an integer >= {minimum_seq}")
    if not publisher_id:
        raise WireError("publisher_id", publisher_id, "a non-empty string")
    return {"schema": SCHEMA, "seq": seq, "sent_at": sent_at, "publisher_id": publisher_id}


def _dump_header(header: dict[str, Any]) -> bytes:
    _refuse_identifiers(header, "header")
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as error:
        raise WireError(
            "header", str(error), "JSON-serialisable values (finite numbers, str, lists, dicts)"
        ) from None
    return text.encode("utf-8")


def _json_default(value: object) -> object:
    """Let status bodies carry numpy scalars, arrays, tuples and sets as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _refuse_identifiers(value: object, path: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in FORBIDDEN_KEYS:
                raise WireError(
                    f"{path}.{key}",
                    "a patient identifier",
                    "no patient name, ID, birth date, accession number or instance UID",
                )
            _refuse_identifiers(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _refuse_identifiers(item, f"{path}[{i}]")


def _wire_array(hu: npt.NDArray[Any], shape: tuple[int, ...], record: str) -> npt.NDArray[np.int16]:
    array = np.asarray(hu)
    if array.dtype.kind != "i" or array.dtype.itemsize != 2:
        raise WireError(f"{record}.hu.dtype", str(array.dtype), "int16")
    if array.shape != tuple(shape):
        raise WireError(f"{record}.hu.shape", array.shape, f"{tuple(shape)} from the geometry and slab")
    return np.ascontiguousarray(array, dtype=WIRE_DTYPE)


def _check_slab_placement(slab: Mapping[str, int], geometry: VolumeGeometry, prefix: str) -> None:
    slices = geometry.shape[0]
    index, count, start, size = slab["index"], slab["count"], slab["start"], slab["size"]
    if count < 1:
        raise WireError(f"{prefix}slab.count", count, "an integer >= 1")
    if not 0 <= index < count:
        raise WireError(f"{prefix}slab.index", index, f"0 <= index < count ({count})")
    if size < 1 or start < 0 or start + size > slices:
        raise WireError(
            f"{prefix}slab.start/size",
            (start, size),
            f"start >= 0, size >= 1, start + size <= {slices} slices",
        )


# ------------------------------------------------------------------------------------------------ decoding

Frame = bytes | memoryview | zmq.Frame


def decode(frames: Sequence[Frame], *, verify: bool = True) -> Message:
    """Parse three frames into a typed message; with ``verify`` (the default) also check the payload's sha256.

    Arrays are read-only views of the payload frame: receiving with ``copy=False`` makes the whole path zero-copy.
    """
    message = _decode(frames, SUBSCRIBED_TOPICS, verify=verify)
    assert not isinstance(message, SnapshotRequest | SnapshotEnd | SnapshotError)
    return message


def decode_snapshot_reply(
    frames: Sequence[Frame], *, verify: bool = True
) -> Message | SnapshotEnd | SnapshotError:
    """Parse one message of a snapshot reply: a stored slab or volume, ``snapshot.end`` or ``snapshot.error``."""
    topics = (
        TOPIC_SLAB,
        TOPIC_VOLUME,
        TOPIC_CONFIDENCE,
        TOPIC_STATUS,
        TOPIC_SNAPSHOT_END,
        TOPIC_SNAPSHOT_ERROR,
    )
    message = _decode(frames, topics, verify=verify)
    assert not isinstance(message, SnapshotRequest)
    return message


def decode_snapshot_request(frames: Sequence[Frame]) -> SnapshotRequest:
    """Parse a subscriber's snapshot request (raises :class:`WireError`, or :class:`SchemaVersionError`)."""
    message = _decode(frames, (TOPIC_SNAPSHOT_REQUEST,), verify=False)
    assert isinstance(message, SnapshotRequest)
    return message


def _decode(
    frames: Sequence[Frame], topics: tuple[bytes, ...], *, verify: bool
) -> Message | SnapshotRequest | SnapshotEnd | SnapshotError:
    if len(frames) != FRAME_COUNT:
        raise WireError("frames", len(frames), f"{FRAME_COUNT} frames: topic, JSON header, payload")
    topic_view, header_view, payload = (_view(f) for f in frames)
    topic = topic_view.tobytes()
    if topic not in topics:
        raise WireError("topic", topic, f"one of {[t.decode() for t in topics]}")
    if header_view.nbytes > MAX_HEADER_BYTES:
        raise WireError("header", f"{header_view.nbytes} bytes", f"at most {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(header_view.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireError("header", str(error), "a UTF-8 JSON object") from None
    if not isinstance(header, dict):
        raise WireError("header", type(header).__name__, "a JSON object")
    _check_schema(_get(header, "schema", str))
    if _get(header, "topic", str) != topic.decode():
        raise WireError("topic", header["topic"], f"{topic.decode()!r}, as in the topic frame")
    snapshot_topic = topic in SNAPSHOT_TOPICS
    envelope = {
        "schema": header["schema"],
        "seq": _get_int(header, "seq", minimum=0 if snapshot_topic else 1),
        "sent_at": _get_number(header, "sent_at"),
        "publisher_id": _get(header, "publisher_id", str),
    }
    if snapshot_topic:
        _expect_empty(payload, topic)
        if topic == TOPIC_SNAPSHOT_REQUEST:
            reason = _get(header, "reason", str) if "reason" in header else ""
            missed = _get_int(header, "missed") if "missed" in header else 0
            return SnapshotRequest(**envelope, reason=reason, missed=missed)
        if topic == TOPIC_SNAPSHOT_ERROR:
            return SnapshotError(**envelope, error=_get(header, "error", str))
        heartbeat_s = _get_number(header, "heartbeat_s")
        if heartbeat_s <= 0:
            raise WireError("heartbeat_s", heartbeat_s, "a positive number of seconds")
        return SnapshotEnd(**envelope, items=_get_int(header, "items"), heartbeat_s=heartbeat_s)
    if topic == TOPIC_HEARTBEAT:
        _expect_empty(payload, topic)
        interval = _get_number(header, "heartbeat_s") if "heartbeat_s" in header else None
        if interval is not None and interval <= 0:
            raise WireError("heartbeat_s", interval, "a positive number of seconds")
        return HeartbeatMessage(**envelope, heartbeat_s=interval)
    if topic == TOPIC_STATUS:
        _expect_empty(payload, topic)
        acquisition_id = header.get("acquisition_id")
        if acquisition_id is not None and not isinstance(acquisition_id, str):
            raise WireError("acquisition_id", acquisition_id, "a string or null")
        return StatusMessage(
            **envelope,
            kind=_get(header, "kind", str),
            acquisition_id=acquisition_id,
            body=_get(header, "body", dict),
            at=_get_number(header, "at"),
        )
    message: SlabMessage | VolumeMessage | ConfidenceMessage
    if topic == TOPIC_CONFIDENCE:
        message = _decode_confidence(header, envelope, payload)
    else:
        message = _decode_data(topic, header, envelope, payload)
    if verify:
        message.verify()
    return message


def _decode_data(
    topic: bytes, header: dict[str, Any], envelope: dict[str, Any], payload: memoryview
) -> SlabMessage | VolumeMessage:
    if _get(header, "synthetic", bool) is not True:
        raise WireError("synthetic", header["synthetic"], "true: every image on this wire is synthetic CT")
    if _get(header, "dtype", str) != WIRE_DTYPE:
        raise WireError("dtype", header["dtype"], repr(WIRE_DTYPE))
    if _get(header, "units", str) != UNITS:
        raise WireError("units", header["units"], repr(UNITS))
    volume_like = topic == TOPIC_VOLUME
    _, slab, shape, common = _decode_placement(header, envelope, volume_like=volume_like)
    common["hu"] = _payload_array(payload, shape)
    common["confidence_sha256"] = _decode_confidence_field(header)
    if topic == TOPIC_SLAB:
        return SlabMessage(
            **common,
            slab_index=slab["index"],
            slab_count=slab["count"],
            start=slab["start"],
            size=slab["size"],
            inputs_complete_at=_get_number(header, "inputs_complete_at"),
        )
    republished = header.get("republished", False)
    if not isinstance(republished, bool):
        raise WireError("republished", republished, "true or false (absent: false)")
    return VolumeMessage(
        **common,
        stitched_from_slabs=_get_int(header, "stitched_from_slabs", minimum=1),
        republished=republished,
    )


def _decode_placement(
    header: dict[str, Any], envelope: dict[str, Any], *, volume_like: bool
) -> tuple[VolumeGeometry, dict[str, int], tuple[int, int, int], dict[str, Any]]:
    """The grid, the slab's place in it, the payload's shape and the fields data and confidence messages share,
    each checked (section 4.5)."""
    geometry = _decode_geometry(_get(header, "volume", dict))
    slab_obj = header.get("slab")
    if volume_like and slab_obj is None:
        slab_obj = {"index": 0, "count": 1, "start": 0, "size": geometry.shape[0]}
    if not isinstance(slab_obj, dict):
        raise WireError("slab", slab_obj, "an object {index, count, start, size}")
    slab = {key: _get_int(slab_obj, key, path=f"slab.{key}") for key in ("index", "count", "start", "size")}
    _check_slab_placement(slab, geometry, "")
    if volume_like and (slab["start"], slab["size"]) != (0, geometry.shape[0]):
        raise WireError(
            "slab.start/size", (slab["start"], slab["size"]), f"(0, {geometry.shape[0]}) for a volume"
        )
    shape = _get_shape(header, "shape")
    expected = (slab["size"], geometry.shape[1], geometry.shape[2])
    if shape != expected:
        raise WireError("shape", list(shape), f"{list(expected)} (slab size x volume rows x columns)")
    model = _get(header, "model", dict)
    common = {
        **envelope,
        "acquisition_id": _get(header, "acquisition_id", str),
        "protocol_id": _get(header, "protocol_id", str),
        "model_id": _get(model, "id", str, path="model.id"),
        "model_version": _get(model, "version", str, path="model.version"),
        "geometry": geometry,
        "sha256": _get(header, "sha256", str),
        "produced_at": _get_number(header, "produced_at"),
    }
    if not _SHA256_HEX.fullmatch(common["sha256"]):
        raise WireError("sha256", common["sha256"], "64 lower-case hex digits")
    return geometry, slab, shape, common


def _decode_confidence_field(header: dict[str, Any]) -> str | None:
    """1.4: the sha256 of the confidence message a data message announces; None for null or absent (1.3)."""
    value = header.get("confidence")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise WireError("confidence", value, "an object {sha256, dtype, method, threshold} or null")
    digest = _get(value, "sha256", str, path="confidence.sha256")
    if not _SHA256_HEX.fullmatch(digest):
        raise WireError("confidence.sha256", digest, "64 lower-case hex digits")
    return str(digest)


def _decode_confidence(
    header: dict[str, Any], envelope: dict[str, Any], payload: memoryview
) -> ConfidenceMessage:
    if _get(header, "synthetic", bool) is not True:
        raise WireError("synthetic", header["synthetic"], "true: every image on this wire is synthetic CT")
    accompanies = _get(header, "accompanies", str)
    if accompanies not in (TOPIC_SLAB.decode(), TOPIC_VOLUME.decode()):
        raise WireError("accompanies", accompanies, "'sct.slab' or 'sct.volume'")
    if _get(header, "dtype", str) != CONFIDENCE_WIRE_DTYPE:
        raise WireError("dtype", header["dtype"], repr(CONFIDENCE_WIRE_DTYPE))
    if _get(header, "units", str) != CONFIDENCE_UNITS:
        raise WireError("units", header["units"], repr(CONFIDENCE_UNITS))
    volume_like = accompanies == TOPIC_VOLUME.decode()
    _, slab, shape, common = _decode_placement(header, envelope, volume_like=volume_like)
    expected_bytes = math.prod(shape)
    if payload.nbytes != expected_bytes:
        raise WireError("shape", list(shape), f"a shape matching the {payload.nbytes}-byte payload")
    confidence = np.frombuffer(payload, dtype=np.uint8).reshape(shape)
    confidence.flags.writeable = False
    threshold = _get_int(header, "threshold", minimum=CONFIDENCE_RANGE[0] + 1)
    if threshold > CONFIDENCE_RANGE[1]:
        raise WireError("threshold", threshold, f"an integer 1..{CONFIDENCE_RANGE[1]}")
    flagged: int | None = None
    regions: tuple[UntrustedRegion, ...] = ()
    if volume_like and "flagged" in header:
        flagged = _get_int(header, "flagged")
        regions = _decode_regions(_get(header, "regions", list), common["geometry"].shape)
        if len(regions) != flagged:
            raise WireError("regions", f"{len(regions)} regions", f"{flagged}, as 'flagged' says")
    republished = header.get("republished", False)
    if not isinstance(republished, bool):
        raise WireError("republished", republished, "true or false (absent: false)")
    return ConfidenceMessage(
        **common,
        accompanies=accompanies,
        slab_index=slab["index"],
        slab_count=slab["count"],
        start=slab["start"],
        size=slab["size"],
        confidence=confidence,
        method=_get(header, "method", str),
        threshold=threshold,
        flagged=flagged,
        regions=regions,
        republished=republished,
    )


def _decode_regions(items: list[Any], shape: tuple[int, int, int]) -> tuple[UntrustedRegion, ...]:
    regions = []
    for n, item in enumerate(items):
        path = f"regions[{n}]"
        if not isinstance(item, dict):
            raise WireError(path, item, "an object")
        bounds = []
        for key, extent in zip(("slices", "rows", "columns"), shape, strict=True):
            pair = _get(item, key, list, path=f"{path}.{key}")
            if (
                len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
                or not 0 <= pair[0] < pair[1] <= extent
            ):
                raise WireError(f"{path}.{key}", pair, f"[start, stop) with 0 <= start < stop <= {extent}")
            bounds.extend(pair)
        volume_ml = _get_number(item, "volume_ml", path=f"{path}.volume_ml")
        if volume_ml < 0:
            raise WireError(f"{path}.volume_ml", volume_ml, "a number >= 0")
        lowest = _get_int(item, "min_confidence", path=f"{path}.min_confidence")
        if lowest > CONFIDENCE_RANGE[1]:
            raise WireError(f"{path}.min_confidence", lowest, f"an integer 0..{CONFIDENCE_RANGE[1]}")
        regions.append(
            UntrustedRegion(
                index=_get_int(item, "index", minimum=1, path=f"{path}.index"),
                slice_start=bounds[0],
                slice_stop=bounds[1],
                row_start=bounds[2],
                row_stop=bounds[3],
                col_start=bounds[4],
                col_stop=bounds[5],
                voxels=_get_int(item, "voxels", minimum=1, path=f"{path}.voxels"),
                volume_ml=volume_ml,
                min_confidence=lowest,
            )
        )
    return tuple(regions)


def schema_minor(schema: str) -> int:
    """The minor version of a ``sct-edge/1.N`` schema string (0 for one that does not parse)."""
    match = _SCHEMA_RE.fullmatch(schema)
    return int(match["minor"]) if match is not None else 0


def _decode_geometry(volume: dict[str, Any]) -> VolumeGeometry:
    shape = _get_shape(volume, "shape", path="volume.shape")
    spacing = _get(volume, "spacing_mm", list, path="volume.spacing_mm")
    if len(spacing) != 3 or not all(_is_number(s) and math.isfinite(s) and s > 0 for s in spacing):
        raise WireError("volume.spacing_mm", spacing, "three finite positive numbers (slice, row, column)")
    if _get(volume, "axes", str, path="volume.axes") != AXES:
        raise WireError("volume.axes", volume["axes"], repr(AXES))
    affine_list = _get(volume, "affine_lps", list, path="volume.affine_lps")
    try:
        affine = np.array(affine_list, dtype=np.float64)
    except (TypeError, ValueError):
        raise WireError("volume.affine_lps", affine_list, "a 4x4 array of numbers") from None
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise WireError("volume.affine_lps", affine_list, "a 4x4 array of finite numbers")
    if not np.allclose(affine[3], (0.0, 0.0, 0.0, 1.0), atol=AFFINE_TOLERANCE):
        raise WireError("volume.affine_lps[3]", affine[3].tolist(), "[0, 0, 0, 1]")
    columns = affine[:3, :3] / np.asarray(spacing, dtype=np.float64)
    norms = np.linalg.norm(columns, axis=0)
    if not np.allclose(norms, 1.0, atol=AFFINE_TOLERANCE):
        raise WireError(
            "volume.affine_lps", affine[:3, :3].tolist(), f"columns of length spacing_mm {spacing}"
        )
    try:
        return VolumeGeometry(
            shape=(shape[0], shape[1], shape[2]),
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            origin=_triple(affine[:3, 3]),
            row_direction=_triple(columns[:, 2]),
            column_direction=_triple(columns[:, 1]),
            slice_direction=_triple(columns[:, 0]),
        )
    except ValueError as error:
        raise WireError("volume.affine_lps", affine_list, f"a valid voxel-to-LPS matrix ({error})") from None


def _payload_array(payload: memoryview, shape: tuple[int, int, int]) -> npt.NDArray[np.int16]:
    expected_bytes = math.prod(shape) * np.dtype(WIRE_DTYPE).itemsize
    if payload.nbytes != expected_bytes:
        raise WireError("shape", list(shape), f"a shape matching the {payload.nbytes}-byte payload")
    array = np.frombuffer(payload, dtype=WIRE_DTYPE).reshape(shape)
    array.flags.writeable = False
    return array


def _check_schema(schema: str) -> None:
    match = _SCHEMA_RE.fullmatch(schema)
    if match is None or match["name"] != SCHEMA_NAME:
        raise WireError("schema", schema, f"'{SCHEMA_NAME}/<major>.<minor>'")
    if int(match["major"]) != SCHEMA_MAJOR:
        raise SchemaVersionError(
            "schema",
            schema,
            f"major version {SCHEMA_MAJOR} ({SCHEMA_NAME}/{SCHEMA_MAJOR}.x); upgrade the subscriber",
        )


def _view(frame: Frame) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer.cast("B")
    return memoryview(frame).cast("B")


def _expect_empty(payload: memoryview, topic: bytes) -> None:
    if payload.nbytes:
        raise WireError("payload", f"{payload.nbytes} bytes", f"an empty payload on {topic.decode()}")


def _get(obj: Mapping[str, Any], key: str, kind: type, *, path: str | None = None) -> Any:
    name = path or key
    if key not in obj:
        raise WireError(name, "missing", f"a {kind.__name__}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise WireError(name, value, f"a {kind.__name__}")
    return value


def _get_int(obj: Mapping[str, Any], key: str, *, minimum: int = 0, path: str | None = None) -> int:
    value = _get(obj, key, int, path=path)
    if value < minimum:
        raise WireError(path or key, value, f"an integer >= {minimum}")
    return int(value)


def _get_number(obj: Mapping[str, Any], key: str, *, path: str | None = None) -> float:
    if key not in obj:
        raise WireError(path or key, "missing", "a number")
    value = obj[key]
    if not _is_number(value) or not math.isfinite(value):
        raise WireError(path or key, value, "a finite number")
    return float(value)


def _get_shape(obj: Mapping[str, Any], key: str, *, path: str | None = None) -> tuple[int, int, int]:
    value = _get(obj, key, list, path=path)
    if len(value) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value):
        raise WireError(path or key, value, "three positive integers [slices, rows, columns]")
    return (value[0], value[1], value[2])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _triple(v: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))
