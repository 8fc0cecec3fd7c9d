"""The demo (simulator -> DICOM -> read back -> picture) and the montage's anatomical orientation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.cli import main
from agent.cli.montage import Panel, render_montage, to_lps
from agent.cli.outline import OUTLINE_RGB
from sct_core.geometry import Orientation, VolumeGeometry

#: The demo's sCT against its CT (HU-threshold masks): far below the intensity-inversion baseline's error.
DEMO_MAE_LIMIT_HU = 60.0


@pytest.mark.parametrize("orientation", list(Orientation))
def test_to_lps_puts_every_voxel_at_its_patient_position(orientation: Orientation) -> None:
    geo = VolumeGeometry.from_fov(
        center=(0.0, 0.0, 0.0), fov_mm=(8.0, 6.0, 4.0), voxel_mm=(1.0, 1.0, 1.0), orientation=orientation
    )
    k, r, c = np.meshgrid(*(np.arange(n) for n in geo.shape), indexing="ij")
    idx = np.stack([k, r, c, np.ones_like(k)], axis=-1).reshape(-1, 4).T
    xyz = (geo.affine @ idx)[:3].T.reshape(*geo.shape, 3)
    lps, spacing = to_lps(xyz[..., 0], geo)  # the volume holds each voxel's own x coordinate
    assert spacing == (1.0, 1.0, 1.0)
    assert np.all(np.diff(lps, axis=0) > 0)  # x increases along the first axis (towards patient left)
    for axis, coord in ((1, 1), (2, 2)):
        lps_c, _ = to_lps(xyz[..., coord], geo)
        assert np.all(np.diff(lps_c, axis=axis) > 0)


def test_montage_rejects_a_panel_off_the_grid(tmp_path: Path) -> None:
    geo = VolumeGeometry.from_fov(center=(0.0, 0.0, 0.0), fov_mm=(8.0, 6.0, 4.0), voxel_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"panel 'x' has shape \(2, 2, 2\); the grid is \(4, 8, 6\)"):
        render_montage([Panel("x", np.zeros((2, 2, 2)))], geo, tmp_path / "m.png")


def test_demo_runs_the_agent_end_to_end_and_stops_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make demo` in full (eager backend, so no compile warm-up): agent process, paced scanner, subscriber; the
    third series holds pedicle screws and rods, which the model's confidence flags."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--backend", "torch-eager", "--rate", "80"]) == 0
    text = capsys.readouterr().out
    assert "seed protocol: PASS against bonemri_lumbar_1p5t" in text
    assert "REJECT against bonemri_lumbar_1p5t" in text
    assert "reason: EchoTime2: found 4.8 ms, required 4.2 ± 0.2 ms" in text
    assert "agent stopped with exit status 0" in text
    # The technologist's page, read as a browser reads it: both series, their outcomes, the action, the preview.
    page_lines = [line for line in text.splitlines() if line.startswith("  page showed series")]
    assert len(page_lines) == 3, text
    passed, rejected, screws = page_lines
    assert "PASS, published, 200/200 images" in passed
    slabs = re.search(r"(\d+)/(\d+) sCT slabs", passed)
    assert slabs is not None and slabs[1] == slabs[2] != "0"
    assert "REJECT, rejected" in rejected and "Set TE 2 to 4.2 ms (± 0.2)" in rejected
    # The screws series passes the protocol, and the page shows where its sCT is not to be trusted.
    assert "PASS, published, 200/200 images" in screws
    # One line per region up to three, a summary beyond (a screws series has about a dozen).
    assert re.search(r"sCT NOT TRUSTED IN PART: sCT not trusted in (slice|\d+ regions, )", screws), screws
    confidence = [line for line in text.splitlines() if line.startswith("  confidence: ")]
    assert len(confidence) == 2 and re.search(r"sCT not trusted in (slice|\d+ regions, )", confidence[1]), (
        confidence
    )
    assert "outside the conditions the model was validated on" in confidence[1]
    flagged_preview = Image.open(out / "page-preview-flagged.png")
    orange = (
        np.abs(np.asarray(flagged_preview.convert("RGB"), dtype=np.int16) - np.array(OUTLINE_RGB)).sum(-1)
        < 30
    )
    assert orange.sum() > 200, "the page's preview outlines the region"
    flagged_picture = Image.open(out / "scan-flagged.png")
    orange = (
        np.abs(np.asarray(flagged_picture.convert("RGB"), dtype=np.int16) - np.array(OUTLINE_RGB)).sum(-1)
        < 30
    )
    assert orange.sum() > 200, "so does the demo's picture"
    seg_line = next(
        line for line in text.splitlines() if line.startswith("DICOM Segmentation of the flagged region:")
    )
    assert Path(seg_line.split(": ", 1)[1]).is_file(), seg_line
    preview = Image.open(out / "page-preview.png")
    assert preview.width > 300 and np.asarray(preview.convert("L")).std() > 20
    assert "sequence gaps 0" in text
    sct_line = next(line for line in text.splitlines() if line.startswith("synthetic CT:"))
    mae = float(sct_line.split("MAE ")[1].split(" HU")[0])
    assert 0 < mae < DEMO_MAE_LIMIT_HU
    received = [p for p in (out / "received").iterdir() if p.is_dir()]
    assert len(received) == 2
    assert {p.name for p in received[0].iterdir()} >= {"sct.npy", "geometry.json", "preview.png"}
    assert np.load(received[0] / "sct.npy").shape == (100, 338, 338)
    # The agent also wrote the sCT as a DICOM CT series, one file per slice.
    dicom_line = next(line for line in text.splitlines() if line.startswith("sCT DICOM CT series:"))
    series = Path(dicom_line.split(": ", 1)[1])
    assert series.parent == out / "var" / "dicom" and len(list(series.glob("CT*.dcm"))) == 100
    picture = Image.open(out / "scan.png")
    assert picture.width > 700 and picture.height > 600
    assert np.asarray(picture).std() > 20  # an image, not a blank canvas
