"""Same key -> same estimate as neural-tangents 0.6.5 (tests/data/nt065_mlp.npz and
tests/data/nt065_cnn.npz, described in tests/data/README.md)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import stax_serial

import mcntk

RTOL = 1e-5

# neural-tangents drew float32 parameters; with x64 on, stax draws float64 ones, a
# different random stream, so these numbers only apply to the default float32 run.
pytestmark = pytest.mark.skipif(jax.config.jax_enable_x64,
                                reason="golden values are float32 parameter draws")


def _model():
    return stax_serial(stax.Dense(64), stax.Relu, stax.Dense(3))


def assert_matches(actual, expected):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= RTOL, err


@pytest.mark.parametrize("implementation", [0, 1, 2, 3])
@pytest.mark.parametrize("vmap_axes", [0, None])
def test_two_inputs(golden, implementation, vmap_axes):
    init_fn, apply_fn = _model()
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jnp.asarray(golden["key"]), 4,
                                            vmap_axes=vmap_axes, implementation=implementation)
    k = kernel_fn(golden["x1"], golden["x2"], ("nngp", "ntk"))
    # nt's three implementations agree; each of ours must match every one of them
    for impl in (1, 2, 3):
        assert_matches(k.nngp, golden[f"nngp_impl{impl}"])
        assert_matches(k.ntk, golden[f"ntk_impl{impl}"])


@pytest.mark.parametrize("implementation", [1, 2, 3])
def test_no_trace_x2_none(golden, implementation):
    init_fn, apply_fn = _model()
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, golden["key"], 4, trace_axes=(),
                                            implementation=implementation)
    k = kernel_fn(golden["x1"], None, ("nngp", "ntk"))
    assert_matches(k.nngp, golden["nngp_full_x2none"])
    assert_matches(k.ntk, golden["ntk_full_x2none"])


def test_generator(golden):
    init_fn, apply_fn = _model()
    gen = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, golden["key"], [4, 1, 2])(
        golden["x1"], golden["x2"], "ntk")
    estimates = list(gen)
    assert len(estimates) == 3
    for est, n in zip(estimates, (1, 2, 4)):
        assert_matches(est, golden[f"ntk_gen_{n}"])


@pytest.mark.parametrize("store_on_device", [True, False])
@pytest.mark.parametrize("implementation", [1, 2, 3])
def test_batched(golden, store_on_device, implementation):
    init_fn, apply_fn = _model()
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, golden["key"], 4, batch_size=2,
                                            store_on_device=store_on_device,
                                            implementation=implementation)
    k = kernel_fn(golden["x1"], golden["x2"], ("nngp", "ntk"))
    assert_matches(k.nngp, golden["nngp_batched2"])
    assert_matches(k.ntk, golden["ntk_batched2"])
    assert isinstance(k.ntk, np.ndarray) == (not store_on_device)


# --- CNN and fully-convolutional goldens (nt065_cnn.npz) -------------------------------

CNN_GOLDEN = os.path.join(os.path.dirname(__file__), "data", "nt065_cnn.npz")


@pytest.fixture
def golden_cnn(golden):
    """The CNN goldens, with the PRNG setting that the ``golden`` fixture applies."""
    del golden
    return dict(np.load(CNN_GOLDEN))


def _conv(channels):
    return stax.Conv(channels, (3, 3), padding="SAME")


@pytest.mark.parametrize("implementation", [0, 1, 2, 3])
@pytest.mark.parametrize("vmap_axes", [0, None])
def test_cnn(golden_cnn, implementation, vmap_axes):
    init_fn, apply_fn = stax_serial(_conv(8), stax.Relu, _conv(8), stax.Relu, stax.Flatten,
                                    stax.Dense(3))
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jnp.asarray(golden_cnn["key"]),
                                            3, vmap_axes=vmap_axes,
                                            implementation=implementation)
    k = kernel_fn(golden_cnn["x1"], golden_cnn["x2"], ("nngp", "ntk"))
    suffix = "vmap0" if vmap_axes == 0 else "vmapnone"
    for impl in (1, 2, 3):  # nt's three implementations agree; ours must match each
        assert_matches(k.nngp, golden_cnn[f"nngp_impl{impl}_{suffix}"])
        assert_matches(k.ntk, golden_cnn[f"ntk_impl{impl}_{suffix}"])


@pytest.mark.parametrize("implementation", [1, 3])
def test_fully_convolutional_diagonal(golden_cnn, implementation):
    init_fn, apply_fn = stax_serial(_conv(4), stax.Relu, _conv(3))
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jnp.asarray(golden_cnn["key"]),
                                            3, trace_axes=(-1,), diagonal_axes=(1,),
                                            implementation=implementation)
    k = kernel_fn(golden_cnn["x1"], golden_cnn["x2"], ("nngp", "ntk"))
    for impl in (1, 3):
        assert_matches(k.nngp, golden_cnn[f"nngp_fcn_impl{impl}"])
        assert_matches(k.ntk, golden_cnn[f"ntk_fcn_impl{impl}"])
