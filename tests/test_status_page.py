"""The status page's parts on real series: plain words for real verdicts, the board fed by the real validator
stage, the preview rendered from real DICOM echo images and a phantom CT.

Series are simulated and exported as a scanner would (tests/scanner_support.py), then read by the real assembler
and judged by the real validator against the shipped seed protocol; nothing is built by hand except the one
volume the preview draws, whose source images are the exported files themselves.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from agent_support import TEST_PROTOCOL_ID, write_test_protocol
from PIL import Image
from scanner_support import SMALL_FOV_MM, export_small, small_request

from agent.cli.check import check_path
from agent.ingest.assembler import Assembler
from agent.ingest.pixel_reader import read_pixels
from agent.records import AcquisitionUpdate, ArrivedFile, ImageRef, Publication, Reason, SctVolume
from agent.status_events import progress_event
from agent.status_page.board import StatusBoard
from agent.status_page.plain_words import explain
from agent.status_page.preview import MARK, mid_sagittal, render_preview, sagittal_slice_index
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR, load_protocol, load_protocols
from agent.validation.protocols import SequenceProtocol
from agent.validation.validator import ValidatorStage
from agent.vocabulary import ArrivalSource, PageState, UpdateKind
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, SimulationRequest, export_case, simulate
from sct_core.geometry import Orientation

SEED_ID = "bonemri_lumbar_1p5t"
#: One series that breaks every rule a header can break at once (each rule is judged on its own).
EVERY_DEVIATION = (
    "EchoTime1=2.5",
    "EchoTime2=4.8",
    "RepetitionTime=9",
    "FlipAngle=14",
    "PixelBandwidth=700",
    "MagneticFieldStrength=3",
    "MRAcquisitionType=2D",
    "ScanningSequence=GR\\IR",
    "SequenceVariant=SP\\MP",
    "InversionTime=300",
    "ImageType=DERIVED\\SECONDARY\\M",
)


@pytest.fixture(scope="module")
def seed() -> SequenceProtocol:
    return load_protocol(SHIPPED_PROTOCOLS_DIR / f"{SEED_ID}.toml")


@pytest.fixture(scope="module")
def real_reasons(tmp_path_factory: pytest.TempPathFactory, seed: SequenceProtocol) -> dict[str, Reason]:
    """Final-verdict reasons of the seed protocol on two deviating exports, by attribute: one with every header
    deviation and 0.8 x 0.8 x 1 mm voxels on the small FOV, one axial with a single echo."""
    root = tmp_path_factory.mktemp("deviating")
    export_small(root / "headers", small_request(settings=EVERY_DEVIATION, voxel_mm=(0.8, 0.8, 1.0)))
    simulate(
        SimulationRequest(
            seed=3,
            fov_mm=SMALL_FOV_MM,
            echoes=1,
            base=SEED_PROTOCOL.with_changes(orientation=Orientation.AXIAL),
        ),
        ExportOptions(out_dir=root / "axial"),
    )
    reasons: dict[str, Reason] = {}
    for folder in ("headers", "axial"):
        report = check_path(root / folder, [seed])
        (acquisition,) = report.acquisitions
        for reason in acquisition.verdicts[0].reasons:
            reasons.setdefault(reason.attribute, reason)
    return reasons


# ------------------------------------------------------------------------------------------------ plain words


@pytest.mark.parametrize(
    ("attribute", "headline", "action"),
    [
        ("EchoTime2", "TE 2 is 4.8 ms; the protocol needs 4.2 ms (± 0.2)", "Set TE 2 to 4.2 ms (± 0.2)"),
        ("EchoTime1", "TE 1 is 2.5 ms; the protocol needs 2.1 ms (± 0.15)", "Set TE 1 to 2.1 ms (± 0.15)"),
        ("RepetitionTime", "TR is 9 ms; the protocol needs 7 ms (± 0.5)", "Set TR to 7 ms (± 0.5)"),
        (
            "FlipAngle",
            "Flip angle is 14°; the protocol needs 10° (± 2°)",
            "Set the flip angle to 10° (± 2°)",
        ),
        (
            "PixelBandwidth",
            "Bandwidth is 700 Hz/px; the protocol needs more than 500 and at most 640 Hz/px",
            "Set the bandwidth to more than 500 and at most 640 Hz/px",
        ),
        (
            "MagneticFieldStrength",
            "Field strength is 3 T; the protocol needs 1.5 T (± 0.1)",
            "Scan on a 1.5 T (± 0.1) magnet: the protocol is for that field strength only",
        ),
        (
            "MRAcquisitionType",
            "Acquisition type is 2D; the protocol needs 3D",
            "Set the acquisition type to 3D",
        ),
        (
            "ScanningSequence",
            "Sequence type is GR\\IR; the protocol needs GR without IR",
            "Use gradient echo (GR) as the sequence type without inversion recovery (IR)",
        ),
        (
            "SequenceVariant",
            "Sequence variant is SP\\MP; the protocol needs SP without MP",
            "Use RF spoiled (SP) as the sequence variant without magnetisation prepared (MP)",
        ),
        (
            "InversionTime",
            "Inversion time (TI) is 300 ms; the protocol needs none (no inversion preparation)",
            "Switch off the inversion (preparation) pulse: the protocol needs none",
        ),
        (
            "PixelSpacing",
            "In-plane pixel size is 0.8 × 0.8 mm; the protocol needs 0.74 × 0.74 mm (± 0.02)",
            "Set the in-plane pixel size (FOV and matrix) to 0.74 × 0.74 mm (± 0.02)",
        ),
        (
            "SpacingBetweenSlices",
            "Slice spacing is 1 mm; the protocol needs 0.9 mm (± 0.05)",
            "Set the slice spacing to 0.9 mm (± 0.05)",
        ),
        ("EchoCount", "Number of echoes: 1 echo; the protocol needs 2", "Set the number of echoes to 2"),
        (
            "Orientation",
            "Slice orientation is axial (90.0° from sagittal); the protocol needs sagittal, ≤ 8° oblique",
            "Plan sagittal slices, tilted at most 8°",
        ),
    ],
)
def test_each_rule_in_plain_words_with_found_required_and_what_to_change(
    real_reasons: dict[str, Reason], seed: SequenceProtocol, attribute: str, headline: str, action: str
) -> None:
    reason = real_reasons[attribute]
    words = explain(reason, seed.rule(attribute))
    assert (words.headline, words.action) == (headline, action)


def test_image_type_and_field_of_view_name_the_protocol_values(
    real_reasons: dict[str, Reason], seed: SequenceProtocol
) -> None:
    image = explain(real_reasons["ImageType"], seed.rule("ImageType"))
    assert image.headline.startswith(
        "Image type is DERIVED\\SECONDARY\\M; the protocol needs magnitude without DERIVED"
    )
    assert image.action.startswith(
        "Send the acquired magnitude images of each echo (not derived, water, fat,"
    )
    fov = explain(real_reasons["FieldOfView"], seed.rule("FieldOfView"))
    assert fov.headline.startswith("Field of view is 60 × 60 × 9 mm; the protocol needs 250 × 250 × 90 mm")
    assert fov.action.endswith("to 250 × 250 × 90 mm (± 12.5 × 12.5 × 10)")


def test_every_rule_of_the_shipped_protocol_is_met_by_a_real_verdict_and_explained(
    real_reasons: dict[str, Reason], seed: SequenceProtocol
) -> None:
    """No rule of the shipped protocol falls back to the generic sentence."""
    for rule in seed.rules:
        assert rule.attribute in real_reasons, rule.attribute
        words = explain(real_reasons[rule.attribute], rule)
        assert not words.action.startswith(("Change the", "Send the series again")), (rule.attribute, words)
        assert real_reasons[rule.attribute].found.split()[0] in words.headline.replace("°", " deg")


def test_an_unknown_attribute_and_lost_images_get_a_sentence_with_both_values() -> None:
    unknown = explain(Reason("site", "CoilString", "HEAD", "SPINE", "consistency"), None)
    assert unknown.headline == "CoilString: HEAD; required SPINE"
    assert "Send the series again" in unknown.action
    lost = explain(
        Reason("p", "SlicesPerEcho", "38 of 40 images at TE 4.2 ms", "40 images per echo", "completeness"),
        None,
    )
    assert (
        lost.headline == "Images missing: 38 of 40 images at TE 4.2 ms; the series needs 40 images per echo"
    )
    assert "nothing in the protocol needs to change" in lost.action


# ---------------------------------------------------------------------------------------------------- board


def _arrivals(paths: Sequence[Path]) -> list[ArrivedFile]:
    out = []
    for path in paths:
        stat = path.stat()
        out.append(ArrivedFile(path, stat.st_size, stat.st_mtime_ns, time.time(), ArrivalSource.EVENT))
    return out


def _judge(
    paths: Sequence[Path], protocol: SequenceProtocol, feed: list[Publication]
) -> list[AcquisitionUpdate]:
    """The real assembler and validator stage over ``paths`` in order, publishing into ``feed``."""
    updates: list[AcquisitionUpdate] = []
    validator = ValidatorStage([protocol], {protocol.id}, forward=lambda _: None, publish=feed.append)
    assembler = Assembler(updates.append, quiet_period_s=float("inf"))
    for arrived in _arrivals(paths):
        assembler.add_file(arrived)
        assembler.flush()
    assembler.end_all()
    for update in updates:
        validator.handle(update)
    return updates


def test_the_board_shows_a_rejection_from_the_first_images_with_its_reason_in_plain_words(
    tmp_path: Path, seed: SequenceProtocol
) -> None:
    summary = export_small(tmp_path, small_request(settings=("EchoTime2=4.8",)))
    published: list[Publication] = []
    _judge(summary.paths, seed, published)
    board = StatusBoard([seed], {seed.id}, history_hours=12)
    versions = []
    for item in published:
        board.feed(item)
        versions.append(board.version)
    assert versions == sorted(set(versions)), "every event is a new version"
    (card,) = board.snapshot().acquisitions
    assert card.state is PageState.REJECTED
    assert card.verdict is not None and card.verdict.final and card.verdict.outcome == "reject"
    te2 = next(r for r in card.verdict.reasons if r.attribute == "EchoTime2")
    assert te2.action == "Set TE 2 to 4.2 ms (± 0.2)"
    assert card.images_received == card.images_expected == len(summary.paths)
    first_reject = next(
        p
        for p in published
        if getattr(p, "kind", "") == "verdict" and p.body["outcome"] == "reject"  # type: ignore[union-attr]
    )
    assert not first_reject.body["final"], "rejected on a provisional verdict, before the series ended"  # type: ignore[union-attr]
    assert card.outcome_at == first_reject.at  # type: ignore[union-attr]
    document = json.loads(board.snapshot_json()[1])
    assert document["acquisitions"][0]["verdict"]["reasons"][0]["headline"]


def test_the_board_follows_a_passing_series_to_published_and_forgets_old_ones(tmp_path: Path) -> None:
    folder = write_test_protocol(tmp_path / "protocols", SMALL_FOV_MM)
    (protocol,) = load_protocols(folder, (TEST_PROTOCOL_ID,))
    summary = export_small(tmp_path / "export", small_request())
    published: list[Publication] = []
    updates = _judge(summary.paths, protocol, published)
    now = [1000.0]
    board = StatusBoard([protocol], {protocol.id}, history_hours=1, clock=lambda: now[0])
    first_verdict = next(i for i, p in enumerate(published) if getattr(p, "kind", "") == "verdict")
    for item in published[: first_verdict + 1]:
        board.feed(item)
    (card,) = board.snapshot().acquisitions
    assert card.state is PageState.RECEIVING and 0 < card.images_received < len(summary.paths)
    assert card.verdict is not None and card.verdict.outcome == "pass" and not card.verdict.final
    for item in published[first_verdict + 1 :]:
        board.feed(item)
    key = updates[0].view.acquisition_id
    card = board.snapshot().acquisitions[0]
    assert card.state is PageState.STREAMING and card.verdict is not None and card.verdict.final
    assert card.images_received == card.images_expected == len(summary.paths)
    board.feed(progress_event(key, slabs_done=1, slab_count=3, at=now[0]))
    assert board.snapshot().acquisitions[0].slabs_done == 1
    grid = updates[-1].view.grid
    assert grid is not None
    volume = SctVolume(
        key,
        protocol.id,
        "m",
        "1",
        grid,
        np.zeros(grid.shape, np.int16),
        "",
        3,
        now[0] + 2.0,
        last_image_at=now[0],
    )
    board.feed(volume)
    card = board.snapshot().acquisitions[0]
    assert (card.state, card.slabs_done, card.last_image_to_volume_s) == (PageState.PUBLISHED, 3, 2.0)
    board.feed(replace(volume, acquisition_id="feedfeedfeedfeed", republished=True))
    assert len(board.snapshot().acquisitions) == 1, "a volume republished after a restart is no new card"
    now[0] += 3601.0
    board.feed(progress_event("0123456789abcdef", slabs_done=0, slab_count=1, at=now[0]))
    assert [c.acquisition_id for c in board.snapshot().acquisitions] == ["0123456789abcdef"]


def test_waiters_wake_on_a_change_and_on_close(seed: SequenceProtocol) -> None:
    board = StatusBoard([seed], {seed.id}, history_hours=12)
    assert board.wait(board.version, 0.01) == 0
    board.feed(progress_event("00aa", slabs_done=1, slab_count=2, at=1.0))
    assert board.wait(0, 10.0) == 1
    board.close()
    assert board.wait(1, 10.0) == 1 and board.closed


# -------------------------------------------------------------------------------------------------- preview


def _volume_from_export(tmp_path: Path, orientation: Orientation) -> tuple[SctVolume, np.ndarray]:
    """The phantom's CT as the 'sCT' of an exported series, with the exported echo images as its sources."""
    acquisition = SEED_PROTOCOL.with_changes(fov_mm=(60.0, 60.0, 36.0), orientation=orientation)
    case = generate_case(5, acquisition, supersample=1)
    export_case(case, ExportOptions(out_dir=tmp_path))
    updates: list[AcquisitionUpdate] = []
    assembler = Assembler(updates.append, quiet_period_s=float("inf"))
    for arrived in _arrivals(sorted(p for p in tmp_path.rglob("*") if p.is_file())):
        assembler.add_file(arrived)
    assembler.flush()
    final = next(u for u in updates if u.kind is UpdateKind.COMPLETE)
    grid = final.view.grid
    assert grid is not None
    refs: list[ImageRef] = [r for u in updates for r in u.new_images]
    origin = float(np.dot(grid.origin, grid.slice_direction))
    by_slice: dict[int, dict[float, ImageRef]] = {}
    for ref in refs:
        by_slice.setdefault(round((ref.position_mm - origin) / grid.spacing[0]), {})[ref.echo_time_ms] = ref
    sources = tuple(tuple(by_slice[k][te] for te in sorted(by_slice[k])) for k in range(grid.shape[0]))
    volume = SctVolume(
        acquisition_id=final.view.acquisition_id,
        protocol_id=SEED_ID,
        model_id="phantom",
        model_version="ct",
        geometry=grid,
        hu=case.ct_hu,
        sha256="",
        slab_count=1,
        produced_at=time.time(),
        sources=sources,
    )
    return volume, case.echoes[0]


@pytest.mark.parametrize("orientation", [Orientation.SAGITTAL, Orientation.AXIAL])
def test_the_preview_is_the_mid_sagittal_plane_of_echo_one_and_the_sct_marked_synthetic(
    tmp_path: Path, orientation: Orientation
) -> None:
    volume, echo_one = _volume_from_export(tmp_path, orientation)
    reads: list[tuple[Path, int]] = []

    def reader(path: Path, frames: Sequence[int | None]) -> np.ndarray:
        reads.append((path, len(frames)))
        return read_pixels(path, frames)

    png = render_preview(volume, reader)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    only = sagittal_slice_index(volume.geometry)
    if orientation is Orientation.SAGITTAL:
        assert only is not None and len(reads) == 1, "a sagittal series reads only its middle slice"
    else:
        assert only is None and len(reads) == volume.geometry.shape[0]
    # The left panel is echo 1's mid-sagittal plane as stored on disk: compare it with the phantom's echo 1.
    expected, _, _ = mid_sagittal(echo_one, volume.geometry)
    assert expected.shape[0] > 10 and float(expected.std()) > 0
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    height = pixels.shape[0]
    mr = pixels[34 : height - 40, : pixels.shape[1] // 2 - 10]
    assert float(mr.std()) > 10, "echo 1 drawn"
    # The mark is burnt in: yellow pixels on the image (no text metadata needed to know it is synthetic).
    rgb = np.asarray(image, dtype=np.int16)
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 180) & (rgb[..., 2] < 60)
    assert yellow[height - 40 :].sum() > 200 and yellow[: height - 40, pixels.shape[1] // 2 :].sum() > 200
    assert "text" not in image.info and MARK


def test_a_preview_without_readable_echo_images_still_shows_the_sct(tmp_path: Path) -> None:
    volume, _ = _volume_from_export(tmp_path, Orientation.SAGITTAL)
    for path in tmp_path.rglob("*.dcm"):
        path.unlink()
    png = render_preview(volume, read_pixels)
    assert Image.open(io.BytesIO(png)).size[0] > 0
