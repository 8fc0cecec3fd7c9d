"""docs/protocol.md's own artefacts: the JSON Schema of every header and the recorded test vectors.

Every vector is replayed through the reference decoder, which must reach the conclusion the vector states
(accepted with those values, to the bit; or refused naming that field). The vectors are regenerated from their
script and must come out byte for byte as committed. The geometry a decoder reads is the engine's to the bit,
and the grid the assembler places starts at slice 0's ImagePositionPatient exactly as the file states it.
(That every header a running agent sends fits the schema is checked in tests/test_agent_e2e.py, on its agent.)
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
from protocol_spec_support import (
    MAKE_VECTORS,
    REPOSITORY,
    SCHEMA_1_3_FILE,
    VECTORS_1_3_FILE,
    VECTORS_FILE,
    schema_errors,
    validator,
)

from agent.ingest.assembler import Assembler
from agent.publish.publisher import Publisher
from agent.publish.wire import (
    ConfidenceMessage,
    HeartbeatMessage,
    SchemaVersionError,
    SlabMessage,
    SnapshotEnd,
    SnapshotError,
    SnapshotRequest,
    StatusMessage,
    VolumeMessage,
    WireError,
    decode,
    decode_snapshot_reply,
    decode_snapshot_request,
    encode,
)
from agent.records import AcquisitionUpdate, ArrivedFile, SctVolume
from agent.vocabulary import ArrivalSource, UpdateKind
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, OutputFormat, SimulationRequest, export_case
from sct_core.geometry import Orientation, VolumeGeometry

DECODERS: dict[str, Callable[[list[bytes]], object]] = {
    "broadcast": decode,
    "snapshot_reply": decode_snapshot_reply,
    "snapshot_request": decode_snapshot_request,
}


def load_vectors(path: Path = VECTORS_FILE) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


def make_vectors_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", MAKE_VECTORS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VECTORS = load_vectors()
VECTORS_1_3 = load_vectors(VECTORS_1_3_FILE)


def strict_json(text: bytes) -> Any:
    """RFC 8259 JSON: NaN and Infinity are not JSON (Python's parser takes them unless told)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def frames_of(vector: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(f, validate=True) for f in vector["frames"]]


def same_double(found: float, expected: float) -> bool:
    return np.float64(found).tobytes() == np.float64(expected).tobytes()


# ----------------------------------------------------------------------------------------------- vectors


def test_vectors_are_what_the_script_writes() -> None:
    assert make_vectors_module().render() == VECTORS_FILE.read_bytes()


def test_vectors_have_unique_names_and_cover_every_topic_and_socket() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names))
    accepted_topics = {frames_of(v)[0].decode() for v in VECTORS if v["expect"]["accepted"]}
    assert accepted_topics == {"status", "sct.slab", "sct.volume", "heartbeat", "confidence", "snapshot.request",
                               "snapshot.end", "snapshot.error"}  # fmt: skip
    assert {v["socket"] for v in VECTORS} == set(DECODERS)
    assert sum(not v["expect"]["accepted"] for v in VECTORS) >= 40


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_the_reference_decoder_reaches_each_vectors_conclusion(vector: dict[str, Any]) -> None:
    frames = frames_of(vector)
    expect = vector["expect"]
    decoder = DECODERS[vector["socket"]]
    if not expect["accepted"]:
        with pytest.raises(WireError) as refused:
            decoder(frames)
        assert refused.value.attribute in [expect["field"], *expect.get("also", [])], str(refused.value)
        assert isinstance(refused.value, SchemaVersionError) == expect.get("stop", False)
        return
    check_message(decoder(frames), expect["message"])


@pytest.mark.parametrize("vector", VECTORS_1_3, ids=[v["name"] for v in VECTORS_1_3])
def test_a_1_4_decoder_reaches_each_1_3_vectors_conclusion(vector: dict[str, Any]) -> None:
    """The previous minor's vectors, as published: a 1.4 receiver still reads every 1.3 message the same way."""
    test_the_reference_decoder_reaches_each_vectors_conclusion(vector)


def check_message(message: object, expected: dict[str, Any]) -> None:
    assert isinstance(
        message,
        HeartbeatMessage
        | StatusMessage
        | SlabMessage
        | VolumeMessage
        | ConfidenceMessage
        | SnapshotEnd
        | SnapshotError
        | SnapshotRequest,
    )
    assert (message.schema, message.seq, message.publisher_id) == (
        expected["schema"],
        expected["seq"],
        expected["publisher_id"],
    )
    assert same_double(message.sent_at, expected["sent_at"])
    if isinstance(message, HeartbeatMessage):
        assert message.heartbeat_s == expected.get("heartbeat_s")
    elif isinstance(message, StatusMessage):
        assert (message.kind, message.acquisition_id) == (expected["kind"], expected["acquisition_id"])
        assert dict(message.body) == expected["body"] and same_double(message.at, expected["at"])
    elif isinstance(message, SnapshotEnd):
        assert (message.items, message.heartbeat_s) == (expected["items"], expected["heartbeat_s"])
    elif isinstance(message, SnapshotError):
        assert message.error == expected["error"]
    elif isinstance(message, SnapshotRequest):
        assert (message.reason, message.missed) == (expected.get("reason", ""), expected.get("missed", 0))
    elif isinstance(message, ConfidenceMessage):
        check_confidence(message, expected)
    else:
        volume = expected["volume"]
        assert message.geometry.shape == tuple(volume["shape"])
        assert all(
            same_double(a, b) for a, b in zip(message.geometry.spacing, volume["spacing_mm"], strict=True)
        )
        # The matrix a robot uses is the one sent, to the bit: shortest round-trip doubles both ways.
        assert message.geometry.affine.tobytes() == np.array(volume["affine_lps"], dtype=np.float64).tobytes()
        assert (message.acquisition_id, message.protocol_id, message.sha256) == (
            expected["acquisition_id"],
            expected["protocol_id"],
            expected["sha256"],
        )
        assert (message.model_id, message.model_version) == (
            expected["model"]["id"],
            expected["model"]["version"],
        )
        assert same_double(message.produced_at, expected["produced_at"])
        assert message.hu.tolist() == expected["hu"]
        slab = expected["slab"]
        if isinstance(message, SlabMessage):
            placement = (message.slab_index, message.slab_count, message.start, message.size)
            assert placement == (slab["index"], slab["count"], slab["start"], slab["size"])
            assert same_double(message.inputs_complete_at, expected["inputs_complete_at"])
        else:
            assert (slab["index"], slab["count"], slab["start"], slab["size"]) == (
                0,
                1,
                0,
                message.geometry.shape[0],
            )
            assert message.stitched_from_slabs == expected["stitched_from_slabs"]
            assert message.republished == expected["republished"]
        announced = expected.get("confidence")
        assert message.confidence_sha256 == (None if announced is None else announced["sha256"])


def check_confidence(message: ConfidenceMessage, expected: dict[str, Any]) -> None:
    """A confidence message: the same grid and placement rules as data messages, the uint8 values, the
    threshold and method, and for a volume the regions."""
    volume = expected["volume"]
    assert message.geometry.affine.tobytes() == np.array(volume["affine_lps"], dtype=np.float64).tobytes()
    assert message.geometry.shape == tuple(volume["shape"])
    assert (message.accompanies, message.acquisition_id, message.protocol_id, message.sha256) == (
        expected["accompanies"],
        expected["acquisition_id"],
        expected["protocol_id"],
        expected["sha256"],
    )
    slab = expected["slab"]
    assert (message.slab_index, message.slab_count, message.start, message.size) == (
        slab["index"], slab["count"], slab["start"], slab["size"],
    )  # fmt: skip
    assert (message.method, message.threshold, message.republished) == (
        expected["method"],
        expected["threshold"],
        expected["republished"],
    )
    assert message.confidence.tolist() == expected["confidence"]
    assert message.flagged == expected.get("flagged")
    assert [r.as_json() for r in message.regions] == expected.get("regions", [])


# ------------------------------------------------------------------------------------------------ schema


def test_every_accepted_vector_fits_the_schema_and_refused_headers_mostly_do_not() -> None:
    check = validator(strict=False)
    for vector in VECTORS:
        frames = frames_of(vector)
        try:
            header = strict_json(frames[1])
        except ValueError:  # not JSON: nothing for a schema to judge
            continue
        if vector["expect"]["accepted"]:
            assert not schema_errors(check, header), (vector["name"], schema_errors(check, header))
    # JSON Schema sees a header alone: refusals that need the payload, the frames or geometry are beyond it.
    beyond_schema = {"frames", "topic", "payload", "shape", "sha256", "slab.index", "slab.start/size", "slab.count",
                     "seq", "volume.affine_lps", "volume.affine_lps[3]", "header", "regions",
                     "regions[0].slices"}  # fmt: skip
    for vector in VECTORS:
        expect = vector["expect"]
        if expect["accepted"] or expect["field"] in beyond_schema or expect.get("stop"):
            continue
        try:
            header = strict_json(frames_of(vector)[1])
        except ValueError:
            continue
        assert schema_errors(check, header), (
            f"{vector['name']}: the schema lets through what the decoder refuses"
        )


def test_every_1_4_header_on_the_four_1_3_topics_fits_the_1_3_schema() -> None:
    """What a 1.3 receiver is handed by a 1.4 publisher on the topics it subscribes to: headers its own schema
    takes (new fields are ignored, as section 9 says), so it is unaffected; the confidence topic it never
    subscribes to, and the snapshot replies it asks for as 1.3 carry none (tests/test_confidence_wire.py)."""
    old = validator(strict=False, path=SCHEMA_1_3_FILE)
    for vector in VECTORS:
        frames = frames_of(vector)
        if not vector["expect"]["accepted"] or frames[0] == b"confidence":
            continue
        header = strict_json(frames[1])
        assert not schema_errors(old, header), (vector["name"], schema_errors(old, header))


def test_the_schema_and_the_vectors_cite_nothing_outside_the_repository() -> None:
    for path in (REPOSITORY / "docs" / "protocol").rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".py", ".md"}:
            text = path.read_text(encoding="utf-8")
            assert str(REPOSITORY.parent) not in text and "../shared" not in text, path


# ---------------------------------------------------------------------------------------------- geometry


def random_geometry(rng: np.random.Generator) -> VolumeGeometry:
    grid = VolumeGeometry.from_fov(
        center=(0.0, 0.0, 0.0),
        fov_mm=(16 * 0.7421875, 12 * 0.7421875, 5 * 0.9),
        voxel_mm=(0.7421875, 0.7421875, float(rng.choice([0.9, 1.1, 1.0 / 3.0]))),
        orientation=Orientation(rng.choice([o.value for o in Orientation])),
        oblique_deg=float(rng.uniform(-30, 30)),
    )
    origin = (float(rng.uniform(-300, 300)), float(rng.uniform(-300, 300)), float(rng.uniform(-300, 300)))
    return VolumeGeometry(grid.shape, grid.spacing, origin, grid.row_direction, grid.column_direction,
                          grid.slice_direction)  # fmt: skip


def test_the_decoded_affine_is_the_engines_to_the_bit() -> None:
    rng = np.random.default_rng(20261204)
    for _ in range(200):
        grid = random_geometry(rng)
        hu = np.zeros(grid.shape, dtype=np.int16)
        volume = SctVolume("a", "p", "m", "1", grid, hu, hashlib.sha256(hu.tobytes()).hexdigest(), 1, 0.0)
        frames = [bytes(f) for f in encode(volume, 1, "p1", 0.0)]
        header = json.loads(frames[1])
        assert np.array(header["volume"]["affine_lps"], dtype=np.float64).tobytes() == grid.affine.tobytes()
        decoded = decode(frames)
        assert isinstance(decoded, VolumeMessage)
        assert decoded.geometry.affine.tobytes() == grid.affine.tobytes()
        assert decoded.geometry.origin == grid.origin


def assemble(folder: Path) -> list[AcquisitionUpdate]:
    updates: list[AcquisitionUpdate] = []
    assembler = Assembler(updates.append, quiet_period_s=math.inf)
    for path in sorted(folder.rglob("*.dcm")):
        assembler.add_file(ArrivedFile(path, path.stat().st_size, 0, time.time(), ArrivalSource.EVENT))
        assembler.flush()
    assembler.end_all()
    return updates


@pytest.mark.parametrize("output_format", [OutputFormat.CLASSIC, OutputFormat.ENHANCED])
def test_the_grid_starts_at_slice_0s_stated_position_at_full_precision(
    tmp_path: Path, output_format: OutputFormat
) -> None:
    request = SimulationRequest(
        seed=900402, settings=(), echoes=None, fov_mm=(40.0, 40.0, 9.0), supersample=1
    )
    case = generate_case(900402, request.acquisition(), supersample=1)
    export_case(case, ExportOptions(out_dir=tmp_path, format=output_format))
    final = [u.view for u in assemble(tmp_path) if u.kind is not UpdateKind.IMAGES]
    assert len(final) == 1 and final[0].grid is not None
    grid = final[0].grid

    first = pydicom.dcmread(next(iter(sorted(tmp_path.rglob("*.dcm")))), stop_before_pixels=True)
    if output_format is OutputFormat.ENHANCED:
        frames = first.PerFrameFunctionalGroupsSequence
        positions = [tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient) for f in frames]
        stated = min(positions, key=lambda p: float(np.dot(p, grid.slice_direction)))
    else:
        stated = min(
            (tuple(float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient)
             for f in tmp_path.rglob("*.dcm")),
            key=lambda p: float(np.dot(p, grid.slice_direction)),
        )  # fmt: skip
    # The console states more than 0.1 µm (so rounding would show), and the grid keeps every digit.
    assert any(len(re.sub(r"^-?\d+\.?", "", repr(v))) > 4 for v in stated)
    assert grid.origin == stated


# ----------------------------------------------------------------------------------- the document's C++ client

#: Replays vectors through the sample's own ``parse``: reads, per vector, the socket (1 byte: b, s or r), the
#: frame count and each frame (little-endian 32-bit lengths), and prints A (accepted), R (refused) or S (refused
#: as another schema major: the sample throws).
CPP_HARNESS = r"""
#include <cstdint>
static bool read_exact(void* to, size_t n) { return std::fread(to, 1, n, stdin) == n; }
int main(int argc, char** argv) {
  if (argc != 2 || std::string(argv[1]) != "--vectors") return sample_main(argc, argv);
  char socket;
  while (read_exact(&socket, 1)) {
    uint32_t count = 0;
    read_exact(&count, 4);
    std::vector<zmq::message_t> frames;
    for (uint32_t i = 0; i < count; ++i) {
      uint32_t size = 0;
      read_exact(&size, 4);
      zmq::message_t frame(size);
      if (size) read_exact(frame.data(), size);
      frames.push_back(std::move(frame));
    }
    Msg m;
    char verdict = 'R';
    try {
      const bool valid = parse(frames, m);
      const bool here = socket == 'b' ? !m.topic.starts_with("snapshot.") : m.topic != "heartbeat";
      verdict = valid && here ? 'A' : 'R';
    } catch (const std::runtime_error&) { verdict = 'S'; }
    std::cout << verdict;
  }
  std::cout << std::endl;
}
"""


def documented_cpp_client() -> str:
    """The client of section 11.1 with the helpers of sections 4.5, 5 and 8.4 pasted where it says."""
    text = (REPOSITORY / "docs" / "protocol.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```cpp\n(.*?)```", text, re.S)
    helpers = [
        b for b in blocks if re.search(r"static \w+(::\w+)? (valid_geometry|sha256_hex|read_key)\(", b)
    ]
    sample = next(b for b in blocks if "struct Client" in b)
    marker = (
        "// >>> valid_geometry (section 4.5), sha256_hex (section 5) and read_key (section 8.4) go here.\n"
    )
    assert marker in sample and len(helpers) == 3
    return str(sample.replace(marker, "".join(helpers)))


@pytest.fixture(scope="module")
def cpp_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented client compiled as section 11.1 says (with a vector-replay entry point added)."""
    headers = [
        Path("/usr/include/zmq.hpp"),
        Path("/usr/include/nlohmann/json.hpp"),
        Path("/usr/include/openssl/evp.h"),
    ]
    compiler = shutil.which("g++")
    if compiler is None or not all(h.is_file() for h in headers):
        pytest.skip(
            "needs g++, cppzmq, nlohmann-json and OpenSSL headers (Debian: cppzmq-dev nlohmann-json3-dev)"
        )
    folder = tmp_path_factory.mktemp("cpp")
    source = folder / "sct_client.cpp"
    source.write_text(
        documented_cpp_client().replace("int main(int argc", "int sample_main(int argc") + CPP_HARNESS
    )
    binary = folder / "sct_client"
    build = subprocess.run(
        [compiler, "-std=c++20", "-Wall", "-Wextra", "-Werror", "-O1", str(source), "-o", str(binary), "-lzmq",
         "-lcrypto"],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    return binary


def test_the_documented_cpp_client_reaches_each_vectors_conclusion(cpp_client: Path) -> None:
    replayed = [v for v in VECTORS if v["socket"] != "snapshot_request"]  # the client never decodes requests
    stream = bytearray()
    for vector in replayed:
        frames = frames_of(vector)
        stream += vector["socket"][0].encode() + len(frames).to_bytes(4, "little")
        for frame in frames:
            stream += len(frame).to_bytes(4, "little") + frame
    result = subprocess.run(
        [str(cpp_client), "--vectors"], input=bytes(stream), capture_output=True, check=True, timeout=60
    )
    verdicts = result.stdout.decode().strip()
    assert len(verdicts) == len(replayed)
    expected = ["A" if v["expect"]["accepted"] else "S" if v["expect"].get("stop") else "R" for v in replayed]
    wrong = [(v["name"], e, f) for v, e, f in zip(replayed, expected, verdicts, strict=True) if e != f]
    assert not wrong, wrong


def test_the_documented_cpp_client_rebuilds_volumes_from_the_agents_publisher(cpp_client: Path) -> None:
    """A late join (slab 0 only in the snapshot), slab 1 live, the volume, then the same volume republished."""
    module = make_vectors_module()
    slabs, volume = module.slabs_and_volume()
    publisher = Publisher("tcp://127.0.0.1:0", snapshot_endpoint="tcp://127.0.0.1:0", heartbeat_s=0.2)
    publisher.start()
    try:
        publisher.submit(slabs[0])
        assert publisher.snapshot_endpoint is not None
        with subprocess.Popen(
            [str(cpp_client), publisher.endpoint, publisher.snapshot_endpoint],
            stdout=subprocess.PIPE,
            text=True,
        ) as client:
            assert client.stdout is not None
            time.sleep(
                1.0
            )  # connected, subscribed and synchronised (heartbeats every 0.2 s show it is alive)
            publisher.submit(slabs[1])
            publisher.submit(volume)
            first = client.stdout.readline()
            publisher.submit(replace(volume, republished=True))
            second = client.stdout.readline()
            client.terminate()
    finally:
        publisher.stop()
    assert first.startswith(f"volume {volume.acquisition_id} ") and f'"{volume.sha256}"' in first
    assert "complete_from_slabs 1 matches 1 republished 0" in first, first
    assert f'"{volume.sha256}"' in second and "complete_from_slabs 0 matches 0 republished 1" in second, (
        second
    )


def test_the_documented_cpp_client_rebuilds_the_confidence_with_the_volume(cpp_client: Path) -> None:
    """1.4: a late join (slab 0 and its confidence in the snapshot), slab 1 and its confidence live, then the
    volume handed over with its confidence (equal to the slabs') and the region count; then a volume without."""
    module = make_vectors_module()
    slabs, volume = module.slabs_and_volume_with_confidence()
    _, plain = module.slabs_and_volume()
    other = replace(plain, acquisition_id="0a1b2c3d4e5f6071")
    publisher = Publisher("tcp://127.0.0.1:0", snapshot_endpoint="tcp://127.0.0.1:0", heartbeat_s=0.2)
    publisher.start()
    try:
        publisher.submit(slabs[0])
        assert publisher.snapshot_endpoint is not None
        with subprocess.Popen(
            [str(cpp_client), publisher.endpoint, publisher.snapshot_endpoint],
            stdout=subprocess.PIPE,
            text=True,
        ) as client:
            assert client.stdout is not None
            time.sleep(1.0)  # connected, subscribed and synchronised
            publisher.submit(slabs[1])
            publisher.submit(volume)
            first = client.stdout.readline()
            publisher.submit(other)
            second = client.stdout.readline()
            client.terminate()
    finally:
        publisher.stop()
    assert first.startswith(f"volume {volume.acquisition_id} ") and "complete_from_slabs 1 matches 1" in first
    assert f'confidence "{volume.confidence_sha256}" confidence_matches 1 flagged 1' in first, first
    assert second.startswith(f"volume {other.acquisition_id} ") and second.rstrip().endswith(
        "confidence none"
    )
