"""sCT evaluation metrics and the intensity baseline, on small hand-built volumes whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import numpy.typing as npt
import pytest

from engines.evaluation.baseline import OUTSIDE_HU, body_mask_from_mr, intensity_inversion
from engines.evaluation.metrics import (
    BAMBACH_THRESHOLDS_HU,
    PSNR_DATA_RANGE_HU,
    RegionMasks,
    SctMetrics,
    body_mask_from_ct,
    compute_metrics,
    masks_from_ct,
    masks_from_labels,
    summarise,
)
from engines.phantom.tissues import (
    CORTICAL_TISSUES,
    FAT_TISSUES,
    GAS_TISSUES,
    SOFT_TISSUES,
    TISSUE_TABLE,
    TRABECULAR_TISSUES,
    Tissue,
)

SHAPE = (8, 16, 16)


def _labels() -> npt.NDArray[np.uint8]:
    """A box of subcutaneous fat around muscle, with a marrow rod in a cortical shell, all slices through."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[:, 2:14, 2:14] = Tissue.SUBCUTANEOUS_FAT
    labels[:, 4:12, 4:12] = Tissue.MUSCLE
    labels[:, 6:10, 6:10] = Tissue.CORTICAL_BONE
    labels[:, 7:9, 7:9] = Tissue.MARROW_BODY
    return labels


def _ct(labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.int16]:
    lut = np.array([TISSUE_TABLE[t].hu for t in Tissue], dtype=np.float64)
    return np.rint(lut[labels]).astype(np.int16)


def _whole_body_masks() -> RegionMasks:
    body = np.ones(SHAPE, dtype=bool)
    empty = np.zeros(SHAPE, dtype=bool)
    return RegionMasks(body, empty, empty, body, empty, definition="test: everything is soft tissue")


def test_identical_volumes_are_perfect() -> None:
    labels = _labels()
    ct = _ct(labels)
    m = compute_metrics(ct.copy(), ct, masks_from_labels(labels))
    assert m.mae_hu == 0.0
    assert m.me_hu == 0.0
    assert set(m.mae_by_tissue) == {"cortical_bone", "trabecular_bone", "soft_tissue", "fat"}
    assert all(v == 0.0 for v in m.mae_by_tissue.values())
    assert all(v == 0.0 for v in m.me_by_tissue.values())
    assert m.bone_dice == {"150": 1.0, "200": 1.0, "250": 1.0}
    assert (m.bambach_precision, m.bambach_recall, m.bambach_dice) == (1.0, 1.0, 1.0)
    assert m.psnr_db == math.inf
    assert m.body_voxels == int(np.count_nonzero(labels))


def test_constant_offset_gives_mae_and_negative_me() -> None:
    """sCT too high by d: MAE = d and ME = mean(CT - sCT) = -d."""
    labels = _labels()
    ct = _ct(labels)
    d = 25
    m = compute_metrics((ct + d).astype(np.int16), ct, masks_from_labels(labels))
    assert m.mae_hu == pytest.approx(d)
    assert m.me_hu == pytest.approx(-d)
    for key in m.mae_by_tissue:
        assert m.mae_by_tissue[key] == pytest.approx(d)
        assert m.me_by_tissue[key] == pytest.approx(-d)
    assert m.psnr_db == pytest.approx(20 * math.log10(PSNR_DATA_RANGE_HU / d))


def test_metrics_ignore_voxels_outside_the_body() -> None:
    labels = _labels()
    ct = _ct(labels)
    sct = ct.copy()
    sct[labels == Tissue.AIR] = 3000
    m = compute_metrics(sct, ct, masks_from_labels(labels))
    assert m.mae_hu == 0.0
    assert m.bone_dice["150"] == 1.0


def test_dice_precision_recall_of_overlapping_boxes() -> None:
    """CT bone: a 4×4×4 box (64 voxels); sCT bone: a 4×4×8 box (128) containing it.

    TP = 64, so precision 0.5, recall 1 and Dice 2·64/192 = 2/3 at every threshold below 1000 HU.
    """
    ct = np.zeros(SHAPE, dtype=np.int16)
    sct = np.zeros(SHAPE, dtype=np.int16)
    ct[2:6, 4:8, 4:8] = 1000
    sct[2:6, 4:8, 4:12] = 1000
    assert max(BAMBACH_THRESHOLDS_HU) < 1000
    m = compute_metrics(sct, ct, _whole_body_masks())
    for value in m.bone_dice.values():
        assert value == pytest.approx(2 / 3)
    assert m.bambach_precision == pytest.approx(0.5)
    assert m.bambach_recall == pytest.approx(1.0)
    assert m.bambach_dice == pytest.approx(2 / 3)


def test_shifted_boxes_dice_half() -> None:
    ct = np.zeros(SHAPE, dtype=np.int16)
    sct = np.zeros(SHAPE, dtype=np.int16)
    ct[2:6, 4:8, 4:8] = 1000
    sct[2:6, 4:8, 6:10] = 1000  # half of the box overlaps
    m = compute_metrics(sct, ct, _whole_body_masks())
    assert m.bone_dice["200"] == pytest.approx(0.5)
    assert m.bambach_precision == pytest.approx(0.5)
    assert m.bambach_recall == pytest.approx(0.5)


def test_bone_dice_thresholds_are_strict_and_empty_reference_scores_zero() -> None:
    """CT bone at exactly 200 HU is bone for T = 150 only (CT > T); sCT at 300 HU is bone for all three T."""
    ct = np.zeros(SHAPE, dtype=np.int16)
    sct = np.zeros(SHAPE, dtype=np.int16)
    ct[2:6, 4:8, 4:8] = 200
    sct[2:6, 4:8, 4:8] = 300
    m = compute_metrics(sct, ct, _whole_body_masks())
    assert m.bone_dice == {"150": 1.0, "200": 0.0, "250": 0.0}
    # No bone above 300 HU in either volume: every Bambach threshold is empty-vs-empty.
    assert (m.bambach_precision, m.bambach_recall, m.bambach_dice) == (1.0, 1.0, 1.0)


def test_masks_from_labels_put_every_tissue_in_its_region() -> None:
    labels = np.array([int(t) for t in Tissue], dtype=np.uint8).reshape(1, 1, -1)
    masks = masks_from_labels(labels)
    regions = {
        "cortical": CORTICAL_TISSUES,
        "trabecular": TRABECULAR_TISSUES,
        "soft": SOFT_TISSUES,
        "fat": FAT_TISSUES,
    }
    for tissue in Tissue:
        voxel = (0, 0, int(tissue))
        assert masks.body[voxel] == (tissue != Tissue.AIR), tissue.name
        inside = [name for name, group in regions.items() if getattr(masks, name)[voxel]]
        if tissue in GAS_TISSUES:
            assert inside == [], tissue.name
        else:
            assert inside == [next(n for n, g in regions.items() if tissue in g)], tissue.name
    assert masks.cortical[0, 0, Tissue.CORTICAL_BONE]
    assert masks.trabecular[0, 0, Tissue.MARROW_POSTERIOR]
    assert masks.fat[0, 0, Tissue.EPIDURAL_FAT]
    assert masks.soft[0, 0, Tissue.MUSCLE]


def test_masks_from_ct_threshold_edges() -> None:
    hu = [-201, -200, -31, -30, 149, 150, 699, 700, 2000]
    expected = [None, "fat", "fat", "soft", "soft", "trabecular", "trabecular", "cortical", "cortical"]
    ct = np.array(hu, dtype=np.int16).reshape(1, 1, -1)
    masks = masks_from_ct(ct, body=np.ones(ct.shape, dtype=bool))
    for i, want in enumerate(expected):
        got = [n for n in ("cortical", "trabecular", "soft", "fat") if getattr(masks, n)[0, 0, i]]
        assert got == ([] if want is None else [want]), hu[i]
    assert "700" in masks.definition and "-30" in masks.definition


def test_masks_from_ct_stay_inside_the_body() -> None:
    ct = np.full(SHAPE, 1000, dtype=np.int16)
    body = np.zeros(SHAPE, dtype=bool)
    body[:, 4:8, 4:8] = True
    masks = masks_from_ct(ct, body=body)
    assert np.array_equal(masks.cortical, body)


def test_body_mask_from_ct_fills_holes_and_drops_specks() -> None:
    ct = np.full(SHAPE, -1000, dtype=np.int16)
    ct[:, 3:13, 3:13] = 0
    ct[:, 6:9, 6:9] = -1000  # gas through every slice: open at the slab ends in 3D, closed in each slice
    ct[0, 0, 0] = 0  # a detached speck (table, noise)
    body = body_mask_from_ct(ct)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[:, 3:13, 3:13] = True
    assert np.array_equal(body, expected)
    masks = masks_from_ct(ct)
    assert np.array_equal(masks.body, expected)
    assert not masks.soft[:, 6:9, 6:9].any()


def test_shape_mismatch_names_both_shapes() -> None:
    ct = np.zeros(SHAPE, dtype=np.int16)
    sct = np.zeros((8, 16, 15), dtype=np.int16)
    with pytest.raises(ValueError, match=r"\(8, 16, 15\).*\(8, 16, 16\)"):
        compute_metrics(sct, ct, _whole_body_masks())


def test_empty_body_is_refused() -> None:
    ct = np.zeros(SHAPE, dtype=np.int16)
    empty = np.zeros(SHAPE, dtype=bool)
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(ct, ct, RegionMasks(empty, empty, empty, empty, empty, "none"))


def test_summarise_mean_std_and_nan_cases() -> None:
    labels = _labels()
    ct = _ct(labels)
    masks = masks_from_labels(labels)
    a = compute_metrics((ct + 10).astype(np.int16), ct, masks)
    b = compute_metrics((ct + 30).astype(np.int16), ct, masks)
    no_cortex = RegionMasks(
        masks.body,
        np.zeros(SHAPE, dtype=bool),
        masks.trabecular,
        masks.soft,
        masks.fat,
        "without cortex",
    )
    c = compute_metrics((ct + 50).astype(np.int16), ct, no_cortex)
    assert math.isnan(c.mae_by_tissue["cortical_bone"])

    s = summarise([a, b])
    assert s["mae_hu"]["mean"] == pytest.approx(20.0)
    assert s["mae_hu"]["std"] == pytest.approx(10.0)  # population std of {10, 30}
    assert s["me_hu"]["mean"] == pytest.approx(-20.0)
    assert s["mae_by_tissue.trabecular_bone"]["mean"] == pytest.approx(20.0)
    assert s["bone_dice.200"]["mean"] == pytest.approx(1.0)
    assert s["bone_dice.200"]["std"] == pytest.approx(0.0)
    expected_psnr = [20 * math.log10(PSNR_DATA_RANGE_HU / d) for d in (10, 30)]
    assert s["psnr_db"]["mean"] == pytest.approx(float(np.mean(expected_psnr)))
    assert s["psnr_db"]["std"] == pytest.approx(float(np.std(expected_psnr)))

    s3 = summarise([a, b, c])
    assert s3["mae_by_tissue.cortical_bone"]["mean"] == pytest.approx(20.0)
    assert s3["mae_by_tissue.cortical_bone"]["n"] == 2
    assert s3["mae_hu"]["mean"] == pytest.approx(30.0)
    assert s3["mae_hu"]["n"] == 3


def test_to_dict_is_strict_json() -> None:
    labels = _labels()
    ct = _ct(labels)
    masks = masks_from_labels(labels)
    no_fat = RegionMasks(masks.body, masks.cortical, masks.trabecular, masks.soft, np.zeros(SHAPE, bool), "x")
    m = compute_metrics(ct.copy(), ct, no_fat)
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["psnr_db"] is None  # inf
    assert d["mae_by_tissue"]["fat"] is None  # NaN: empty region
    assert d["bone_dice"]["250"] == 1.0
    assert d["body_voxels"] == m.body_voxels
    assert isinstance(m, SctMetrics)


def test_intensity_inversion_orders_fat_muscle_bone() -> None:
    """Bright fat shell, mid-grey muscle, dark bone rod, air around: HU fat < muscle < bone, -1000 outside."""
    shape = (6, 32, 32)
    echo = np.full(shape, 20, dtype=np.uint16)  # air noise floor
    echo[:, 4:28, 4:28] = 3000  # fat shell
    echo[:, 6:26, 6:26] = 1500  # muscle (most of the body: the median)
    echo[:, 14:18, 14:18] = 100  # cortical bone rod: as dark as little more than air
    echoes = np.stack([echo // 2, echo]).astype(np.uint16)

    body = body_mask_from_mr(echo)
    expected_body = np.zeros(shape, dtype=bool)
    expected_body[:, 4:28, 4:28] = True
    assert np.array_equal(body, expected_body)

    sct = intensity_inversion(echoes)
    assert sct.dtype == np.int16
    assert sct.shape == shape
    fat, muscle, bone = int(sct[0, 5, 5]), int(sct[0, 10, 10]), int(sct[0, 15, 15])
    assert fat == -100
    assert muscle == 40
    assert fat < muscle < bone
    assert np.all(sct[~expected_body] == OUTSIDE_HU)
    assert np.all(sct[expected_body] >= -1024)


def test_intensity_inversion_uses_the_given_body_and_last_echo() -> None:
    shape = (2, 8, 8)
    echoes = np.zeros((2, *shape), dtype=np.uint16)
    echoes[1] = 1000
    echoes[1, :, :, :2] = 2000
    body = np.ones(shape, dtype=bool)
    sct = intensity_inversion(echoes, body=body)
    assert np.all(sct != OUTSIDE_HU)
    with pytest.raises(ValueError, match="shape"):
        intensity_inversion(echoes, body=np.ones((2, 8, 7), dtype=bool))
