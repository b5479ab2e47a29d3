"""Every bad input gets a clear error naming the argument and the value."""

import jax
import jax.numpy as jnp
import pytest
from jax.example_libraries import stax
from mcntk_reference import stax_serial

import mcntk


@pytest.fixture
def model():
    return stax_serial(stax.Dense(4), stax.Relu, stax.Dense(3))


@pytest.fixture
def x():
    return jnp.ones((3, 2))


def make(model, **kwargs):
    init_fn, apply_fn = model
    kwargs.setdefault("n_samples", 1)
    return mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), **kwargs)


@pytest.mark.parametrize("n_samples,error,match", [
    (0, ValueError, r"`n_samples` must be positive, got 0"),
    (-3, ValueError, r"`n_samples` must be positive, got -3"),
    (2.0, TypeError, r"`n_samples` .* got 2.0"),
    (True, TypeError, r"`n_samples` .* got True"),
    ([], ValueError, r"`n_samples` must name at least one .* got \[\]"),
    ([1, 0], ValueError, r"`n_samples` must be positive, got 0"),
    ([1, 2.5], TypeError, r"`n_samples` .* got 2.5"),
    ("10", TypeError, r"`n_samples` .* got '10'"),
    (None, TypeError, r"`n_samples` must be given"),
])
def test_n_samples(model, n_samples, error, match):
    with pytest.raises(error, match=match):
        make(model, n_samples=n_samples)


@pytest.mark.parametrize("get,error,match", [
    ((), ValueError, r"`get` must name at least one kernel .*'nngp', 'ntk'"),
    (("ntk", "NTK"), ValueError, r"`get` names a kernel twice.*'nngp', 'ntk'"),
    ("nngp_ntk", ValueError, r"unknown kernel name\(s\) \['nngp_ntk'\]; valid names are 'nngp', 'ntk'"),  # noqa: E501
    (("ntk", "cov1"), ValueError, r"\['cov1'\]; valid names are 'nngp', 'ntk'"),
    (3, TypeError, r"`get` must be None, a kernel name or a tuple.*got 3"),
    (("ntk", 1), TypeError, r"`get` entries must be strings.*got 1"),
])
def test_get(model, x, get, error, match):
    with pytest.raises(error, match=match):
        make(model)(x, None, get)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(trace_axes=(5,)), ValueError, r"`trace_axes`=\(5,\) has axis 5, out of range .* 2 dim"),
    (dict(diagonal_axes=(-3,)), ValueError, r"`diagonal_axes`=\(-3,\) has axis -3, out of range"),
    (dict(trace_axes=(-1,), diagonal_axes=(1,)), ValueError,
     r"output axes \[1\] are both traced .* and diagonal"),
    (dict(trace_axes=(0, -2)), ValueError, r"`trace_axes`=\(0, -2\) names the same output axis twice"),  # noqa: E501
])
def test_axes_at_call(model, x, kwargs, error, match):
    kernel_fn = make(model, **kwargs)
    with pytest.raises(error, match=match):
        kernel_fn(x, None, "ntk")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(trace_axes=(-1,), diagonal_axes=(-1,)), ValueError,
     r"axes \[-1\] are in both `trace_axes`=\(-1,\) and `diagonal_axes`=\(-1,\)"),
    (dict(trace_axes=(1, 1)), ValueError, r"`trace_axes` lists an axis twice: \(1, 1\)"),
    (dict(trace_axes="x"), TypeError, r"`trace_axes` must be an int or a sequence of ints, got 'x'"),  # noqa: E501
    (dict(diagonal_axes=(0.5,)), TypeError, r"`diagonal_axes` must contain only ints, got \(0.5,\)"),  # noqa: E501
    (dict(batch_size=-3), ValueError, r"`batch_size` must be a positive int or 0 .*got -3"),
    (dict(batch_size=2.5), TypeError, r"`batch_size` must be a non-negative int, got 2.5"),
    (dict(device_count=-2), ValueError, r"`device_count` must be -1 .* got -2"),
    (dict(device_count="all"), TypeError, r"`device_count` must be an int .* got 'all'"),
    (dict(store_on_device="yes"), TypeError, r"`store_on_device` must be a bool, got 'yes'"),
    (dict(implementation=7), ValueError, r"`implementation` must be one of AUTO=0.* got 7"),
    (dict(implementation="jc"), TypeError, r"`implementation` must be an mcntk.NtkImplementation"),
    (dict(vmap_axes="0"), TypeError, r"`vmap_axes` must be None, an int, a pytree .* got '0'"),
    (dict(vmap_axes=(0, 0, 5)), TypeError, r"kwargs_axes to be a dict .* got 5"),
])
def test_construction(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(model, **kwargs)


def test_every_implementation_is_available(model, x):
    for impl in mcntk.NtkImplementation:
        make(model, implementation=impl)(x, None, "ntk")
        mcntk.empirical_ntk_fn(model[1], implementation=int(impl))


@pytest.mark.parametrize("key,error,match", [
    (None, TypeError, r"`key` must be a PRNG key.*got None"),
    (jnp.zeros(3, jnp.uint32), ValueError, r"`key` must be a PRNG key .* got uint32\[3\]"),
    (jnp.zeros(2, jnp.float32), ValueError, r"`key` must be a PRNG key .* got float32\[2\]"),
])
def test_key(model, key, error, match):
    init_fn, apply_fn = model
    with pytest.raises(error, match=match):
        mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 1)


def test_mismatched_diagonal_batch(model, x):
    with pytest.raises(ValueError, match=r"output axis 0 is diagonal but has size 3 for x1 and 2"):
        make(model, diagonal_axes=(0,))(x, x[:2], "ntk")
    with pytest.raises(ValueError, match=r"output axis 0 is diagonal but has size 3 for x1 and 2"):
        make(model, diagonal_axes=(0,), batch_size=2)(x, x[:2], "ntk")


def test_traced_batch_axis_cannot_be_batched(model, x):
    with pytest.warns(UserWarning, match=r"`trace_axes`=\(0,\) traces output axis 0"), \
            pytest.raises(ValueError, match=r"`trace_axes`=\(0,\) traces output axis 0, the axis "
                                            r"that holds the examples.*pass `trace_axes`=\(\)"):
        make(model, trace_axes=(0,), batch_size=2)(x, None, "ntk")


def test_rng_is_supplied_by_estimator(model, x):
    with pytest.raises(ValueError, match=r"`rng` is supplied per sample from `key`"):
        make(model)(x, None, "ntk", rng=jax.random.PRNGKey(1))


def test_non_callable(model):
    with pytest.raises(TypeError, match=r"`apply_fn` must be callable"):
        mcntk.empirical_kernel_fn("f")
    with pytest.raises(TypeError, match=r"`params` must be given"):
        mcntk.empirical_kernel_fn(model[1])(jnp.ones((2, 2)), None, "ntk")


@pytest.mark.parametrize("x1,match", [
    (None, r"`x1` must be an array or a pytree of arrays, got None"),
    (1.0, r"`x1` must be an array or a pytree of arrays, got float"),
    ([[1.0, 2.0]], r"`x1` must be an array or a pytree of arrays, got list"),
])
def test_bad_inputs(model, x1, match):
    with pytest.raises(TypeError, match=match):
        make(model)(x1, None, "ntk")


def test_scalar_input_cannot_be_batched(model):
    with pytest.raises(ValueError, match=r"`x1` must have leaves with the same number of examples"):
        make(model, batch_size=2)(jnp.ones(()), None, "ntk")


def test_n_samples_integer_array(model, x):
    k = make(model, n_samples=jnp.array(2))(x, None, "ntk")
    assert k.shape == (3, 3)
