"""Slab planning and the product's promise that stitched slabs equal one whole-volume pass within 1 HU."""

from __future__ import annotations

import numpy as np
import pytest

from engines.backends.torch_cpu import TorchEagerBackend
from engines.inference.device_volume import PixelRangeError
from engines.inference.engine import SctEngine, network_input, to_hu, whole_volume_reference
from engines.inference.slabs import SlabPlan, pad_in_plane
from engines.model.manifest import ModelManifest
from engines.phantom.case import PhantomCase
from engines.training.package import choose_depth

#: The product's promise (docs/architecture.md, Target figures): stitched slabs vs one whole-volume pass.
STITCH_TOLERANCE_HU = 1.0
#: In-plane crop for the slab-path tests that need the network but not the whole field of view.
CROP = 150


@pytest.mark.parametrize(
    ("n", "depth", "halo"), [(100, 32, 16), (100, 56, 16), (7, 32, 8), (64, 32, 0), (1, 8, 8)]
)
def test_plan_covers_every_slice_once(n: int, depth: int, halo: int) -> None:
    plan = SlabPlan.for_volume(n, depth, halo)
    covered = np.concatenate([np.arange(w.core_start, w.core_stop) for w in plan.windows])
    assert covered.tolist() == list(range(n))
    for w in plan.windows:
        indices = plan.slice_indices(w)
        assert len(indices) == plan.window_depth == depth + 2 * halo
        assert indices.min() >= 0
        assert indices.max() <= n - 1
        assert w.needed_start == max(w.core_start - halo, 0)
        assert w.needed_stop == min(w.core_start + depth + halo, n)
        assert set(indices.tolist()) == set(w.needed_slices)


def test_windows_are_aligned_sub_windows_of_the_whole_volume_input() -> None:
    plan = SlabPlan.for_volume(100, 32, 16)
    reference = plan.reference_indices()
    assert len(reference) == plan.padded_slices
    for w in plan.windows:
        start = w.index * plan.depth
        assert start % 8 == 0
        np.testing.assert_array_equal(reference[start : start + plan.window_depth], plan.slice_indices(w))


def test_packaging_picks_the_cheapest_depth_for_the_protocol() -> None:
    # 100 slices: two slabs of 56 (+ halos) cost less than three of 40 or four of 32.
    assert choose_depth(100, 16) == 56
    assert choose_depth(100, 8) == 56
    assert choose_depth(64, 16) == 32


def test_plan_rejects_empty_volume_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="number of slices: found 0"):
        SlabPlan.for_volume(0, 32, 8)
    with pytest.raises(ValueError, match="depth/halo"):
        SlabPlan.for_volume(10, 0, 8)


def test_in_plane_padding_repeats_the_edge() -> None:
    x = np.arange(2 * 3 * 5 * 6, dtype=np.float32).reshape(2, 3, 5, 6)
    padded = pad_in_plane(x, 8)
    assert padded.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(padded[..., :5, :6], x)
    np.testing.assert_array_equal(padded[..., 7, :6], x[..., 4, :])
    assert pad_in_plane(padded, 8) is padded


def test_stitched_slabs_equal_whole_volume_inference(
    held_out_case: PhantomCase, shipped_manifest: ModelManifest
) -> None:
    """Every slice of the lumbar volume, cropped in-plane: exactness is decided along the slab axis (halos,
    edge repeats, the short last slab), which the crop keeps whole; the crop's odd size exercises padding."""
    echoes = centre_crop(held_out_case.echoes)
    whole = whole_volume_reference(shipped_manifest, echoes)
    engine = SctEngine.load(shipped_manifest, backend=TorchEagerBackend.name, in_plane=(CROP, CROP))
    stitched = engine.infer_volume(echoes)
    assert stitched.shape == echoes.shape[1:]
    assert len(engine.plan(echoes.shape[1]).windows) > 1
    diff = np.abs(stitched - whole)
    assert float(diff.max()) <= STITCH_TOLERANCE_HU, (
        f"max |ΔHU| {diff.max():.3f} at {np.unravel_index(diff.argmax(), diff.shape)}"
    )
    # The comparison is not vacuous: the crop through the spine spans cortical bone to fat.
    assert stitched.max() > 500
    assert stitched.min() < -100


def test_a_slab_needs_only_its_own_slices(
    held_out_case: PhantomCase, shipped_manifest: ModelManifest
) -> None:
    """What lets the agent infer while the scanner is still exporting: slices past the window do not matter."""
    engine = SctEngine.load(shipped_manifest, backend=TorchEagerBackend.name, in_plane=(CROP, CROP))
    echoes = centre_crop(held_out_case.echoes)
    plan = engine.plan(echoes.shape[1])
    window = plan.windows[0]
    scale = engine.scale(echoes)
    partial = np.zeros_like(echoes)
    partial[:, : window.needed_stop] = echoes[:, : window.needed_stop]
    assert engine.scale(partial) == scale  # normalisation reads only the leading slices
    full, filling = engine.new_volume(2, echoes.shape[1:]), engine.new_volume(2, echoes.shape[1:])
    for echo in range(2):
        for k in range(echoes.shape[1]):
            full.put(echo, k, echoes[echo, k])
        for k in window.needed_slices:
            filling.put(echo, k, echoes[echo, k])
    np.testing.assert_array_equal(full.to_host(), echoes)
    full_slab = engine.run_slab(full, plan, window, scale)
    partial_slab = engine.run_slab(filling, plan, window, scale)
    assert full_slab.dtype == np.int16 and full_slab.shape == (window.core_stop, *echoes.shape[2:])
    np.testing.assert_array_equal(full_slab, partial_slab)


def centre_crop(echoes: np.ndarray) -> np.ndarray:
    """The middle ``CROP`` x ``CROP`` of every slice (through the spine): the same anatomy, a fifth of the work.
    Not a multiple of the network's downsampling factor, so in-plane padding is exercised too."""
    rows, cols = echoes.shape[-2:]
    r0, c0 = (rows - CROP) // 2, (cols - CROP) // 2
    return np.ascontiguousarray(echoes[..., r0 : r0 + CROP, c0 : c0 + CROP])


def host_path_slab(engine: SctEngine, echoes: np.ndarray, plan: SlabPlan, k: int, scale: float) -> np.ndarray:
    """The engine path before the volume moved to the device: numpy gather, pad, float32, backend, HU, rint."""
    window = plan.windows[k]
    rows, cols = echoes.shape[-2:]
    x = network_input(engine.manifest, echoes, plan.slice_indices(window), scale)
    out = engine.backend_for((rows, cols)).infer(x)
    core = out[plan.halo : plan.halo + window.core_stop - window.core_start, :rows, :cols]
    return np.rint(to_hu(engine.manifest, core)).astype(np.int16)


def test_device_resident_slabs_equal_the_host_path(
    held_out_case: PhantomCase, shipped_manifest: ModelManifest
) -> None:
    """Moving gather, padding, scaling, HU and rounding onto the backend's device changes no HU by more than 1."""
    engine = SctEngine.load(shipped_manifest, backend=TorchEagerBackend.name, in_plane=(CROP, CROP))
    echoes = centre_crop(held_out_case.echoes)
    plan = engine.plan(echoes.shape[1])
    scale = engine.scale(echoes)
    volume = engine.new_volume(2, echoes.shape[1:])
    for echo in range(2):
        for k in range(echoes.shape[1]):
            volume.put(echo, k, echoes[echo, k])
    out = engine.new_output(echoes.shape[1:])
    for k, window in enumerate(plan.windows):
        engine.run_slab(volume, plan, window, scale, out=out[window.core_start : window.core_stop])
        host = host_path_slab(engine, echoes, plan, k, scale)
        diff = np.abs(out[window.core_start : window.core_stop].astype(np.int32) - host)
        assert int(diff.max()) <= STITCH_TOLERANCE_HU, f"slab {k}: max |ΔHU| {diff.max()}"
    assert out.max() > 500 and out.min() < 0  # bone and soft tissue: the comparison spans the HU range


def test_device_volume_refuses_pixels_it_cannot_hold(shipped_manifest: ModelManifest) -> None:
    engine = SctEngine.load(shipped_manifest, backend=TorchEagerBackend.name, in_plane=(16, 16))
    volume = engine.new_volume(2, (4, 16, 16))
    with pytest.raises(PixelRangeError, match=r"pixel values: found -5\.\.7, expected 0\.\.65535"):
        volume.put(0, 0, np.arange(-5, 251, dtype=np.int16).reshape(16, 16) % 13 - 5)
    with pytest.raises(ValueError, match=r"image shape: found \(16, 8\), expected \(16, 16\)"):
        volume.put(0, 0, np.zeros((16, 8), dtype=np.uint16))
    volume.put(1, 3, np.full((16, 16), 60000, dtype=np.uint16))
    assert int(volume.to_host()[1, 3].min()) == 60000
