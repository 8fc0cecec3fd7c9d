"""Training data and the resumable loop: deterministic batches, jitter within the recipe, exact resumption with
subjects generated in worker processes, the training device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.cli import build_parser
from agent.cli.train import recipe_from_args
from engines.backends.base import Precision
from engines.backends.cpu_features import native_precisions
from engines.backends.torch_cuda import cuda_unavailable_reason
from engines.model.normalisation import Normalisation
from engines.model.unet import HU_SCALE
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.training.cases import CasePool, PreparedCase, pool_seeds, training_acquisition, upcoming_seeds
from engines.training.device import TrainingDeviceError, bf16_autocast, training_device
from engines.training.patches import sample_batch
from engines.training.prefetch import SubjectPrefetcher
from engines.training.recipe import (
    EVALUATION_SEED_BASE,
    RECIPE_V1,
    RECIPE_V2,
    TRAIN_SEED_BASE,
    VALIDATION_SEED_BASE,
    TrainingRecipe,
)
from engines.training.trainer import CHECKPOINT_NAME, RECORD_NAME, WEIGHTS_NAME, RecipeMismatchError, train

#: A recipe small enough for a test: one low-resolution subject, tiny patches, a handful of steps.
TINY = TrainingRecipe(
    steps=4,
    batch_size=1,
    patch=(16, 32, 32),
    pool_size=1,
    replace_every=100,
    supersample=1,
    warmup_steps=1,
    checkpoint_every=100,
    bn_recalibration_batches=2,
    # oneDNN's bf16 weight gradients are not bit-reproducible (measured: the bottleneck convolutions differ in
    # the last bits between identical calls, even on one thread); fp32 is, so the resume check runs fp32.
    bf16_autocast=False,
)


def test_acquisition_jitter_stays_in_the_recipe_ranges() -> None:
    recipe = TrainingRecipe()
    acqs = [training_acquisition(recipe, TRAIN_SEED_BASE + i) for i in range(40)]
    te1, te2 = SEED_PROTOCOL.echo_times_ms
    for a in acqs:
        assert abs(a.echo_times_ms[0] - te1) <= recipe.te1_jitter_ms + 1e-9
        assert abs(a.echo_times_ms[1] - te2) <= recipe.te2_jitter_ms + 1e-9
        assert recipe.flip_angle_range_deg[0] <= a.flip_angle_deg <= recipe.flip_angle_range_deg[1]
        assert recipe.noise_scale_range[0] <= a.noise_scale <= recipe.noise_scale_range[1]
        assert a.field_strength_t == SEED_PROTOCOL.field_strength_t
        assert a.voxel_mm == SEED_PROTOCOL.voxel_mm
    assert len({a.echo_times_ms for a in acqs}) == len(acqs)  # really jittered
    assert training_acquisition(recipe, TRAIN_SEED_BASE + 3) == acqs[3]  # and deterministic


def test_subject_seed_ranges_never_overlap() -> None:
    recipe = TrainingRecipe()
    seeds = set(recipe.training_seeds)
    assert len(seeds) == recipe.case_count
    assert max(seeds) < VALIDATION_SEED_BASE < EVALUATION_SEED_BASE
    assert pool_seeds(recipe, 0) == [TRAIN_SEED_BASE + i for i in range(recipe.pool_size)]
    assert pool_seeds(recipe, recipe.steps - 1)[-1] == max(seeds)
    with pytest.raises(ValueError, match="at most"):
        TrainingRecipe(replace_every=1, steps=VALIDATION_SEED_BASE)


def _toy_case() -> PreparedCase:
    rng = np.random.default_rng(0)
    echoes = rng.integers(0, 4000, size=(2, 20, 40, 40)).astype(np.uint16)
    ct = rng.integers(-1000, 2000, size=(20, 40, 40)).astype(np.int16)
    return PreparedCase(
        seed=1,
        echoes=echoes,
        scale=Normalisation(leading_slices=8).scale(echoes),
        ct_hu=ct,
        bone_centres=np.array([np.ravel_multi_index((10, 20, 20), ct.shape)]),
        body_centres=np.arange(ct.size),
    )


def test_batches_are_deterministic_per_step_and_scaled() -> None:
    recipe = TINY.with_changes(batch_size=3, intensity_jitter=0.0, echo_jitter=0.0, flip_probability=0.0)
    case = _toy_case()
    x, y = sample_batch(recipe, [case], step=5)
    x2, y2 = sample_batch(recipe, [case], step=5)
    x3, _ = sample_batch(recipe, [case], step=6)
    assert x.shape == (3, 2, *recipe.patch)
    assert y.shape == (3, 1, *recipe.patch)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, x3)
    # Without jitter, inputs are stored integers / scale and targets integer HU / HU_SCALE.
    stored = x * np.float32(case.scale)
    np.testing.assert_allclose(stored, np.rint(stored), atol=2e-2)
    assert stored.max() <= case.echoes.max() + 0.5
    hu = y * np.float32(HU_SCALE)
    np.testing.assert_allclose(hu, np.rint(hu), atol=2e-3)
    assert case.ct_hu.min() <= hu.min() and hu.max() <= case.ct_hu.max()


def test_interrupted_training_resumes_to_identical_weights(tmp_path: Path) -> None:
    # One thread: multi-threaded weight-gradient reductions may sum in another order, and Adam's first steps
    # amplify last-bit differences of near-zero gradients; the property under test is the resume.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_resume(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_resume(tmp_path: Path) -> None:
    # The straight run generates its subjects itself, the split one in a worker process: the pool is the same.
    straight = train(tmp_path / "straight", TINY)
    assert straight is not None
    assert train(tmp_path / "split", TINY, stop_after=2, workers=1) is None
    assert (tmp_path / "split" / CHECKPOINT_NAME).is_file()
    assert not (tmp_path / "split" / WEIGHTS_NAME).exists()
    checkpoint = torch.load(tmp_path / "split" / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    tensors = [*checkpoint["model"].values(), *checkpoint["optimiser"]["state"][0].values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)  # loads on a machine without a GPU
    resumed = train(tmp_path / "split", TINY, workers=1, device="cpu")
    assert resumed is not None
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    record = json.loads((tmp_path / "split" / RECORD_NAME).read_text())
    assert [(r["device"], r["workers"], r["from_step"], r["to_step"]) for r in record["sessions"]] == [
        ("cpu", 1, 0, 2),
        ("cpu", 1, 2, 4),
    ]
    assert {r["precision"] for r in record["sessions"]} == {"fp32 (the recipe has no bf16 autocast)"}
    assert sum(record["hard_cases"].values()) == TINY.case_count
    with pytest.raises(RecipeMismatchError, match="steps: 4 -> 5"):
        train(tmp_path / "split", TINY.with_changes(steps=5))


def test_subjects_prepared_in_a_worker_process_equal_those_prepared_here() -> None:
    recipe = TINY.with_changes(  # a hard case: the subject override travels to the worker too
        osteoporotic_fraction=1.0, scoliosis_fraction=0.0, degenerated_disc_fraction=0.0, steps=1
    )
    normalisation = Normalisation()
    here = CasePool(recipe, normalisation).at_step(0)
    with SubjectPrefetcher(recipe, normalisation, workers=1) as prefetcher:
        assert prefetcher.lookahead == 2
        there = CasePool(recipe, normalisation, prefetcher).at_step(0)
    assert [c.seed for c in here] == [c.seed for c in there] == [TRAIN_SEED_BASE]
    assert here[0].hard_case == there[0].hard_case == "osteoporotic"
    assert here[0].scale == there[0].scale
    for name in ("echoes", "ct_hu", "bone_centres", "body_centres"):
        np.testing.assert_array_equal(getattr(here[0], name), getattr(there[0], name), err_msg=name)


def test_prefetch_asks_for_the_next_subjects_and_never_past_the_last() -> None:
    recipe = TrainingRecipe(pool_size=3, replace_every=10, steps=45)  # seeds 0..6 of the training range
    assert pool_seeds(recipe, 0) == [TRAIN_SEED_BASE + i for i in range(3)]
    assert upcoming_seeds(recipe, 0, 2) == [TRAIN_SEED_BASE + 3, TRAIN_SEED_BASE + 4]
    assert upcoming_seeds(recipe, 25, 4) == [TRAIN_SEED_BASE + 5, TRAIN_SEED_BASE + 6]
    assert upcoming_seeds(recipe, recipe.steps - 1, 4) == []
    with pytest.raises(ValueError, match="workers"):
        SubjectPrefetcher(recipe, Normalisation(), workers=0)


def test_training_device_is_parsed_and_refused_by_name() -> None:
    assert training_device("cpu") == torch.device("cpu")
    for text in ("gpu", "cpu:1", "cuda:x", "cuda:-1", ""):
        with pytest.raises(TrainingDeviceError, match="is not one of cpu, cuda or cuda:INDEX") as info:
            training_device(text)
        assert info.value.attribute == "training device" and info.value.found == text


def test_bf16_autocast_only_where_the_cpu_runs_bf16_natively() -> None:
    cpu = torch.device("cpu")
    native = Precision.BF16 in native_precisions()
    assert bf16_autocast(True, cpu) == (
        (True, "bf16 autocast")
        if native
        else (False, "fp32 (this CPU has no bf16 instructions; emulated bf16 is slower than fp32)")
    )
    assert bf16_autocast(False, cpu) == (False, "fp32 (the recipe has no bf16 autocast)")


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="this machine has a CUDA GPU")
def test_cuda_is_refused_with_the_device_named_where_there_is_none(tmp_path: Path) -> None:
    for text in ("cuda", "cuda:1"):
        with pytest.raises(TrainingDeviceError, match=f"training device '{text}': CUDA is not available"):
            training_device(text)
    # The trainer refuses it before it creates anything.
    with pytest.raises(TrainingDeviceError, match="'cuda:0'"):
        train(tmp_path / "run", TINY, device="cuda:0")
    assert not (tmp_path / "run").exists()


def test_the_command_line_names_a_recipe_and_changes_single_fields() -> None:
    def recipe(*argv: str) -> TrainingRecipe:
        arguments = ["train", *argv]
        return recipe_from_args(build_parser(arguments).parse_args(arguments))

    assert recipe() == RECIPE_V2
    assert RECIPE_V2.steps > RECIPE_V1.steps and RECIPE_V2.replace_every < RECIPE_V1.replace_every
    v1 = recipe("--recipe", "v1", "--steps", "7")
    assert v1 == RECIPE_V1.with_changes(steps=7)
    assert v1.name == "v1" and v1.pool_size == RECIPE_V1.pool_size and v1.osteoporotic_fraction == 0.0


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="this machine has a CUDA GPU")
def test_train_refuses_an_absent_or_malformed_device_before_it_starts(tmp_path: Path) -> None:
    for device, message in (
        ("cuda:0", "training device 'cuda:0': CUDA is not available"),
        ("tpu", "training device 'tpu' is not one of cpu, cuda or cuda:INDEX"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "train", "--out", str(tmp_path / "run"), "--device", device],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(
    cuda_unavailable_reason() is not None, reason=f"needs a CUDA GPU: {cuda_unavailable_reason()}"
)
def test_a_run_continues_across_cpu_and_gpu(tmp_path: Path) -> None:
    recipe = TINY.with_changes(steps=6, bf16_autocast=True)
    for first, second in (("cpu", "cuda"), ("cuda", "cpu")):
        out = tmp_path / f"{first}-then-{second}"
        assert train(out, recipe, device=first, stop_after=3) is None
        checkpoint = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
        assert all(t.device.type == "cpu" for t in checkpoint["model"].values())
        weights = train(out, recipe, device=second, workers=1)
        assert weights is not None
        state = torch.load(weights, weights_only=True)  # no map_location: the weights are CPU tensors
        assert all(t.device.type == "cpu" and bool(torch.isfinite(t.float()).all()) for t in state.values())
        record = json.loads((out / RECORD_NAME).read_text())
        devices = [s["device"].split(":")[0] for s in record["sessions"]]
        assert devices == [first, second]
        assert [(s["from_step"], s["to_step"]) for s in record["sessions"]] == [(0, 3), (3, 6)]
