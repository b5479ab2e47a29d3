"""Strict JAX for every test, plus shared fixtures."""

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ.get("MCNTK_TEST_X64"):
    jax.config.update("jax_enable_x64", True)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "nt065_mlp.npz")


@pytest.fixture
def golden():
    """neural-tangents 0.6.5's numbers (see shared/golden/README.md), with the PRNG
    implementation they were made with; the flag is restored afterwards."""
    old = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    try:
        yield dict(np.load(GOLDEN))
    finally:
        jax.config.update("jax_threefry_partitionable", old)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
