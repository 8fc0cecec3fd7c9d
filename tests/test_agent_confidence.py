"""Where the sCT is not to be trusted, through a real agent: a phantom with titanium pedicle screws and rods and a
normal one, the shipped model's confidence, the real regions stage, real sockets, real files, dciodvfy; and a
model without confidence, which publishes none and says so.

The question here is whether what the engine flags reaches everyone, not how well it detects (``sct-agent evaluate
--pathology``, docs/model.md). So the screws series runs through the shipped model's confidence with the
shipped threshold where that flags the screws, and otherwise with a stricter threshold in a copy of the manifest
(as a site could calibrate it), chosen from the engine's own confidence on that series so that the screws are
flagged; the normal series runs with the shipped threshold.

What a robot, a navigation system, the technologist and IT get: the ``flagged`` status naming the slices and the
volume, the ``confidence`` topic (live, and from a snapshot for a late joiner), a 1.3 subscriber's unbroken
sequence, the DICOM Segmentation beside the sCT series (dciodvfy clean, its mask the regions), the page's card
and preview, the metrics and the journal.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import zmq
from agent_support import SMALL_FOV_MM, agent_config, write_test_model, write_test_protocol
from PIL import Image
from scanner_support import DCIODVFY, needs_dciodvfy
from test_agent_e2e import SERIES_TIMEOUT_S, RunningAgent, metric, running_agent

from agent.cli.outline import OUTLINE_RGB
from agent.client import ReceivedVolume, SctClient
from agent.dicom_out.untrusted_segmentation import SEGMENTATION_FILE
from agent.publish.wire import ALL_TOPICS, StatusMessage
from engines.confidence.regions import find_flagged_regions
from engines.inference.engine import SctEngine
from engines.model.manifest import ModelManifest
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.phantom.pathology import Pathology
from engines.scanner.export import SimulationRequest

#: A subject whose L4-L5 screws and left rod lie inside the small field of view.
SCREWS_SEED = 900102
NORMAL_SEED = 900101


def small_case(seed: int, *pathologies: Pathology) -> PhantomCase:
    request = SimulationRequest(seed=seed, fov_mm=SMALL_FOV_MM, supersample=1)
    return generate_case(seed, request.acquisition(), supersample=1, pathologies=pathologies)


@pytest.fixture(scope="module")
def screws() -> PhantomCase:
    return small_case(SCREWS_SEED, Pathology.SCREWS)


def flagging_threshold(model: Path, case: PhantomCase) -> int:
    """The shipped threshold if the engine's confidence on ``case`` makes it flag the implant; else one that does
    (30 % of the implant's voxels below it)."""
    manifest = ModelManifest.load(model)
    spec = manifest.confidence
    if spec is None:
        pytest.fail("the shipped model has no confidence section: nothing to flag with")
    engine = SctEngine.load(manifest, backend="torch-eager", in_plane=case.geometry.shape[1:])
    try:
        _, confidence = engine.infer_volume_with_confidence(case.echoes)
    finally:
        engine.close()
    implant = case.anomaly > 0
    found = find_flagged_regions(confidence, spec, case.geometry.spacing)
    if found.mask[implant].any():
        return spec.threshold
    return max(spec.threshold, int(np.percentile(confidence[implant], 30)) + 1)


def start(root: Path, threshold: int | None = None) -> Iterator[RunningAgent]:
    model = write_test_model(root / "model")
    if threshold is not None:
        path = model / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["confidence"]["threshold"] = threshold
        path.write_text(json.dumps(manifest, indent=2))
    config = agent_config(root, write_test_protocol(root / "protocols"), model, quiet_period_s=3.0)
    with running_agent(config, model) as running:
        yield running


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """The shipped model as it is."""
    yield from start(tmp_path_factory.mktemp("agent"))


@pytest.fixture(scope="module")
def flagging_agent(tmp_path_factory: pytest.TempPathFactory, screws: PhantomCase) -> Iterator[RunningAgent]:
    """The shipped model, with a threshold that flags the screws series (the shipped one where that does)."""
    root = tmp_path_factory.mktemp("flagging")
    shipped = write_test_model(root / "probe")
    yield from start(root / "agent", flagging_threshold(shipped, screws))


def flagged_status(agent: RunningAgent, acquisition_id: str) -> StatusMessage:
    for status in list(agent.listener.statuses):
        if status.kind == "flagged" and status.acquisition_id == acquisition_id:
            return status
    raise AssertionError(f"no flagged status for {acquisition_id}")


def publish(agent: RunningAgent, case: PhantomCase, folder: str) -> ReceivedVolume:
    """Export ``case`` and wait for its volume and its DICOM write; the volume as the subscriber got it."""
    before = {v.acquisition_id for v in agent.listener.volumes}
    agent.export_series(case, folder, rate_files_per_s=200.0)
    agent.listener.wait(lambda listener: any(v.acquisition_id not in before for v in listener.volumes))
    volume = next(v for v in agent.listener.volumes if v.acquisition_id not in before)
    agent.listener.wait(lambda listener: bool(listener.dicom_written(volume.acquisition_id)))
    return volume


def dicom_body(agent: RunningAgent, acquisition_id: str) -> dict[str, object]:
    for status in list(agent.listener.statuses):
        if (
            status.kind == "dicom"
            and status.acquisition_id == acquisition_id
            and status.body["step"] == "write"
        ):
            return dict(status.body)
    raise AssertionError("no dicom write status")


def test_screws_are_flagged_on_the_wire_in_dicom_on_the_page_and_in_the_journal(
    flagging_agent: RunningAgent, screws: PhantomCase
) -> None:
    agent, case = flagging_agent, screws
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    old = context.socket(zmq.SUB)  # a 1.3 robot: the four topics, counting
    old.setsockopt(zmq.LINGER, 0)
    for topic in ALL_TOPICS:
        old.setsockopt(zmq.SUBSCRIBE, topic)
    old.connect(agent.pipeline.endpoints.publish)
    time.sleep(0.3)
    try:
        volume = publish(agent, case, "screws")
        seen: list[tuple[bytes, int]] = []
        drained = time.monotonic() + 3.0  # all of the series is queued by now; heartbeats never stop
        while time.monotonic() < drained and old.poll(300):
            frames = old.recv_multipart()
            seen.append((frames[0], int(json.loads(frames[1])["seq"])))
    finally:
        old.close()
    acquisition = volume.acquisition_id

    # The status names the slices and the volume, and the regions cover the screws.
    status = flagged_status(agent, acquisition)
    body = status.body
    assert body["checked"] is True and body["flagged"] >= 1 and body["regions"], body
    assert str(body["message"]).startswith("sCT not trusted in slice")
    assert "outside the conditions the model was validated on" in str(body["message"])
    implant = case.anomaly > 0
    covered = np.zeros(implant.shape, dtype=bool)
    for region in body["regions"]:
        (s0, s1), (r0, r1), (c0, c1) = region["slices"], region["rows"], region["columns"]
        covered[s0:s1, r0:r1, c0:c1] = True
    assert covered[implant].any(), "a flagged region lies on the implant"

    # The confidence came with each slab and with the volume; the regions are those of the volume's confidence.
    assert volume.confidence is not None and volume.flagged == body["flagged"]
    assert [r.as_json() for r in volume.regions] == [
        {k: v for k, v in r.items() if k != "message"} for r in body["regions"]
    ]
    slabs = [c for c in agent.listener.confidences if c.acquisition_id == acquisition and not c.is_volume]
    assert len(slabs) == volume.slab_count
    stitched = np.concatenate([c.confidence for c in sorted(slabs, key=lambda c: c.start)])
    assert stitched.tobytes() == volume.confidence.tobytes()
    spec = ModelManifest.load(agent.model_dir).confidence
    assert spec is not None and volume.confidence_threshold == spec.threshold
    found = find_flagged_regions(volume.confidence, spec, volume.geometry.spacing)

    # A 1.3 robot saw its four topics, numbered without a gap, and no confidence message.
    assert seen and b"confidence" not in {t for t, _ in seen}
    numbers = [n for _, n in seen]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))

    # A robot that joins now gets the volume with its confidence and regions from the snapshot.
    endpoints = agent.pipeline.endpoints
    with SctClient(endpoints.publish, snapshot_endpoint=endpoints.snapshot) as late:
        deadline = time.monotonic() + SERIES_TIMEOUT_S
        replayed = None
        while replayed is None and time.monotonic() < deadline:
            late.receive(0.1)
            replayed = next((v for v in late.completed_volumes if v.acquisition_id == acquisition), None)
    assert replayed is not None and replayed.from_snapshot and replayed.confidence is not None
    assert replayed.confidence.tobytes() == volume.confidence.tobytes() and replayed.regions == volume.regions

    # The DICOM Segmentation is beside the sCT series, passes dciodvfy, and its mask is the regions.
    written = dicom_body(agent, acquisition)
    assert written["segmentation"] == SEGMENTATION_FILE
    folder = agent.config.dicom_folder
    assert folder is not None
    series = folder / str(written["series_folder"])
    seg_path = series / SEGMENTATION_FILE
    check_segmentation(seg_path, sorted(series.glob("CT*.dcm")), found.mask)

    # IT: metrics and the journal.
    text = agent.metrics_text()
    assert metric(text, 'sct_agent_flagged_volumes_total{outcome="flagged"}') >= 1
    assert metric(text, "sct_agent_flagged_regions_total") >= body["flagged"]
    journal = sqlite3.connect(f"file:{agent.config.state.folder / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        row = journal.execute(
            "SELECT flagged, flagged_regions FROM volumes WHERE acquisition_id = ?", (acquisition,)
        ).fetchone()
    finally:
        journal.close()
    assert row is not None and row[0] == body["flagged"] and len(json.loads(row[1])) == body["flagged"]

    # The technologist's page: the card says where and how much; the preview outlines the region.
    page = agent.pipeline.endpoints.page_url
    with urllib.request.urlopen(page + "state.json", timeout=10) as response:
        card = next(c for c in json.load(response)["acquisitions"] if c["acquisition_id"] == acquisition)
    assert card["flagged"]["verdict"] == "flagged" and card["flagged"]["regions"] == body["flagged"]
    assert card["flagged"]["lines"][0] == body["regions"][0]["message"]
    deadline = time.monotonic() + SERIES_TIMEOUT_S
    while not card["preview"] and time.monotonic() < deadline:
        time.sleep(0.1)
        with urllib.request.urlopen(page + "state.json", timeout=10) as response:
            card = next(c for c in json.load(response)["acquisitions"] if c["acquisition_id"] == acquisition)
    with urllib.request.urlopen(f"{page}preview/{acquisition}.png", timeout=10) as response:
        preview = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"), dtype=np.int16)
    assert (np.abs(preview - np.array(OUTLINE_RGB)).sum(axis=-1) < 30).sum() > 200


def check_segmentation(path: Path, cts: list[Path], expected: np.ndarray) -> None:
    assert path.is_file()
    if DCIODVFY is not None:
        result = subprocess.run(
            [DCIODVFY, str(path)], capture_output=True, encoding="latin-1", check=False, timeout=120
        )
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
        assert result.returncode == 0 and not errors, errors
    seg = hd.seg.segread(path)
    uids = [str(pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID) for ct in cts]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], assert_missing_frames_are_empty=True
    )
    assert np.array_equal(pixels[..., 0] > 0, expected)


@needs_dciodvfy
def test_a_normal_series_says_flagged_0_and_writes_no_segmentation(agent: RunningAgent) -> None:
    volume = publish(agent, small_case(NORMAL_SEED), "normal")
    body = flagged_status(agent, volume.acquisition_id).body
    assert (body["checked"], body["flagged"], body["regions"]) == (True, 0, [])
    assert volume.confidence is not None and volume.flagged == 0
    written = dicom_body(agent, volume.acquisition_id)
    assert written["segmentation"] is None and "no DICOM Segmentation (nothing flagged)" in str(
        written["message"]
    )
    folder = agent.config.dicom_folder
    assert folder is not None
    assert not (folder / str(written["series_folder"]) / SEGMENTATION_FILE).exists()


def test_a_model_without_confidence_publishes_none_and_says_it_did_not_check(tmp_path: Path) -> None:
    model = write_test_model(tmp_path / "model")
    manifest_path = model / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("confidence", None)  # a site model without one (its statistics file, if any, is left unused)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    assert ModelManifest.load(model).confidence is None
    config = agent_config(tmp_path, write_test_protocol(tmp_path / "protocols"), model, quiet_period_s=3.0)
    with running_agent(config, model) as running:
        volume = publish(running, small_case(SCREWS_SEED, Pathology.SCREWS), "screws")
        body = flagged_status(running, volume.acquisition_id).body
        assert (body["checked"], body["flagged"], body["threshold"]) == (False, None, None)
        assert "has no confidence output" in str(body["message"])
        assert volume.confidence is None and volume.flagged is None
        assert not [c for c in running.listener.confidences if c.acquisition_id == volume.acquisition_id]
        written = dicom_body(running, volume.acquisition_id)
        assert written["segmentation"] is None and "nothing was checked" in str(written["message"])
        text = running.metrics_text()
        assert metric(text, 'sct_agent_flagged_volumes_total{outcome="unchecked"}') == 1
        assert metric(text, 'sct_agent_published_messages_total{topic="confidence"}') == 0
