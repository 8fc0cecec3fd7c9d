"""The archive of published volumes that survives a restart: atomic files, the newest N kept, checksums
checked on load, damaged files removed and reported rather than sent."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from wire_support import random_hu, sample_volume

from agent.inference.untrusted_regions import flag_report, stored_regions
from agent.publish.volume_archive import VolumeArchive
from agent.publish.wire import ConfidenceMessage, decode, encode, encode_confidence
from agent.records import SctVolume, confidence_sha256
from engines.confidence.spec import ConfidenceSpec
from sct_core.geometry import Orientation, VolumeGeometry


def geometry() -> VolumeGeometry:
    return VolumeGeometry.from_fov(
        center=(5.0, -30.0, 80.0),
        fov_mm=(8 * 0.9, 10 * 1.1, 6 * 2.5),
        voxel_mm=(0.9, 1.1, 2.5),
        orientation=Orientation.SAGITTAL,
        oblique_deg=12.0,
    )


def volume(k: int, produced_at: float) -> SctVolume:
    grid = geometry()
    v = sample_volume(grid, random_hu(grid.shape, seed=k), slab_count=2, acquisition_id=f"acq{k:04d}")
    return SctVolume(
        **{f: getattr(v, f) for f in SctVolume.__dataclass_fields__} | {"produced_at": produced_at}
    )


def test_a_saved_volume_loads_back_identical_and_marked_republished(tmp_path: Path) -> None:
    archive = VolumeArchive(tmp_path / "snapshot", keep=2)
    original = volume(1, 100.0)
    archive.save(original)
    (loaded,), problems = archive.load()
    assert problems == []
    assert loaded.republished and not original.republished
    assert loaded.hu.tobytes() == original.hu.tobytes() and loaded.sha256 == original.sha256
    assert loaded.geometry == original.geometry
    assert (loaded.acquisition_id, loaded.model_id, loaded.protocol_id, loaded.slab_count) == (
        original.acquisition_id,
        original.model_id,
        original.protocol_id,
        original.slab_count,
    )
    # On the wire it says so, and a decoder reads it back.
    message = decode(encode(loaded, 5, "pub", 1.0))
    assert message.republished  # type: ignore[union-attr]
    assert not decode(encode(original, 6, "pub", 1.0)).republished  # type: ignore[union-attr]
    assert not [p for p in (tmp_path / "snapshot").iterdir() if p.name.startswith(".")]  # no temp files left


def test_only_the_newest_volumes_are_kept_and_loaded_oldest_first(tmp_path: Path) -> None:
    archive = VolumeArchive(tmp_path, keep=2)
    for k, produced_at in enumerate((30.0, 10.0, 40.0, 20.0)):
        archive.save(volume(k, produced_at))
    loaded, _ = archive.load()
    assert [v.acquisition_id for v in loaded] == ["acq0000", "acq0002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "acq0000.json",
        "acq0000.npy",
        "acq0002.json",
        "acq0002.npy",
    ]


@pytest.mark.parametrize("damage", ["pixels", "description", "missing array", "format"])
def test_a_damaged_volume_is_reported_and_removed_never_republished(tmp_path: Path, damage: str) -> None:
    archive = VolumeArchive(tmp_path, keep=4)
    archive.save(volume(1, 10.0))
    archive.save(volume(2, 20.0))
    if damage == "pixels":
        hu = np.load(tmp_path / "acq0001.npy").copy()
        hu[0, 0, 0] ^= 1
        np.save(tmp_path / "acq0001.npy", hu)
    elif damage == "description":
        (tmp_path / "acq0001.json").write_text("{not json")
    elif damage == "missing array":
        (tmp_path / "acq0001.npy").unlink()
    else:
        meta = json.loads((tmp_path / "acq0001.json").read_text())
        (tmp_path / "acq0001.json").write_text(json.dumps(meta | {"format": 99}))
    loaded, problems = archive.load()
    assert [v.acquisition_id for v in loaded] == ["acq0002"]
    assert [p.acquisition_id for p in problems] == ["acq0001"]
    assert not list(tmp_path.glob("acq0001.*"))
    if damage == "pixels":
        assert "sha256" in problems[0].reason


def test_an_acquisition_id_that_is_not_a_plain_name_is_refused(tmp_path: Path) -> None:
    bad = volume(1, 1.0)
    bad = SctVolume(
        **{f: getattr(bad, f) for f in SctVolume.__dataclass_fields__} | {"acquisition_id": "../x"}
    )
    with pytest.raises(ValueError, match=r"acquisition_id: found '\.\./x'"):
        VolumeArchive(tmp_path, keep=1).save(bad)


def test_a_volume_with_confidence_comes_back_with_it_and_its_regions_found_again(tmp_path: Path) -> None:
    """Schema 1.4: the confidence is kept beside the HU and its regions found again at load with the numbers
    the volume was checked with; a damaged confidence is refused like damaged HU."""
    original = volume(7, 100.0)
    confidence = np.full(original.geometry.shape, 230, dtype=np.uint8)
    confidence[2:5, 3:6, 1:4] = 12
    spec = ConfidenceSpec("feature-mahalanobis", 64, 1.0)
    checked = replace(
        original,
        confidence=confidence,
        confidence_sha256=confidence_sha256(confidence),
        confidence_method=spec.method,
        confidence_threshold=spec.threshold,
        flagged=flag_report(confidence, spec, original.geometry.spacing),
    )
    archive = VolumeArchive(tmp_path, keep=2, find_regions=stored_regions)
    archive.save(checked)
    archive.save(volume(8, 101.0))  # one without confidence beside it
    (loaded, plain), problems = archive.load()
    assert problems == [] and plain.confidence is None and plain.flagged is None
    assert loaded.confidence is not None and loaded.confidence.tobytes() == confidence.tobytes()
    assert (loaded.confidence_method, loaded.confidence_threshold) == (spec.method, spec.threshold)
    assert loaded.flagged is not None and checked.flagged is not None
    assert loaded.flagged.regions == checked.flagged.regions and loaded.flagged.count == 1
    assert np.array_equal(loaded.flagged.mask, checked.flagged.mask)
    companion = decode(encode_confidence(loaded, 9, "pub", 1.0) or [])
    assert isinstance(companion, ConfidenceMessage) and companion.republished and companion.flagged == 1

    (tmp_path / f"{checked.acquisition_id}.confidence.npy").write_bytes(b"damaged")
    volumes, problems = VolumeArchive(tmp_path, keep=2, find_regions=stored_regions).load()
    assert [p.acquisition_id for p in problems] == [checked.acquisition_id]
    assert [v.acquisition_id for v in volumes] == [plain.acquisition_id]
    assert not list(tmp_path.glob(f"{checked.acquisition_id}*"))
