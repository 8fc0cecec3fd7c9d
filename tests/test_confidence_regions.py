"""Flagged regions from a confidence volume: connectivity, the size rule, numbering and the slices reported."""

from __future__ import annotations

import numpy as np
import pytest

from engines.confidence.regions import FOV_MARGIN_MM, find_flagged_regions
from engines.confidence.spec import ConfidenceSpec, ConfidenceSpecError

SPACING = (0.9, 0.74, 0.74)
VOXEL_MM3 = 0.9 * 0.74 * 0.74
#: In-plane offset that puts the test patterns inside the searched area (past the field-of-view margin).
OFF = 20


def _spec(threshold: int = 128, min_region_mm3: float = 10.0) -> ConfidenceSpec:
    return ConfidenceSpec(method="test", threshold=threshold, min_region_mm3=min_region_mm3)


def test_regions_are_connected_components_below_threshold_largest_first() -> None:
    conf = np.full((40, 30 + 2 * OFF, 30 + 2 * OFF), 250, dtype=np.uint8)
    conf[5:10, OFF + 5 : OFF + 10, OFF + 5 : OFF + 10] = 100  # 125 voxels
    conf[20:30, OFF + 10 : OFF + 20, OFF + 10 : OFF + 20] = 30  # 1000 voxels, the larger one
    conf[20, OFF + 10, OFF + 10] = 3
    conf[35, OFF + 25, OFF + 25] = 0  # one voxel: below the size rule
    conf[0:3, OFF : OFF + 3, OFF : OFF + 3] = 128  # at the threshold: trusted (strictly below is flagged)
    flagged = find_flagged_regions(conf, _spec(), SPACING)
    assert [r.voxels for r in flagged.regions] == [1000, 125]
    big, small = flagged.regions
    assert (big.index, big.slice_start, big.slice_stop, big.min_confidence) == (1, 20, 30, 3)
    assert (big.row_start, big.row_stop, big.col_start, big.col_stop) == (
        OFF + 10,
        OFF + 20,
        OFF + 10,
        OFF + 20,
    )
    assert small.slices == range(5, 10)
    assert big.volume_ml == pytest.approx(1000 * VOXEL_MM3 / 1000)
    assert int(flagged.labels[25, OFF + 15, OFF + 15]) == 1 and int(flagged.labels[7, OFF + 7, OFF + 7]) == 2
    assert int(flagged.labels[35, OFF + 25, OFF + 25]) == 0
    assert flagged.flagged_voxels == int(flagged.mask.sum()) == 1125
    assert flagged.slice_spans == ((5, 10), (20, 30))


def test_diagonal_neighbours_form_one_region() -> None:
    conf = np.full((20, 20 + 2 * OFF, 20 + 2 * OFF), 255, dtype=np.uint8)
    for i in range(15):
        conf[2 + i, OFF + 2 + i, OFF + 2 + i] = 0  # a thin oblique line: touching only at corners
    flagged = find_flagged_regions(conf, _spec(min_region_mm3=5.0), SPACING)
    assert len(flagged.regions) == 1 and flagged.regions[0].voxels == 15


def test_a_cavity_enclosed_by_a_region_belongs_to_it_an_open_cup_does_not() -> None:
    """A screw's void core can score as typical (air-like) inside its flagged rim: the region takes it in. A cup
    open on one side encloses nothing, so the confident voxels in it stay out."""
    conf = np.full((30, 30 + 2 * OFF, 60 + 2 * OFF), 250, dtype=np.uint8)
    conf[5:15, OFF + 5 : OFF + 15, OFF + 5 : OFF + 15] = 40  # shell: 10^3 block ...
    conf[7:13, OFF + 7 : OFF + 13, OFF + 7 : OFF + 13] = 250  # ... with a confident 6^3 core
    conf[5:15, OFF + 5 : OFF + 15, OFF + 35 : OFF + 45] = 40  # cup: the same ...
    conf[7:15, OFF + 7 : OFF + 13, OFF + 37 : OFF + 43] = 250  # ... with its core open through slice 14
    flagged = find_flagged_regions(conf, _spec(), SPACING)
    assert [r.voxels for r in flagged.regions] == [1000, 1000 - 8 * 36]
    shell = flagged.regions[0]
    assert flagged.labels[10, OFF + 10, OFF + 10] == shell.index and shell.col_stop == OFF + 15
    assert flagged.labels[10, OFF + 10, OFF + 40] == 0
    assert shell.min_confidence == 40


def test_no_region_in_a_confident_volume() -> None:
    flagged = find_flagged_regions(np.full((8, 8, 8), 200, np.uint8), _spec(), SPACING)
    assert flagged.regions == () and flagged.slice_spans == () and not flagged.mask.any()


def test_the_edge_of_the_field_of_view_is_not_searched() -> None:
    """A region inside the in-plane margin is not reported, one just past it is; slices are searched to the end."""
    margin = int(np.ceil(FOV_MARGIN_MM / SPACING[1]))
    conf = np.full((30, 140, 140), 255, dtype=np.uint8)
    conf[0:10, 40:50, 0:margin] = 0  # the left edge band: not searched
    conf[10:20, 140 - margin : 140, 40:50] = 0  # the bottom edge band: not searched
    conf[20:30, 40:50, margin : margin + 10] = (
        0  # just inside the searched area, touching the first slices' end
    )
    flagged = find_flagged_regions(conf, _spec(), SPACING)
    assert [(r.slice_start, r.col_start) for r in flagged.regions] == [(20, margin)]


def test_a_small_field_of_view_keeps_its_centre() -> None:
    """The band is at most a tenth of the field of view per edge: 40 voxels of 0.74 mm keep 4 on each side."""
    conf = np.full((10, 40, 40), 255, dtype=np.uint8)
    conf[2:8, 4:10, 4:10] = 0
    flagged = find_flagged_regions(conf, _spec(), SPACING)
    assert [(r.row_start, r.col_start, r.voxels) for r in flagged.regions] == [(4, 4, 216)]


def test_wrong_input_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="uint8"):
        find_flagged_regions(np.zeros((4, 4, 4), np.float32), _spec(), SPACING)


@pytest.mark.parametrize(
    ("data", "attribute"),
    [
        ({"method": "m", "threshold": 0, "min_region_mm3": 1.0}, "confidence.threshold"),
        ({"method": "m", "threshold": 256, "min_region_mm3": 1.0}, "confidence.threshold"),
        ({"method": "m", "threshold": 1.5, "min_region_mm3": 1.0}, "confidence.threshold"),
        ({"method": "m", "threshold": 10, "min_region_mm3": -1.0}, "confidence.min_region_mm3"),
        ({"method": "m", "threshold": 10}, "confidence.min_region_mm3"),
        ({"method": "", "threshold": 10, "min_region_mm3": 1.0}, "confidence.method"),
    ],
)
def test_spec_refuses_bad_values_naming_the_attribute(data: dict[str, object], attribute: str) -> None:
    with pytest.raises(ConfidenceSpecError) as info:
        ConfidenceSpec.from_dict(data)
    assert attribute in str(info.value) or info.value.attribute == attribute


def test_spec_round_trips() -> None:
    spec = ConfidenceSpec("feature-mahalanobis", 128, 50.0, {"phantoms": [800000, 800001]})
    assert ConfidenceSpec.from_dict(spec.to_dict()) == spec
