"""The input statistics the confidence reads: neighbourhood means as ``avg_pool3d`` computes them (anisotropic ones
included, and windows narrower than the neighbourhood), channel counts, and statistics saved before the
neighbourhoods were part of the file still loading and scoring as they were fitted."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from agent.cli.engine import format_contexts, parse_contexts
from engines.confidence.calibrate import CalibrationSettings, calibrate
from engines.confidence.density import FeatureDensity, TapDensity
from engines.confidence.input_features import (
    CHANNELS,
    CONTEXTS,
    INPUT_TAP,
    LEGACY_CONTEXTS,
    STRIDE,
    InputStatistics,
    _context_mean,
    slice_reach,
)
from engines.model.manifest import default_manifest


def _echoes(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((1, 2, *shape), generator=generator) * 1.2


@pytest.mark.parametrize("size", [(3, 3, 3), (5, 9, 9), (1, 7, 3)])
def test_neighbourhood_means_are_avg_pool_over_the_blocks_that_exist(size: tuple[int, int, int]) -> None:
    blocks = torch.randn(1, 3, 6, 12, 11, generator=torch.Generator().manual_seed(1))
    expected = F.avg_pool3d(
        blocks, size, stride=1, padding=tuple(k // 2 for k in size), count_include_pad=False
    )
    assert torch.allclose(_context_mean(blocks, size), expected, atol=1e-6)


def test_a_window_narrower_than_the_neighbourhood_is_computed() -> None:
    """A small field of view (4 blocks across) under a 9-block neighbourhood: every block sees all blocks of its
    row, so the in-plane means are the plain means of each slice's rows and columns."""
    blocks = torch.randn(1, 1, 5, 4, 4, generator=torch.Generator().manual_seed(2))
    out = _context_mean(blocks, (1, 9, 9))
    assert out.shape == blocks.shape
    assert torch.allclose(out, blocks.mean(dim=(3, 4), keepdim=True).expand_as(out), atol=1e-6)


def test_channels_follow_the_neighbourhoods() -> None:
    x = _echoes((16, 32, 40))
    default = InputStatistics()
    wide = InputStatistics((*CONTEXTS, (5, 9, 9)))
    assert default(x).shape == (1, CHANNELS, 16 // STRIDE, 32 // STRIDE, 40 // STRIDE)
    assert CHANNELS == 6 * (1 + len(CONTEXTS)) == 18
    assert wide(x).shape[1] == wide.channels == 24
    # The same block and neighbourhood statistics first; the wide neighbourhood adds its own.
    assert torch.equal(wide(x)[:, :18], default(x))


@pytest.mark.parametrize("contexts", [((4, 3, 3),), ((3, 3),), ()])
def test_bad_neighbourhoods_are_refused(contexts: tuple[tuple[int, ...], ...]) -> None:
    with pytest.raises(ValueError, match="contexts"):
        InputStatistics(contexts)  # type: ignore[arg-type]


def test_statistics_for_other_neighbourhoods_are_refused_by_channel_count() -> None:
    with pytest.raises(ValueError, match="expected the input statistics' 24 channels"):
        TapDensity(18, 4, STRIDE, InputStatistics((*CONTEXTS, (5, 9, 9))))


def test_statistics_saved_before_the_neighbourhoods_were_saved_load_as_fitted() -> None:
    """The first input-domain calibration wrote no ``contexts`` buffer: its 18 channels are the legacy
    neighbourhoods, and the reloaded head scores exactly as the one that was saved."""
    tap = TapDensity(18, 4, STRIDE, InputStatistics(LEGACY_CONTEXTS))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for buffer in (tap.whiten_weight, tap.whiten_bias, tap.centre_weight, tap.centre_bias):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    head = FeatureDensity({INPUT_TAP: tap}).eval()
    state = head.state_dict()
    old_file = {k: v for k, v in state.items() if not k.endswith("extractor.contexts")}
    assert len(old_file) == len(state) - 1
    reloaded = FeatureDensity.from_state_dict(old_file)
    x = _echoes((16, 32, 32), seed=4)
    with torch.inference_mode():
        assert torch.equal(reloaded({INPUT_TAP: x}, x.shape[2:]), head({INPUT_TAP: x}, x.shape[2:]))
    extractor = reloaded.taps[INPUT_TAP].extractor
    assert isinstance(extractor, InputStatistics) and extractor.sizes == LEGACY_CONTEXTS
    # A file that names its neighbourhoods gets them.
    wide = ((3, 3, 3), (5, 9, 9))
    current = FeatureDensity({INPUT_TAP: TapDensity(18, 4, STRIDE, InputStatistics(wide))}).state_dict()
    again = FeatureDensity.from_state_dict(current).taps[INPUT_TAP].extractor
    assert isinstance(again, InputStatistics) and again.sizes == wide


def test_calibration_takes_neighbourhoods_on_the_command_line() -> None:
    assert parse_contexts("3x3x3,5x5x5,5x9x9") == ((3, 3, 3), (5, 5, 5), (5, 9, 9))
    assert format_contexts(CONTEXTS) == "3x3x3,5x5x5"
    for bad in ("3x3,5x5x5", "4x3x3", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"found {bad!r}"):
            parse_contexts(bad)


def test_the_slices_read_on_each_side_follow_the_deepest_neighbourhood() -> None:
    assert slice_reach(CONTEXTS) == 16 == slice_reach(((3, 3, 3), (5, 9, 9)))
    assert slice_reach(((7, 7, 7),)) == 20


def test_calibration_refuses_neighbourhoods_deeper_than_the_halo_before_any_work() -> None:
    manifest = default_manifest()
    settings = CalibrationSettings(contexts=((3, 3, 3), (7, 9, 9)))
    with pytest.raises(ValueError, match=r"read 20 slices on each side; expected at most the slab halo, 16"):
        calibrate(manifest, settings, report=lambda line: pytest.fail(f"work started: {line}"))
