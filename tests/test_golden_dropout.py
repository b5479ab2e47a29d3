"""Same key -> same estimate as neural-tangents 0.6.5 for a dropout model: its rule for
the dropout key of f(x2), per call and per block (tests/data/nt065_dropout.npz, made by
tests/data/make_goldens.py; the calls are listed in tests/data/README.md)."""

import os

import jax
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import stax_serial

import mcntk

RTOL = 1e-5
DATA = os.path.join(os.path.dirname(__file__), "data", "nt065_dropout.npz")

pytestmark = pytest.mark.skipif(jax.config.jax_enable_x64,
                                reason="golden values are float32 parameter draws")


@pytest.fixture
def nt():
    old = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    try:
        yield dict(np.load(DATA))
    finally:
        jax.config.update("jax_threefry_partitionable", old)


def _model():
    return stax_serial(stax.Dense(64), stax.Relu, stax.Dropout(0.8, mode="train"), stax.Dense(3))


def check(actual, expected):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= RTOL, err


@pytest.mark.parametrize("implementation", [0, 1, 2])
@pytest.mark.parametrize("case,x2,kwargs", [
    ("x2", "x2", {}),
    ("x2none", None, {}),
    ("x2copy", "copy", {}),
    ("batched2_x2", "x2", dict(batch_size=2)),
    ("batched2_x2none", None, dict(batch_size=2)),
    ("vmap0_x2", "x2", dict(vmap_axes=0)),
    ("full_x2none", None, dict(trace_axes=())),
])
def test_dropout_matches_neural_tangents(nt, implementation, case, x2, kwargs):
    init_fn, apply_fn = _model()
    other = {"x2": nt["x2"], None: None, "copy": np.array(nt["x1"]).copy()}[x2]
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, nt["key"], 4,
                                            implementation=implementation, **kwargs)
    k = kernel_fn(nt["x1"], other, ("nngp", "ntk"))
    check(k.nngp, nt[f"nngp_{case}"])
    check(k.ntk, nt[f"ntk_{case}"])


def test_dropout_batched_on_host(nt):
    init_fn, apply_fn = _model()
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, nt["key"], 4, batch_size=2,
                                            store_on_device=False)
    k = kernel_fn(nt["x1"], None, ("nngp", "ntk"))
    assert isinstance(k.ntk, np.ndarray)
    check(k.nngp, nt["nngp_batched2_x2none"])
    check(k.ntk, nt["ntk_batched2_x2none"])
