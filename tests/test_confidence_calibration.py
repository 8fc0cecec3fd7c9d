"""The calibration's operating point: a normal subject's series score is the highest point at which it shows a
*false* flag (a region where the sCT is right); regions where the sCT is wrong are flags it should raise."""

from __future__ import annotations

import numpy as np
import pytest

from engines.confidence.calibrate import (
    BETA_MARGIN,
    flagged_volume_ml,
    operating_point,
    series_score,
)
from engines.confidence.features import block_fraction

VOXEL_MM3 = 0.5
MIN_REGION_MM3 = 20.0  # 40 voxels


def _score() -> tuple[np.ndarray, np.ndarray]:
    score = np.zeros((30, 30, 30), dtype=np.float32)
    score[2:7, 2:7, 2:7] = 3.0  # 125 voxels where the sCT is wrong (a gas pocket mapped to bone)
    score[15:20, 15:20, 15:20] = 1.5  # 125 voxels where the sCT is right: a false flag above 1.5
    score[25, 25, 25] = 9.0  # one voxel: below the size rule at any point
    wrong = np.zeros(score.shape, dtype=bool)
    wrong[2:7, 2:7, 2:7] = True
    return score, wrong


def test_a_region_where_the_sct_is_wrong_does_not_raise_the_operating_point() -> None:
    score, wrong = _score()
    assert series_score(score, MIN_REGION_MM3, VOXEL_MM3, wrong) == pytest.approx(1.5, abs=0.01)
    # Without the truth every region counts: the gas pocket would set the point.
    assert series_score(score, MIN_REGION_MM3, VOXEL_MM3) == pytest.approx(3.0, abs=0.01)


def test_a_mostly_right_region_is_false_even_with_some_wrong_voxels() -> None:
    score, wrong = _score()
    wrong[15:17, 15:20, 15:20] = True  # 50 of its 125 voxels wrong: still mostly right
    assert series_score(score, MIN_REGION_MM3, VOXEL_MM3, wrong) == pytest.approx(1.5, abs=0.01)


def test_the_margin_band_marked_not_searched_is_ignored() -> None:
    score, wrong = _score()
    score[15:20, 15:20, 15:20] = -np.inf  # what calibrate does outside regions.searched_mask
    assert series_score(score, MIN_REGION_MM3, VOXEL_MM3, wrong) < 1.0


def test_flagged_volumes_split_right_flags_from_false_ones() -> None:
    score, wrong = _score()
    every = flagged_volume_ml(score, 1.0, MIN_REGION_MM3, VOXEL_MM3, wrong)
    right = flagged_volume_ml(score, 1.0, MIN_REGION_MM3, VOXEL_MM3, wrong, right=True)
    assert every == pytest.approx(250 * VOXEL_MM3 / 1000)
    assert right == pytest.approx(125 * VOXEL_MM3 / 1000)


def test_operating_point_covers_the_highest_subject_and_the_fitted_tail() -> None:
    assert operating_point([1.0]) == pytest.approx(1.0 * BETA_MARGIN)
    scores = [1.0, 1.02, 0.98, 1.01, 0.99]
    point = operating_point(scores)
    assert point > max(scores) * BETA_MARGIN
    assert point < 1.2 * BETA_MARGIN


def test_block_fractions_are_on_the_level_grid() -> None:
    """What the fit leaves out: per block of a level, the share of voxels where the sCT is wrong (padding right)."""
    wrong = np.zeros((10, 9, 9), dtype=bool)
    wrong[0:4, 0:4, 0:4] = True  # one whole block
    wrong[8:10, 8, 8] = True  # 2 voxels of the last, padded block
    share = block_fraction(wrong, 4, (3, 3, 3))
    assert share.shape == (3, 3, 3)
    assert share[0, 0, 0] == 1.0
    assert share[2, 2, 2] == pytest.approx(2 / 64)
    assert float(share.sum()) == pytest.approx(1 + 2 / 64)
