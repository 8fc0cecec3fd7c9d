"""Shared, expensive fixtures: one held-out phantom subject and the shipped model, built once per test session."""

from __future__ import annotations

import pytest

from engines.model.manifest import ModelManifest, default_manifest
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.training.recipe import EVALUATION_SEED_BASE

#: A held-out subject outside the range ``sct-agent evaluate --phantom N`` uses for small N.
HELD_OUT_TEST_SEED = EVALUATION_SEED_BASE + 500


@pytest.fixture(scope="session")
def held_out_case() -> PhantomCase:
    return generate_case(HELD_OUT_TEST_SEED, SEED_PROTOCOL)


@pytest.fixture(scope="session")
def shipped_manifest() -> ModelManifest:
    return default_manifest()
