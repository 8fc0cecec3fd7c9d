"""Where the sCT is not to be trusted, as people see it: the ``flagged`` status in plain words, the page's card
(flagged, clear, unchecked), the preview through the region with it outlined on echo 1 and the sCT, the demo's
picture, and ``sct-agent listen``'s line. Real exported echo images, the agent's own region search."""

from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from sct_dicom_support import export_mr, sct_volume, small_case

from agent.cli.listen import describe_status
from agent.cli.montage import Panel, render_montage
from agent.cli.outline import OUTLINE_RGB
from agent.inference.untrusted_regions import flag_report
from agent.ingest.pixel_reader import read_pixels
from agent.publish.wire import StatusMessage
from agent.records import SctVolume, confidence_sha256
from agent.status_events import flagged_event
from agent.status_page.board import StatusBoard
from agent.status_page.preview import render_preview
from engines.confidence.spec import ConfidenceSpec
from engines.scanner.export import OutputFormat

SPEC = ConfidenceSpec(method="feature-mahalanobis", threshold=64, min_region_mm3=2.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> SctVolume:
    case = small_case()
    mr = export_mr(case, tmp_path_factory.mktemp("mr"), OutputFormat.CLASSIC)
    return sct_volume(case, mr.paths)


def checked(volume: SctVolume, confidence: npt.NDArray[np.uint8]) -> SctVolume:
    return replace(
        volume,
        confidence=confidence,
        confidence_sha256=confidence_sha256(confidence),
        confidence_method=SPEC.method,
        confidence_threshold=SPEC.threshold,
        flagged=flag_report(confidence, SPEC, volume.geometry.spacing),
    )


def with_bar(volume: SctVolume) -> SctVolume:
    """A low-confidence bar off the middle slice (where a pedicle screw would be), across three slices."""
    confidence = np.full(volume.geometry.shape, 230, dtype=np.uint8)
    confidence[1:4, 20:50, 30:40] = 15
    return checked(volume, confidence)


def test_the_flagged_status_names_slices_volume_and_why_and_states_zero_explicitly(
    exported: SctVolume,
) -> None:
    flagged = flagged_event(with_bar(exported), at=5.0)
    body = flagged.body
    assert (body["checked"], body["flagged"], body["threshold"], body["method"]) == (True, 1, 64, SPEC.method)
    (region,) = body["regions"]
    assert (region["slices"], region["rows"], region["columns"]) == ([1, 4], [20, 50], [30, 40])
    assert region["min_confidence"] == 15 and region["voxels"] == 3 * 30 * 10
    assert region["message"].startswith("sCT not trusted in slices 2-4 (")
    assert "mL, region 1 of 1): outside the conditions the model was validated on" in region["message"]
    assert body["message"] == region["message"]
    clear = flagged_event(checked(exported, np.full(exported.geometry.shape, 230, np.uint8)), at=5.0).body
    assert (clear["checked"], clear["flagged"], clear["regions"]) == (True, 0, [])
    assert clear["message"].startswith("sCT checked: no region below the confidence threshold")
    unchecked = flagged_event(exported, at=5.0).body
    assert (unchecked["checked"], unchecked["flagged"], unchecked["method"]) == (False, None, None)
    assert "has no confidence output" in unchecked["message"]


def with_bars(volume: SctVolume, count: int) -> SctVolume:
    """``count`` separate low-confidence bars, each wider than the one before (a screws series has a dozen)."""
    confidence = np.full(volume.geometry.shape, 230, dtype=np.uint8)
    for k in range(count):
        confidence[1 + (k % 2) * 4 : 4 + (k % 2) * 4, 20 : 24 + 2 * k, 14 + 10 * k : 20 + 10 * k] = 15
    return checked(volume, confidence)


def test_many_regions_are_summarised_and_the_largest_named_every_one_stays_on_the_wire(
    exported: SctVolume,
) -> None:
    body = flagged_event(with_bars(exported, 5), at=5.0).body
    assert body["flagged"] == 5 and len(body["regions"]) == 5
    message = str(body["message"])
    assert (
        message.startswith("sCT not trusted in 5 regions, ") and " mL in all, slices 2-4 and 6-8: " in message
    )
    assert "outside the conditions the model was validated on; largest: slices 2-4 (" in message
    assert message.count("region ") == 3 and "region 1 of 5" in message and "region 4 of 5" not in message
    board = StatusBoard([], set(), history_hours=1)
    board.feed(flagged_event(replace(with_bars(exported, 5), acquisition_id="a1"), at=time.time()))
    (card,) = board.snapshot().acquisitions
    assert card.flagged is not None and card.flagged.lines == (message,)
    three = flagged_event(with_bars(exported, 3), at=5.0).body
    assert str(three["message"]).count("sCT not trusted in slices") == 3, "three are still named one by one"


def test_the_card_says_where_and_how_much_and_tells_flagged_from_clear_and_unchecked(
    exported: SctVolume,
) -> None:
    board = StatusBoard([], set(), history_hours=1)
    flagged = with_bar(exported)
    for acquisition_id, volume in (("a1", flagged), ("a2", checked(exported, np.full(exported.geometry.shape,
                                                                                        230, np.uint8))),
                                   ("a3", exported)):  # fmt: skip
        board.feed(flagged_event(replace(volume, acquisition_id=acquisition_id), at=time.time()))
    cards = {c.acquisition_id: c for c in board.snapshot().acquisitions}
    first = cards["a1"].flagged
    assert first is not None and (first.verdict, first.regions) == ("flagged", 1)
    assert first.lines and first.lines[0].startswith("sCT not trusted in slices 2-4")
    assert first.volume_ml is not None and first.volume_ml > 0
    assert cards["a2"].flagged is not None and cards["a2"].flagged.verdict == "clear"
    assert cards["a3"].flagged is not None and cards["a3"].flagged.verdict == "unchecked"
    assert board.snapshot_json()[1].count(b'"verdict":"flagged"') == 1


def orange(image: Image.Image) -> npt.NDArray[np.bool_]:
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.asarray(np.abs(rgb - np.array(OUTLINE_RGB)).sum(axis=-1) < 30)


def test_the_preview_goes_through_the_region_and_outlines_it_on_both_panels(exported: SctVolume) -> None:
    flagged = with_bar(exported)
    image = Image.open(io.BytesIO(render_preview(flagged, read_pixels)))
    plain = Image.open(io.BytesIO(render_preview(checked(exported, np.full(exported.geometry.shape, 230,
                                                                          np.uint8)), read_pixels)))  # fmt: skip
    assert not orange(plain).any(), "nothing flagged, nothing outlined"
    marks = orange(image)
    assert image.height > plain.height, "the regions are named under the picture"
    panels = marks[34 : 34 + 440]
    half = image.width // 2
    left, right = panels[:, : half - 6], panels[:, half + 6 :]
    assert left.sum() > 200 and right.sum() > 200, "outlined on echo 1 and on the sCT"
    # The same voxels on both panels: the outlines' extents match.
    rows_left, rows_right = np.flatnonzero(left.any(axis=1)), np.flatnonzero(right.any(axis=1))
    assert abs(int(rows_left.min()) - int(rows_right.min())) <= 2
    assert marks[34 + 440 + 40 :].sum() > 50, "and named in words under the picture"


def test_the_montage_outlines_the_region_in_the_views_through_it(exported: SctVolume, tmp_path: Path) -> None:
    flagged = with_bar(exported)
    assert flagged.flagged is not None
    path = render_montage(
        [Panel("sCT", flagged.hu, (-450.0, 1250.0), outline=flagged.flagged.mask),
         Panel("CT", flagged.hu, (-450.0, 1250.0))],
        flagged.geometry,
        tmp_path / "m.png",
    )  # fmt: skip
    marks = orange(Image.open(path))
    half = marks.shape[1] // 2
    assert marks[:, :half].sum() > 100 and not marks[:, half + 2 :].any()


def test_listen_prints_the_finding_in_one_line(exported: SctVolume) -> None:
    def line(volume: SctVolume) -> str:
        event = flagged_event(volume, at=1.0)
        return describe_status(
            StatusMessage("sct-edge/1.4", 9, 1.0, "p" * 16, kind="flagged", acquisition_id="a1",
                          body=dict(event.body), at=1.0)
        )  # fmt: skip

    assert line(with_bar(exported)).startswith("FLAGGED a1: 1 region(s), ")
    assert "sCT not trusted in slices 2-4" in line(with_bar(exported))
    assert line(exported).startswith("flagged a1: not checked: ")
    clear = checked(exported, np.full(exported.geometry.shape, 230, np.uint8))
    assert line(clear).startswith("flagged a1: 0 regions: sCT checked")
