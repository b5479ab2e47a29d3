"""Configurations found by review: each once gave a wrong answer or a crash."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import kernels, stax_serial

import mcntk


def _x(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape)


def test_low_precision_sums_are_kept_in_float32():
    def init_fn(key, shape):
        return shape, {"w": jnp.ones((3, 4), jnp.bfloat16)}

    def apply_fn(params, x):
        return x.astype(jnp.bfloat16) @ params["w"]

    k = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 600)(
        jnp.ones((2, 3)), None, "nngp")
    assert k.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(k, np.float32), 9.0)


@pytest.mark.parametrize("implementation", [1, 2])
def test_pytree_vmap_axes_with_none_leaves(implementation):
    def init_fn(key, shape):
        return None, {"w": jax.random.normal(key, (3, 2)), "v": jax.random.normal(key, (3, 2))}

    def apply_fn(params, x, scale=None, offset=None):
        out = jnp.tanh(x["a"] @ params["w"] + (x["b"] @ params["v"])[None, :])
        return out * scale[:, None] if scale is not None else out

    x = {"a": _x(1, (5, 3)), "b": _x(2, (3,))}
    scale = _x(3, (5,))
    params = init_fn(jax.random.PRNGKey(0), None)[1]
    ref = kernels(lambda p, xx: apply_fn(p, xx, scale=scale), params, x, None)["ntk"]
    got = mcntk.empirical_ntk_fn(apply_fn, vmap_axes=({"a": 0, "b": None}, 0, {"scale": 0}),
                                 implementation=implementation)(
        x, None, params, offset=None, scale=scale)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_vmap_axes_pytree_for_inputs_and_outputs():
    """A pytree that is not a 3-tuple is the axes of both inputs and outputs."""
    def apply_fn(params, x):
        return {"a": jnp.tanh(x["a"] @ params), "b": x["b"] @ params}

    x = {"a": _x(1, (4, 3)), "b": _x(2, (4, 3))}
    params = _x(3, (3, 2))
    got = mcntk.empirical_ntk_fn(apply_fn, vmap_axes={"a": 0, "b": 0})(x, None, params)
    ref = kernels(apply_fn, params, x, None)["ntk"]
    for name in ("a", "b"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-5)


def test_complex_params_are_rejected():
    def apply_fn(params, x):
        return jnp.abs(x @ params["w"]) ** 2

    params = {"w": jnp.ones((3, 2), jnp.complex64)}
    with pytest.raises(TypeError, match=r"`params` has complex leaves \(complex64\)"):
        mcntk.empirical_ntk_fn(apply_fn)(jnp.ones((2, 3)), None, params)


@pytest.mark.parametrize("x2", [None, "other"])
def test_batch_size_with_examples_on_output_axis_1(x2):
    """The examples' output axis is found (not guessed from sizes): an output (4, N) is
    cut along axis 1, and its kernel assembled along the kernel's example axes."""
    def init_fn(key, shape):
        return None, {"w": jax.random.normal(key, (3, 4))}

    def apply_fn(params, x):
        return jnp.tanh(x @ params["w"]).T  # (4, N): examples on axis 1

    kf = lambda b: mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2,
                                               batch_size=b, trace_axes=())
    x1 = _x(1, (5, 3))
    x2 = None if x2 is None else _x(2, (4, 3))
    params = init_fn(jax.random.PRNGKey(0), None)[1]
    whole = kf(0)(x1, x2, "ntk")
    assert whole.shape == (4, 4, 5, 5 if x2 is None else 4)
    np.testing.assert_allclose(kf(2)(x1, x2, "ntk"), whole, rtol=1e-5, atol=1e-6)
    del params


def test_batch_axis_is_not_guessed_from_sizes():
    """An output (C, N) with C == N: the examples are on axis 1, not axis 0."""
    def init_fn(key, shape):
        return None, {"w": jax.random.normal(key, (3, 4))}

    def apply_fn(params, x):
        return jnp.tanh(x @ params["w"]).T  # (4, N)

    x = _x(1, (4, 3))  # N == C == 4
    kf = lambda b: mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2,
                                               batch_size=b, trace_axes=())
    whole = kf(0)(x, None, "ntk")
    assert whole.shape == (4, 4, 4, 4)
    np.testing.assert_allclose(kf(2)(x, None, "ntk"), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kf(3)(x, None, "ntk"), whole, rtol=1e-5, atol=1e-6)


def _block_reference(init_fn, apply_fn, key, n, x1, x2, b):
    """neural-tangents' batched rule: each block pair is one kernel call, and x2's
    dropout key is x1's only when the two blocks are equal."""
    total = None
    x2 = x1 if x2 is None else x2
    for _ in range(n):
        key, split = jax.random.split(key)
        init_key, dropout_key = jax.random.split(split)
        params = init_fn(init_key, x1.shape)[1]
        rows = []
        for i in range(0, x1.shape[0], b):
            row = []
            for j in range(0, x2.shape[0], b):
                a, c = x1[i:i + b], x2[j:j + b]
                same = a.shape == c.shape and bool(jnp.all(a == c))
                k2 = dropout_key if same else jax.random.fold_in(dropout_key, 1)
                row.append(kernels(apply_fn, params, a, c, kw1={"rng": dropout_key},
                                   kw2={"rng": k2})["ntk"])
            rows.append(np.concatenate(row, axis=1))
        k = np.concatenate(rows, axis=0)
        total = k if total is None else total + k
    return total / n


@pytest.mark.parametrize("x2_kind", ["none", "other"])
def test_dropout_with_batching_follows_the_block_key_rule(x2_kind):
    init_fn, apply_fn = stax_serial(stax.Dense(8), stax.Relu, stax.Dropout(0.6, mode="train"),
                                    stax.Dense(2))
    x1 = _x(1, (4, 3))
    x2 = None if x2_kind == "none" else _x(2, (6, 3))
    key = jax.random.PRNGKey(3)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, batch_size=2)(x1, x2, "ntk")
    expected = _block_reference(init_fn, apply_fn, key, 2, x1, x2, 2)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_model_positionally_with_keyword_n_samples():
    model = stax_serial(stax.Dense(4), stax.Relu, stax.Dense(1))
    key = jax.random.PRNGKey(0)
    x = _x(1, (3, 2))
    a = mcntk.monte_carlo_kernel_fn(model, key, n_samples=2)(x, None, "ntk")
    b = mcntk.monte_carlo_kernel_fn(*model, key, 2)(x, None, "ntk")
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_mixed_diagonal_leaves_without_batching():
    def init_fn(key, shape):
        return None, {"w": jax.random.normal(key, (3, 8))}

    def apply_fn(params, x):
        h = jnp.tanh(x @ params["w"])
        return {"a": h[:, :4], "b": h.reshape(-1, 4, 2)}

    x = _x(1, (5, 3))
    k = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                    diagonal_axes=(-2,))(x, None, "ntk")
    assert k["a"].shape == (5,) and k["b"].shape == (5, 5, 4)
