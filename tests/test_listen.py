"""``sct-agent listen`` in-process against a real Publisher on loopback."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from wire_support import random_hu, slabs_and_volume

from agent.cli.listen import (
    DEFAULT_ENDPOINT,
    EXIT_BAD_ARGUMENTS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    LABEL_HEIGHT,
    add_parser,
    describe_status,
    main,
    render_preview,
    run_listen,
    save_volume,
)
from agent.client import ReceivedVolume
from agent.publish.curve_keys import create_key_pair
from agent.publish.publisher import Publisher
from agent.publish.wire import StatusMessage, decode, encode
from agent.records import Reason, SctSlab, SctVolume, StatusEvent, Verdict, payload_sha256
from agent.status_events import error_event, progress_event, verdict_event, watch_event
from agent.vocabulary import Outcome
from sct_core.geometry import Orientation, VolumeGeometry

WAIT_S = 10.0
#: Nothing listens here, so a client connected to it hears nothing.
SILENT_ENDPOINT = "tcp://127.0.0.1:9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def geometry() -> VolumeGeometry:
    return VolumeGeometry.from_fov(
        center=(0.0, -20.0, 60.0),
        fov_mm=(24 * 1.0, 20 * 1.0, 8 * 2.0),
        voxel_mm=(1.0, 1.0, 2.0),
        orientation=Orientation.SAGITTAL,
        oblique_deg=8.0,
    )


def hu_volume(shape: tuple[int, int, int]) -> npt.NDArray[np.int16]:
    return random_hu(shape, seed=11, low=-1000, high=2000)


def publications(grid: VolumeGeometry, hu: npt.NDArray[np.int16]) -> list[SctSlab | SctVolume]:
    return slabs_and_volume(grid, hu, acquisition_id="acq-42")


def verdict() -> Verdict:
    return Verdict(
        acquisition_id="acq-42",
        protocol_id="lumbar-dual-echo-v1",
        protocol_version="3",
        outcome=Outcome.REJECT,
        final=True,
        reasons=(
            Reason("lumbar-dual-echo-v1", "EchoTime2", "5.1", "4.6 to 4.8 ms", "timing"),
            Reason("lumbar-dual-echo-v1", "PixelBandwidth", "200", ">= 400 Hz/px", "bandwidth"),
        ),
        pending=(),
        decided_at=time.time(),
    )


def as_status(event: StatusEvent) -> StatusMessage:
    message = decode([bytes(f) for f in encode(event, 1, "p", 0.0)])
    assert isinstance(message, StatusMessage)
    return message


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    publisher = Publisher("tcp://127.0.0.1:0", snapshot_endpoint="tcp://127.0.0.1:0", heartbeat_s=0.05)
    publisher.start()
    yield publisher
    publisher.stop()


def wait_for_text(stream: io.StringIO, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while text not in stream.getvalue():
        assert time.monotonic() < deadline, f"{text!r} never printed; output so far:\n{stream.getvalue()}"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------- end to end


def test_listen_saves_one_volume_and_prints_what_happened(publisher: Publisher, tmp_path: Path) -> None:
    grid = geometry()
    hu = hu_volume(grid.shape)
    out = io.StringIO()
    result: list[int] = []
    assert publisher.snapshot_endpoint is not None
    argv = [
        "--endpoint",
        publisher.endpoint,
        "--snapshot",
        publisher.snapshot_endpoint,
        "--out",
        str(tmp_path),
        "--count",
        "1",
        "--timeout",
        str(WAIT_S),
    ]
    listener = threading.Thread(target=lambda: result.append(main(argv, stdout=out)))
    listener.start()
    try:
        wait_for_text(out, f"publisher {publisher.publisher_id}")  # subscribed: it has heard a heartbeat
        publisher.submit(verdict_event(verdict()))
        publisher.submit(progress_event("acq-42", slabs_done=1, slab_count=2, at=time.time()))
        for item in publications(grid, hu):
            publisher.submit(item)
    finally:
        listener.join(WAIT_S)
    assert not listener.is_alive()
    assert result == [EXIT_OK]

    folder = tmp_path / "acq-42"
    assert sorted(p.name for p in folder.iterdir()) == [
        "geometry.json",
        "preview.png",
        "sct.npy",
    ]  # no temp left
    saved = np.load(folder / "sct.npy")
    assert saved.dtype == np.dtype("<i2")
    assert saved.tobytes() == hu.tobytes()

    record = json.loads((folder / "geometry.json").read_text())
    np.testing.assert_allclose(record["affine_lps"], grid.affine, rtol=0, atol=1e-12)
    assert record["shape"] == [8, 24, 20]
    assert record["spacing_mm"] == [2.0, 1.0, 1.0]
    assert record["axes"] == "slice,row,column"
    assert record["model"] == {"id": "sct-unet", "version": "1.2.0"}
    assert record["protocol_id"] == "lumbar-dual-echo-v1"
    assert record["synthetic"] is True
    assert record["sha256"] == hashlib.sha256(saved.tobytes()).hexdigest()
    assert record["complete_from_slabs"] is True and record["matches_volume_message"] is True

    png = (folder / "preview.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    with Image.open(folder / "preview.png") as image:
        image.verify()
        assert image.format == "PNG"

    text = out.getvalue()
    assert "verdict acq-42: REJECT (final, protocol lumbar-dual-echo-v1 3)" in text
    assert "EchoTime2: found 5.1, required 4.6 to 4.8 ms (protocol lumbar-dual-echo-v1)" in text
    assert "PixelBandwidth: found 200, required >= 400 Hz/px (protocol lumbar-dual-echo-v1)" in text
    assert "progress acq-42: slabs 1/2" in text
    assert "volume acq-42: 8x24x20 voxels, spacing 2 x 1 x 1 mm, model sct-unet 1.2.0" in text
    assert "checksum ok" in text and "slabs 2/2, equal to the volume message" in text
    assert f"saved {folder}" in text


def test_listen_gives_up_after_the_timeout_with_status_1(tmp_path: Path) -> None:
    out = io.StringIO()
    started = time.monotonic()

    status = main(["--endpoint", SILENT_ENDPOINT, "--out", str(tmp_path), "--timeout", "0.3"], stdout=out)

    assert status == EXIT_TIMEOUT
    assert 0.3 <= time.monotonic() - started < WAIT_S
    assert "--timeout 0.3" in out.getvalue()
    assert not any(tmp_path.iterdir())


def test_ctrl_c_closes_the_socket_and_exits_130(tmp_path: Path) -> None:
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        status = main(
            ["--endpoint", SILENT_ENDPOINT, "--out", str(tmp_path), "--timeout", "5"], stdout=io.StringIO()
        )
    finally:
        timer.cancel()
        timer.join()

    assert status == EXIT_INTERRUPTED


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--server-key", "server.key"], "--server-key and --client-key go together"),
        (
            ["--server-key", "/nonexistent/server.key", "--client-key", "/nonexistent/x.key_secret"],
            "no such file",
        ),
        (["--count", "0"], "--count: found 0; expected N >= 1"),
        (["--timeout", "-1"], "--timeout: found -1.0; expected S > 0"),
        (["--count", "two"], "invalid int value"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_unusable_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv, stdout=io.StringIO()) == EXIT_BAD_ARGUMENTS
    assert message in capsys.readouterr().err


def test_registers_as_a_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="sct-agent")
    add_parser(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["listen", "--count", "2"])

    assert args.handler is run_listen
    assert (args.endpoint, args.out, args.count, args.timeout) == (
        DEFAULT_ENDPOINT,
        Path("sct-received"),
        2,
        None,
    )


# ---------------------------------------------------------------------------------------- lines and files


def test_status_lines() -> None:
    assert describe_status(
        as_status(error_event("acq-42", stage="engine", message="CUDA out of memory", at=0.0))
    ) == ("ERROR acq-42: engine: CUDA out of memory")
    lost = watch_event(
        available=False, folder="/srv/export", message="watch folder /srv/export is missing", at=0.0
    )
    assert describe_status(as_status(lost)) == "WATCH FOLDER UNAVAILABLE: watch folder /srv/export is missing"
    back = watch_event(
        available=True, folder="/srv/export", message="watch folder /srv/export is back", at=0.0
    )
    assert describe_status(as_status(back)) == "WATCH FOLDER available: watch folder /srv/export is back"
    assert describe_status(as_status(StatusEvent("skipped", None, {"why": "phase images"}))) == (
        "skipped -: why=phase images"
    )
    pending = Verdict("acq-42", "p", "1", Outcome.INCOMPLETE, False, (), ("EchoTime2",), 0.0)
    assert describe_status(as_status(verdict_event(pending))) == (
        "verdict acq-42: INCOMPLETE (provisional, protocol p 1); pending EchoTime2"
    )


def received(grid: VolumeGeometry, hu: npt.NDArray[np.int16], acquisition_id: str) -> ReceivedVolume:
    return ReceivedVolume(
        acquisition_id=acquisition_id,
        hu=hu,
        geometry=grid,
        model_id="m",
        model_version="1",
        protocol_id="p",
        sha256=payload_sha256(hu),
        slab_count=1,
        slabs_received=0,
        complete_from_slabs=False,
        matches_volume_message=False,
        publisher_id="x",
        seq=1,
        received_at=0.0,
    )


@pytest.mark.parametrize("acquisition_id", ["../escape", "a/b", ".hidden", ""])
def test_acquisition_id_that_is_not_a_plain_name_is_not_used_as_a_path(
    acquisition_id: str, tmp_path: Path
) -> None:
    grid = geometry()
    out = tmp_path / "out"

    with pytest.raises(ValueError, match="acquisition_id: found"):
        save_volume(received(grid, hu_volume(grid.shape), acquisition_id), out)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("value_hu", "grey"), [(-450, 0), (-1000, 0), (300, 128), (1050, 255), (3000, 255)])
def test_preview_uses_the_w1500_l300_window(value_hu: int, grey: int) -> None:
    grid = geometry()

    image = render_preview(np.full(grid.shape, value_hu, dtype=np.int16), grid)

    pixels = np.asarray(image)
    body = pixels[LABEL_HEIGHT:]
    assert image.mode == "L"
    if grey == 0:
        assert body.max() == 0
    else:
        assert int(np.median(body[body > 0])) == grey
    assert pixels[:LABEL_HEIGHT].max() > 200  # the SYNTHETIC CT label is drawn (anti-aliased)


def test_a_client_key_others_can_read_is_refused_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server_public, _ = create_key_pair(tmp_path, "server")
    _, client_secret = create_key_pair(tmp_path, "robot")
    client_secret.chmod(0o644)
    argv = ["--server-key", str(server_public), "--client-key", str(client_secret), "--timeout", "1"]
    assert main(argv, stdout=io.StringIO()) == EXIT_BAD_ARGUMENTS
    assert f"chmod 600 {client_secret}" in capsys.readouterr().err
