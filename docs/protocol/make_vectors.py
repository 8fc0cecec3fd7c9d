"""Write the sct-edge/1.4 test vectors: recorded frames a vendor's test suite replays through its own decoder.

Each line of ``vectors/sct-edge-1.4.vectors.jsonl`` is one JSON object:

- ``name``: a stable identifier; ``description``: what the vector exercises;
- ``socket``: where the frames arrive: ``"broadcast"`` (the SUB socket), ``"snapshot_reply"`` (the DEALER
  socket, a reply to a snapshot request) or ``"snapshot_request"`` (what the agent's ROUTER receives);
- ``frames``: the message's frames, each base64 (RFC 4648, with padding) of the exact bytes;
- ``expect``: what a conforming decoder concludes. Either ``{"accepted": true, "message": {...}}`` with the
  values it must read (numbers are compared as IEEE-754 doubles, exactly; ``hu`` is the payload as nested
  lists ``[slice][row][column]``, and ``confidence`` likewise for a confidence message's uint8 payload;
  ``body`` of a status message is the whole JSON object), or
  ``{"accepted": false, "field": "..."}`` naming the field that makes the message invalid, as docs/protocol.md
  names it (``also`` lists other names a decoder may give, e.g. ``header`` where a strict JSON parser refuses
  the text before reading the field). ``"stop": true`` marks a header of another schema major: refuse it and
  stop using the stream (section 9), never resynchronise.

The vectors are made with the agent's own encoder from fixed inputs (no clock, no randomness), then altered by
hand for the refusals, so running this again gives the same bytes (``vectors/sct-edge-1.3.vectors.jsonl``, the
previous minor's file, stays as it was published: a 1.4 decoder reaches each of its conclusions too); ``tests/test_protocol_spec.py`` checks that,
and replays every vector through the reference decoder. It lives beside the document and its schema because
the three are the specification a vendor takes away; it is not part of the agent.

    python docs/protocol/make_vectors.py            # rewrite the file
    python docs/protocol/make_vectors.py --check    # exit 1 if the file is not what this script writes
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from agent.publish.wire import (
    encode,
    encode_confidence,
    encode_heartbeat,
    encode_snapshot_end,
    encode_snapshot_error,
    encode_snapshot_request,
)
from agent.records import (
    FlagReport,
    Reason,
    SctSlab,
    SctVolume,
    StatusEvent,
    UntrustedRegion,
    Verdict,
    confidence_sha256,
)
from agent.status_events import flagged_event, progress_event, verdict_event
from agent.vocabulary import Outcome, StatusKind
from sct_core.geometry import Orientation, VolumeGeometry

VECTORS_FILE: Final = Path(__file__).resolve().parent / "vectors" / "sct-edge-1.4.vectors.jsonl"
#: The confidence method and calibrated threshold of the vectors' model (values an implementer recognises).
METHOD: Final = "feature-mahalanobis"
THRESHOLD: Final = 64
MIN_REGION_MM3: Final = 0.5
PUBLISHER: Final = "9c1e5b7a2f3d4e60"
ACQUISITION: Final = "3f9a1c0e7b2d4a68"
SENT_AT: Final = 1767225601.7352
PRODUCED_AT: Final = 1767225601.734
INPUTS_AT: Final = 1767225601.125
MODEL: Final = ("sct-lumbar-dual-echo-unet", "1.0.0")
PROTOCOL: Final = "bonemri_lumbar_1p5t"

Vector = dict[str, Any]
Frames = list[bytes]


# ------------------------------------------------------------------------------------------------- inputs


def geometry() -> VolumeGeometry:
    """A small oblique sagittal grid whose numbers need every bit of a double: an origin with more decimals than
    a console writes (the agent sends ImagePositionPatient as it parsed it) and 0.7421875 mm pixels."""
    grid = VolumeGeometry.from_fov(
        center=(0.0, -20.0, 60.0),
        fov_mm=(2 * 0.7421875, 4 * 0.7421875, 3 * 0.9),
        voxel_mm=(0.7421875, 0.7421875, 0.9),
        orientation=Orientation.SAGITTAL,
        oblique_deg=8.0,
    )
    return replace(grid, origin=(46.550000000000004, -139.69123456789012, 4.689999999999998))


def hu(shape: tuple[int, int, int]) -> npt.NDArray[np.int16]:
    count = shape[0] * shape[1] * shape[2]
    values = (np.arange(count, dtype=np.int64) * 397 - 1024) % 4096 - 1024
    return values.astype("<i2").reshape(shape)


def sha(array: npt.NDArray[np.int16]) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<i2").tobytes()).hexdigest()


def slabs_and_volume() -> tuple[list[SctSlab], SctVolume]:
    grid = geometry()
    volume = hu(grid.shape)
    slabs = []
    for index, (start, size) in enumerate(((0, 2), (2, 1))):
        part = volume[start : start + size]
        slabs.append(
            SctSlab(
                acquisition_id=ACQUISITION,
                protocol_id=PROTOCOL,
                model_id=MODEL[0],
                model_version=MODEL[1],
                geometry=grid,
                slab_index=index,
                slab_count=2,
                start=start,
                size=size,
                hu=part,
                sha256=sha(part),
                inputs_complete_at=INPUTS_AT,
                produced_at=PRODUCED_AT,
                inference_s=0.412,
            )
        )
    whole = SctVolume(acquisition_id=ACQUISITION, protocol_id=PROTOCOL, model_id=MODEL[0], model_version=MODEL[1],
                      geometry=grid, hu=volume, sha256=sha(volume), slab_count=2, produced_at=PRODUCED_AT)  # fmt: skip
    return slabs, whole


def confidence_of(shape: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """Confidence with one low corner: slices 0-1, row 0, columns 0-1 below the threshold, the rest typical."""
    values = np.full(shape, 230, dtype=np.uint8)
    values[0:2, 0, 0:2] = (12, 40)
    return values


#: The region the low corner makes (0.9 x 0.7421875 x 0.7421875 mm voxels, 4 of them).
REGION: Final = UntrustedRegion(1, 0, 2, 0, 1, 0, 2, 4, 0.001983, 12)


def slabs_and_volume_with_confidence() -> tuple[list[SctSlab], SctVolume]:
    """The same slabs and volume, of a model with a confidence output (schema 1.4)."""
    slabs, volume = slabs_and_volume()
    confidence = confidence_of(volume.geometry.shape)
    fields: dict[str, Any] = {"confidence_method": METHOD, "confidence_threshold": THRESHOLD}
    out = []
    for slab in slabs:
        part = np.ascontiguousarray(confidence[slab.start : slab.start + slab.size])
        out.append(replace(slab, confidence=part, confidence_sha256=confidence_sha256(part), **fields))
    flagged = FlagReport(METHOD, THRESHOLD, MIN_REGION_MM3, (REGION,), confidence < THRESHOLD)
    whole = replace(volume, confidence=confidence, confidence_sha256=confidence_sha256(confidence), flagged=flagged,
                    **fields)  # fmt: skip
    return out, whole


def verdict_status() -> StatusEvent:
    verdict = Verdict(
        acquisition_id=ACQUISITION,
        protocol_id=PROTOCOL,
        protocol_version="1",
        outcome=Outcome.REJECT,
        final=False,
        reasons=(Reason(PROTOCOL, "EchoTime2", "4.8 ms", "4.2 \u00b1 0.2 ms", "timing"),),
        pending=(),
        decided_at=1767225890.412,
    )
    event = verdict_event(verdict)
    body = {
        "series_number": 7,
        "series_description": "t1_fl3d_sag_dual_echo_sCT",
        **event.body,
        "other_protocols": {},
        "echo_times_ms": [2.38, 4.8],
        "slices_per_echo": [100, 1],
        "expected_slices": 100,
        "ended_by": "",
        "first_image_at": 1767225860.301,
        "last_image_at": 1767225890.301,
        "first_image_to_verdict_s": None,
        "completion_delay_s": None,
    }
    return StatusEvent(StatusKind.VERDICT, ACQUISITION, body, event.at)


def received_status() -> StatusEvent:
    body = {
        "series_number": 7,
        "series_description": "t1_fl3d_sag_dual_echo_sCT",
        "echo_times_ms": [2.38],
        "slices_per_echo": [84],
        "expected_slices": 100,
        "expected_echoes": 2,
        "images_received": 84,
        "images_expected": 200,
        "ended": False,
        "ended_by": "",
        "first_image_at": 1767225860.301,
        "last_image_at": 1767225880.9,
    }
    return StatusEvent(StatusKind.RECEIVED, ACQUISITION, body, 1767225880.901)


# ------------------------------------------------------------------------------------------------ helpers


def frames_of(encoded: Sequence[bytes | memoryview]) -> Frames:
    return [bytes(f) for f in encoded]


def header(frames: Frames) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(frames[1])
    return loaded


def with_header(frames: Frames, change: Callable[[dict[str, Any]], object]) -> Frames:
    """The frames with the header re-written (compact JSON, as the agent writes it) after ``change``."""
    changed = copy.deepcopy(header(frames))
    change(changed)
    return [frames[0], json.dumps(changed, separators=(",", ":")).encode(), frames[2]]


def setting(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """Set a field by a dotted path (``volume.axes``); ``...`` deletes it."""

    def change(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            obj = obj[key]
        if value is ...:
            del obj[last]
        else:
            obj[last] = value

    return change


def message_of(frames: Frames, payload_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """What a decoder reads from accepted frames: the header's fields, defaults applied, and the voxels."""
    fields = header(frames)
    if fields["topic"] == "status":
        fields.setdefault("acquisition_id", None)
    if fields["topic"] == "sct.volume":
        fields.setdefault("slab", {"index": 0, "count": 1, "start": 0, "size": fields["volume"]["shape"][0]})
        fields.setdefault("republished", False)
    if fields["topic"] in ("sct.slab", "sct.volume"):
        fields.setdefault("confidence", None)  # absent from a 1.3 publisher: nothing follows
    if fields["topic"] == "confidence":
        fields.setdefault("republished", False)
        if payload_shape is not None:
            fields["confidence"] = np.frombuffer(frames[2], dtype="|u1").reshape(payload_shape).tolist()
        return fields
    if payload_shape is not None:
        fields["hu"] = np.frombuffer(frames[2], dtype="<i2").reshape(payload_shape).tolist()
    return fields


def accepted(name: str, description: str, socket: str, frames: Frames, *, voxels: bool = False) -> Vector:
    shape = tuple(header(frames)["shape"]) if voxels else None
    return {
        "name": name,
        "description": description,
        "socket": socket,
        "frames": [base64.b64encode(f).decode("ascii") for f in frames],
        "expect": {"accepted": True, "message": message_of(frames, shape)},
    }


def refused(
    name: str,
    description: str,
    socket: str,
    frames: Frames,
    field: str,
    *,
    also: Sequence[str] = (),
    stop: bool = False,
) -> Vector:
    expect: dict[str, Any] = {"accepted": False, "field": field}
    if also:
        expect["also"] = list(also)
    if stop:
        expect["stop"] = True
    return {
        "name": name,
        "description": description,
        "socket": socket,
        "frames": [base64.b64encode(f).decode("ascii") for f in frames],
        "expect": expect,
    }


# ------------------------------------------------------------------------------------------------ vectors


def vectors() -> list[Vector]:
    slabs, volume = slabs_and_volume()
    slab0 = frames_of(encode(slabs[0], 17, PUBLISHER, SENT_AT))
    slab1 = frames_of(encode(slabs[1], 18, PUBLISHER, SENT_AT + 0.001))
    vol = frames_of(encode(volume, 20, PUBLISHER, SENT_AT + 0.07))
    beat = frames_of(encode_heartbeat(43, PUBLISHER, 1767225701.5, 1.0))
    verdict = frames_of(encode(verdict_status(), 212, PUBLISHER, 1767225890.413))
    received = frames_of(encode(received_status(), 198, PUBLISHER, 1767225880.902))
    progress_body = {**progress_event(ACQUISITION, slabs_done=2, slab_count=2, at=1767225601.739).body}
    progress = frames_of(
        encode(
            StatusEvent(
                StatusKind.PROGRESS, ACQUISITION, {**progress_body, "inference_s": 0.412}, 1767225601.739
            ),
            19,
            PUBLISHER,
            1767225601.7401,
        )
    )
    end = frames_of(encode_snapshot_end(42, PUBLISHER, 1767225700.5, items=3, heartbeat_s=1.0))
    error = frames_of(encode_snapshot_error(42, PUBLISHER, 1767225700.5, "busy: 16 snapshots in progress"))
    request = frames_of(encode_snapshot_request(1767225700.4, reason="gap", missed=17))
    # 1.4: the same slabs and volume of a model with a confidence output, each followed by its confidence.
    cslabs, cvolume = slabs_and_volume_with_confidence()
    cslab0 = frames_of(encode(cslabs[0], 17, PUBLISHER, SENT_AT))
    conf0 = frames_of(encode_confidence(cslabs[0], 17, PUBLISHER, SENT_AT) or [])
    conf1 = frames_of(encode_confidence(cslabs[1], 18, PUBLISHER, SENT_AT + 0.001) or [])
    cvol = frames_of(encode(cvolume, 21, PUBLISHER, SENT_AT + 0.07))
    confvol = frames_of(encode_confidence(cvolume, 21, PUBLISHER, SENT_AT + 0.07) or [])
    flagged = frames_of(encode(flagged_event(cvolume, 1767225601.801), 20, PUBLISHER, SENT_AT + 0.069))
    nothing = np.zeros(cvolume.geometry.shape, dtype=bool)
    clear = replace(cvolume, flagged=FlagReport(METHOD, THRESHOLD, MIN_REGION_MM3, (), nothing))
    flagged_none = frames_of(encode(flagged_event(clear, 1767225601.801), 20, PUBLISHER, SENT_AT + 0.069))
    unchecked = frames_of(encode(flagged_event(volume, 1767225601.801), 20, PUBLISHER, SENT_AT + 0.069))
    b, s, r = "broadcast", "snapshot_reply", "snapshot_request"

    def pretty(frames: Frames) -> Frames:
        fields = header(frames)
        text = json.dumps(dict(reversed(list(fields.items()))), indent=2, ensure_ascii=True)
        return [frames[0], (" \n" + text + "\n\t").encode(), frames[2]]

    def whole_numbers(fields: dict[str, Any]) -> None:
        fields["sent_at"] = 1767225601
        fields["produced_at"] = 1767225602

    def shear(fields: dict[str, Any]) -> None:
        fields["volume"]["affine_lps"][0][1] += 0.01

    def bad_norm(fields: dict[str, Any]) -> None:
        fields["volume"]["spacing_mm"][1] = 0.75

    def flipped(frames: Frames) -> Frames:
        payload = bytearray(frames[2])
        payload[0] ^= 1
        return [frames[0], frames[1], bytes(payload)]

    out = [
        # ---- accepted
        accepted("heartbeat", "A heartbeat stating its interval (1.1).", b, beat),
        accepted("heartbeat-1.0", "A 1.0 publisher's heartbeat: no heartbeat_s (assume 1.0 s).", b,
                 with_header(beat, lambda h: (h.pop("heartbeat_s"), h.update(schema="sct-edge/1.0")))),
        accepted("status-verdict", "A provisional reject naming the console series (1.3).", b, verdict),
        accepted("status-received", "84 of 200 images received (1.3).", b, received),
        accepted("status-progress", "Progress after a published slab.", b, progress),
        accepted("status-no-acquisition", "acquisition_id absent: it means null.", b,
                 with_header(progress, setting("acquisition_id", ...))),
        accepted("status-unknown-kind-newer-minor",
                 "A later minor (1.9) with an unknown status kind and unknown fields: accepted, fields ignored.", b,
                 with_header(received, lambda h: h.update(schema="sct-edge/1.9", kind="calibration",
                                                          added_in_1_9={"x": [1, 2]}))),
        accepted("slab-0", "Slab 0 of 2 (slices 0 and 1) of an oblique grid; the affine needs every bit.", b, slab0,
                 voxels=True),
        accepted("slab-1", "Slab 1 of 2 (slice 2): placed by slab.start, not index x size.", b, slab1, voxels=True),
        accepted("volume", "The volume stitched from the two slabs.", b, vol, voxels=True),
        accepted("volume-without-slab", "A volume without slab: treat it as {index 0, count 1, start 0, size slices}.",
                 b, with_header(vol, setting("slab", ...)), voxels=True),
        accepted("volume-republished", "A volume a restarted agent sent again from its archive.", b,
                 with_header(vol, setting("republished", True)), voxels=True),
        accepted("slab-any-layout", "Slab 0 with whitespace around and between the fields, in reverse key order.", b,
                 pretty(slab0), voxels=True),
        accepted("slab-whole-numbers", "Times written as integers (1767225601): a number may be written either way.",
                 b, with_header(slab0, whole_numbers), voxels=True),
        accepted("snapshot-slab", "A stored slab replayed in a snapshot reply: the same bytes as broadcast.", s, slab0,
                 voxels=True),
        accepted("snapshot-volume", "A stored volume replayed in a snapshot reply.", s, vol, voxels=True),
        accepted("snapshot-status", "A status in a snapshot reply: valid (the agent sends none today); counted in items.",
                 s, verdict),
        accepted("snapshot-end", "The end of a snapshot reflecting seq 42, after 3 stored messages.", s, end),
        accepted("snapshot-end-empty", "The end of a snapshot of a publisher that has sent nothing (seq 0).", s,
                 with_header(end, lambda h: h.update(seq=0, items=0))),
        accepted("snapshot-error", "A refused snapshot (busy): retry after the back-off of section 7.4.", s, error),
        # ---- accepted: confidence (1.4)
        accepted("slab-0-announcing-confidence", "Slab 0 of a model with a confidence output: its header names the "
                 "confidence message that follows (sha256).", b, cslab0, voxels=True),
        accepted("confidence-slab-0", "The confidence of slab 0: same seq (17), grid and placement; uint8.", b, conf0,
                 voxels=True),
        accepted("confidence-slab-1", "The confidence of slab 1 (seq 18).", b, conf1, voxels=True),
        accepted("volume-announcing-confidence", "The volume (seq 21) announcing its confidence.", b, cvol,
                 voxels=True),
        accepted("confidence-volume", "The confidence of the volume (seq 21) with the one region flagged.", b,
                 confvol, voxels=True),
        accepted("confidence-volume-republished", "A republished volume's confidence.", b,
                 with_header(confvol, setting("republished", True)), voxels=True),
        accepted("volume-1.3-no-confidence-field", "A 1.3 publisher's volume: no confidence field, none follows.", b,
                 with_header(vol, lambda h: (h.pop("confidence"), h.update(schema="sct-edge/1.3"))), voxels=True),
        accepted("snapshot-confidence", "A stored confidence in a snapshot reply to a 1.4 client, counted in items.",
                 s, confvol, voxels=True),
        accepted("status-flagged", "1.4: the region of the volume not to trust, sent just before it.", b, flagged),
        accepted("status-flagged-none", "1.4: checked, nothing flagged: flagged 0, stated.", b, flagged_none),
        accepted("status-flagged-unchecked", "1.4: a model without confidence: checked false, flagged null.", b,
                 unchecked),
        accepted("snapshot-request", "A 1.4 client's request after a gap of 17 messages.", r, request),
        accepted("snapshot-request-1.1", "A 1.1 client's request: no reason, no missed.", r,
                 with_header(request, lambda h: (h.pop("reason"), h.pop("missed"), h.update(schema="sct-edge/1.1")))),
        # ---- refused: framing
        refused("two-frames", "Two frames instead of three.", b, beat[:2], "frames"),
        refused("four-frames", "Four frames (a REQ socket's empty delimiter in front).", r, [b"", *request], "frames"),
        refused("unknown-topic", "A topic that is not one of the four broadcast topics.", b,
                [b"sct.mask", *with_header(beat, setting("topic", "sct.mask"))[1:]], "topic"),
        refused("topic-mismatch", "The header's topic differs from the topic frame.", b,
                with_header(beat, setting("topic", "status")), "topic"),
        refused("heartbeat-on-snapshot-socket", "A heartbeat where a snapshot reply is expected.", s, beat, "topic"),
        refused("snapshot-end-on-broadcast", "snapshot.end on the SUB socket.", b, end, "topic"),
        refused("header-not-json", "The header is not JSON.", b, [beat[0], b"{schema: sct-edge/1.3}", beat[2]], "header"),
        refused("header-not-object", "The header is a JSON array.", b, [beat[0], b"[1, 2, 3]", beat[2]], "header"),
        refused("header-not-utf8", "The header is not UTF-8.", b, [beat[0], beat[1].replace(b"heartbeat", b"heartbe\xe4t"),
                                                                   beat[2]], "header"),
        refused("payload-on-heartbeat", "A heartbeat with a payload.", b, [*beat[:2], b"\x00\x00"], "payload"),
        refused("payload-on-request", "A snapshot request with a payload.", r, [*request[:2], b"x"], "payload"),
        # ---- refused: envelope
        refused("schema-major-2", "Another schema major: refuse and stop, never guess.", b,
                with_header(beat, setting("schema", "sct-edge/2.0")), "schema", stop=True),
        refused("schema-malformed", "A schema without a minor version.", b,
                with_header(beat, setting("schema", "sct-edge/1")), "schema"),
        refused("schema-foreign", "Another protocol's schema name.", b, with_header(beat, setting("schema", "other/1.3")),
                "schema"),
        refused("seq-missing", "No seq.", b, with_header(beat, setting("seq", ...)), "seq"),
        refused("seq-zero", "seq 0 on a broadcast topic (broadcast numbers start at 1).", b,
                with_header(beat, setting("seq", 0)), "seq"),
        refused("seq-fraction", "seq written 43.0: an integer has no fraction.", b, with_header(beat, setting("seq", 43.0)),
                "seq"),
        refused("seq-boolean", "seq written true.", b, with_header(beat, setting("seq", True)), "seq"),
        refused("sent-at-string", "sent_at as a string.", b, with_header(beat, setting("sent_at", "1767225701.5")),
                "sent_at"),
        refused("sent-at-nan", "sent_at NaN: not a finite number (not JSON at all, for a strict parser).", b,
                [beat[0], beat[1].replace(b'"sent_at":1767225701.5', b'"sent_at":NaN'), beat[2]], "sent_at",
                also=["header"]),
        refused("publisher-id-number", "publisher_id as a number.", b, with_header(beat, setting("publisher_id", 7)),
                "publisher_id"),
        refused("heartbeat-s-zero", "heartbeat_s 0.", b, with_header(beat, setting("heartbeat_s", 0)), "heartbeat_s"),
        # ---- refused: status
        refused("status-body-missing", "A status without body.", b, with_header(verdict, setting("body", ...)), "body"),
        refused("status-body-array", "A status whose body is an array.", b, with_header(verdict, setting("body", [])),
                "body"),
        refused("status-kind-missing", "A status without kind.", b, with_header(verdict, setting("kind", ...)), "kind"),
        refused("status-acquisition-number", "acquisition_id neither a string nor null.", b,
                with_header(verdict, setting("acquisition_id", 5)), "acquisition_id"),
        refused("status-at-missing", "A status without at.", b, with_header(verdict, setting("at", ...)), "at"),
        # ---- refused: data
        refused("not-synthetic", "synthetic false: every image on this wire is synthetic CT.", b,
                with_header(slab0, setting("synthetic", False)), "synthetic"),
        refused("synthetic-missing", "No synthetic flag.", b, with_header(slab0, setting("synthetic", ...)),
                "synthetic"),
        refused("dtype-big-endian", "dtype >i2.", b, with_header(slab0, setting("dtype", ">i2")), "dtype"),
        refused("units", "units mm.", b, with_header(slab0, setting("units", "mm")), "units"),
        refused("axes", "Another axis order.", b, with_header(slab0, setting("volume.axes", "column,row,slice")),
                "volume.axes"),
        refused("spacing-negative", "A negative spacing.", b,
                with_header(slab0, setting("volume.spacing_mm", [-0.9, 0.7421875, 0.7421875])), "volume.spacing_mm"),
        refused("volume-shape-two", "volume.shape with two numbers.", b,
                with_header(slab0, setting("volume.shape", [3, 2])), "volume.shape"),
        refused("affine-last-row", "The affine's last row is not [0, 0, 0, 1].", b,
                with_header(slab0, lambda h: h["volume"]["affine_lps"].__setitem__(3, [0.0, 0.0, 1.0, 1.0])),
                "volume.affine_lps[3]"),
        refused("affine-norm", "A column of the affine is not as long as its spacing.", b,
                with_header(slab0, bad_norm), "volume.affine_lps"),
        refused("affine-shear", "Directions that are not orthonormal.", b, with_header(slab0, shear),
                "volume.affine_lps"),
        refused("slab-index", "slab.index not below slab.count.", b, with_header(slab0, setting("slab.index", 2)),
                "slab.index"),
        refused("slab-count-fraction", "slab.count written 2.0.", b, with_header(slab0, setting("slab.count", 2.0)),
                "slab.count"),
        refused("slab-outside", "A slab running past the last slice.", b, with_header(slab1, setting("slab.start", 3)),
                "slab.start/size"),
        refused("volume-slab-start", "A volume whose slab does not start at slice 0.", b,
                with_header(vol, lambda h: h["slab"].update(start=1, size=2)), "slab.start/size"),
        refused("shape-mismatch", "shape is not [slab.size, rows, columns].", b,
                with_header(slab0, setting("shape", [1, 2, 4])), "shape"),
        refused("payload-length", "A payload two bytes short.", b, [*slab0[:2], slab0[2][:-2]], "shape"),
        refused("sha256-mismatch", "One payload bit flipped: the digest differs.", b, flipped(slab0), "sha256"),
        refused("sha256-upper-case", "The digest in upper case.", b,
                with_header(slab0, lambda h: h.update(sha256=h["sha256"].upper())), "sha256"),
        refused("model-id-missing", "model without id.", b, with_header(slab0, setting("model.id", ...)), "model.id"),
        refused("inputs-complete-at-missing", "A slab without inputs_complete_at.", b,
                with_header(slab0, setting("inputs_complete_at", ...)), "inputs_complete_at"),
        refused("stitched-zero", "stitched_from_slabs 0.", b, with_header(vol, setting("stitched_from_slabs", 0)),
                "stitched_from_slabs"),
        refused("republished-string", "republished neither true nor false.", b,
                with_header(vol, setting("republished", "yes")), "republished"),
        # ---- refused: snapshot exchange
        refused("snapshot-end-heartbeat-zero", "snapshot.end with heartbeat_s 0.", s,
                with_header(end, setting("heartbeat_s", 0)), "heartbeat_s"),
        refused("snapshot-end-items-missing", "snapshot.end without items.", s, with_header(end, setting("items", ...)),
                "items"),
        refused("snapshot-error-missing-text", "snapshot.error without error.", s,
                with_header(error, setting("error", ...)), "error"),
        # ---- refused: confidence (1.4)
        refused("confidence-dtype", "A confidence message with dtype <i2.", b, with_header(conf0, setting("dtype", "<i2")),
                "dtype"),
        refused("confidence-units", "A confidence message in HU.", b, with_header(conf0, setting("units", "HU")), "units"),
        refused("confidence-accompanies", "accompanies a topic that has no payload.", b,
                with_header(conf0, setting("accompanies", "status")), "accompanies"),
        refused("confidence-threshold-zero", "threshold 0 (1..255: below it is untrusted).", b,
                with_header(conf0, setting("threshold", 0)), "threshold"),
        refused("confidence-not-synthetic", "synthetic false on a confidence message.", b,
                with_header(conf0, setting("synthetic", False)), "synthetic"),
        refused("confidence-payload-length", "A confidence payload one byte short.", b, [*conf0[:2], conf0[2][:-1]],
                "shape"),
        refused("confidence-sha256-mismatch", "One confidence bit flipped.", b, flipped(conf0), "sha256"),
        refused("confidence-regions-count", "flagged 2 with one region listed.", b,
                with_header(confvol, setting("flagged", 2)), "regions"),
        refused("confidence-region-outside", "A region past the last slice.", b,
                with_header(confvol, lambda h: h["regions"][0].update(slices=[1, 4])), "regions[0].slices"),
        refused("confidence-volume-placement", "A volume's confidence that does not cover the volume.", b,
                with_header(confvol, lambda h: h["slab"].update(start=1, size=2)), "slab.start/size"),
        refused("announcement-sha256", "A data message announcing a confidence digest that is not hex.", b,
                with_header(cslab0, setting("confidence.sha256", "z" * 64)), "confidence.sha256"),
        refused("announcement-type", "A data message whose confidence field is a string.", b,
                with_header(cslab0, setting("confidence", "yes")), "confidence"),
    ]  # fmt: skip
    return out


def render() -> bytes:
    lines = [
        json.dumps(vector, ensure_ascii=True, separators=(",", ":"), allow_nan=False) for vector in vectors()
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the file differs from what is written"
    )
    parser.add_argument("--out", type=Path, default=VECTORS_FILE, help=f"default {VECTORS_FILE}")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from what make_vectors.py writes'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(text)
    print(f"wrote {len(text.splitlines())} vectors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
