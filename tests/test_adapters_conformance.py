"""Conformance of every adapter: the same Dense-ReLU-Dense network in stax, Flax linen,
Flax NNX, Haiku and Equinox gives the same ``Model`` behaviour and the same kernels."""

import math

import jax
import mcntk_reference as reference
import numpy as np
import pytest
from jax.example_libraries import stax
from jax.flatten_util import ravel_pytree

import mcntk
from mcntk import adapters

D, WIDTH, OUT = 3, 32, 2  # input size, hidden width, outputs
SW, SB = 1.5, 0.3  # weight and bias standard deviations (standard parameterisation)
STD1, STD2 = SW / math.sqrt(D), SW / math.sqrt(WIDTH)

FRAMEWORKS = ["stax", "stax_jit", "linen", "nnx", "haiku", "haiku_state", "haiku_no_rng",
              "haiku_jit", "equinox", "equinox_batched"]


def normal(std):
    return jax.nn.initializers.normal(std)


# --- the network in each framework --------------------------------------------------


def stax_dense(out, w_std, b_std):
    """A stax layer (init_fn, apply_fn) with N(0, std^2) weights; no rank promotion."""
    def init_fn(key, input_shape):
        kw, kb = jax.random.split(key)
        w = w_std * jax.random.normal(kw, (input_shape[-1], out))
        return input_shape[:-1] + (out,), (w, b_std * jax.random.normal(kb, (out,)))

    def apply_fn(params, x, **kwargs):
        w, b = params
        return x @ w + b[None]

    return init_fn, apply_fn


def make_stax():
    return stax.serial(stax_dense(WIDTH, STD1, SB), stax.Relu, stax_dense(OUT, STD2, SB))


def make_linen():
    nn = pytest.importorskip("flax.linen")

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(WIDTH, kernel_init=normal(STD1), bias_init=normal(SB))(x)
            return nn.Dense(OUT, kernel_init=normal(STD2), bias_init=normal(SB))(nn.relu(h))

    return Mlp()


def make_nnx_factory():
    nnx = pytest.importorskip("flax.nnx")

    class Mlp(nnx.Module):
        def __init__(self, *, rngs):
            self.l1 = nnx.Linear(D, WIDTH, kernel_init=normal(STD1), bias_init=normal(SB),
                                 rngs=rngs)
            self.l2 = nnx.Linear(WIDTH, OUT, kernel_init=normal(STD2), bias_init=normal(SB),
                                 rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    return Mlp


def haiku_fn(x):
    hk = pytest.importorskip("haiku")
    rn = hk.initializers.RandomNormal
    h = hk.Linear(WIDTH, w_init=rn(STD1), b_init=rn(SB))(x)
    return hk.Linear(OUT, w_init=rn(STD2), b_init=rn(SB))(jax.nn.relu(h))


def make_equinox_factory():
    eqx = pytest.importorskip("equinox")

    def linear(key, n_in, n_out, w_std):
        k0, kw, kb = jax.random.split(key, 3)
        layer = eqx.nn.Linear(n_in, n_out, key=k0)
        w = w_std * jax.random.normal(kw, (n_out, n_in))
        return eqx.tree_at(lambda m: (m.weight, m.bias), layer,
                           (w, SB * jax.random.normal(kb, (n_out,))))

    class Batched(eqx.Module):
        inner: eqx.Module

        def __call__(self, x):
            return jax.vmap(self.inner)(x)

    class Mlp(eqx.Module):
        l1: eqx.nn.Linear
        l2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.l1 = linear(k1, D, WIDTH, STD1)
            self.l2 = linear(k2, WIDTH, OUT, STD2)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    return Mlp, Batched


def make_model(framework: str) -> adapters.Model:
    if framework == "stax":
        return adapters.as_model(make_stax())
    if framework == "stax_jit":
        init_fn, apply_fn = make_stax()
        return adapters.as_model((init_fn, jax.jit(apply_fn)))
    if framework == "linen":
        return adapters.as_model(make_linen())
    if framework == "nnx":
        return adapters.nnx_model(make_nnx_factory())
    if framework.startswith("haiku"):
        hk = pytest.importorskip("haiku")
        if framework == "haiku_state":
            return adapters.as_model(hk.transform_with_state(haiku_fn))
        if framework == "haiku_no_rng":
            return adapters.as_model(hk.without_apply_rng(hk.transform(haiku_fn)))
        f = hk.transform(haiku_fn)
        if framework == "haiku_jit":
            f = hk.Transformed(f.init, jax.jit(f.apply))
        return adapters.as_model(f)
    if framework == "equinox":
        return adapters.equinox_model(make_equinox_factory()[0])
    if framework == "equinox_batched":
        mlp, batched = make_equinox_factory()
        return adapters.equinox_model(lambda key: batched(mlp(key)), batched=True)
    raise AssertionError(framework)


# --- canonical parameters and their image in each framework ---------------------------


def canonical_params(key):
    """``{w1 (D, WIDTH), b1, w2 (WIDTH, OUT), b2}`` drawn like the models draw them."""
    k = jax.random.split(key, 4)
    return {"w1": STD1 * jax.random.normal(k[0], (D, WIDTH)),
            "b1": SB * jax.random.normal(k[1], (WIDTH,)),
            "w2": STD2 * jax.random.normal(k[2], (WIDTH, OUT)),
            "b2": SB * jax.random.normal(k[3], (OUT,))}


def to_framework(framework, c, like):
    """The canonical parameters ``c`` in the layout of ``like`` (a params of that model)."""
    if framework.startswith("stax"):
        return [(c["w1"], c["b1"]), (), (c["w2"], c["b2"])]
    if framework == "linen":
        return {"params": {"Dense_0": {"kernel": c["w1"], "bias": c["b1"]},
                           "Dense_1": {"kernel": c["w2"], "bias": c["b2"]}}}
    if framework == "nnx":
        return {"params": {"l1": {"kernel": c["w1"], "bias": c["b1"]},
                           "l2": {"kernel": c["w2"], "bias": c["b2"]}}}
    if framework.startswith("haiku"):
        p = {"linear": {"w": c["w1"], "b": c["b1"]}, "linear_1": {"w": c["w2"], "b": c["b2"]}}
        return {"params": p, "state": {}} if framework == "haiku_state" else p
    if framework.startswith("equinox"):
        eqx = pytest.importorskip("equinox")
        if framework == "equinox_batched":  # the module wrapped in Batched
            return eqx.tree_at(lambda m: m.inner, like, to_framework("equinox", c, like.inner))
        return eqx.tree_at(lambda m: (m.l1.weight, m.l1.bias, m.l2.weight, m.l2.bias), like,
                           (c["w1"].T, c["b1"], c["w2"].T, c["b2"]))
    raise AssertionError(framework)


@pytest.fixture(scope="module")
def inputs():
    k1, k2 = jax.random.split(jax.random.PRNGKey(11))
    return jax.random.normal(k1, (6, D)), jax.random.normal(k2, (4, D))


# --- the adapters.Model contract -------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_model_contract(framework, inputs):
    x1, _ = inputs
    model = make_model(framework)
    assert isinstance(model, adapters.Model) and adapters.as_model(model) is model
    key = jax.random.PRNGKey(0)
    output_shape, params = model.init(key, x1.shape)
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(p, jax.Array) for p in leaves)
    out = model.apply(params, x1)
    assert output_shape == out.shape == (6, OUT)
    # pure: same arguments, same result, eager or jitted, with or without rng
    np.testing.assert_array_equal(model.apply(params, x1), out)
    np.testing.assert_allclose(jax.jit(model.apply)(params, x1, rng=key), out, rtol=1e-6)
    # init is a function of its key (jittable, vmappable over keys)
    jitted = jax.jit(model.init, static_argnums=1)(key, x1.shape)[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jitted, params)
    keys = jax.random.split(key, 3)
    batch = jax.vmap(lambda k: model.init(k, x1.shape)[1])(keys)
    first = model.init(keys[0], x1.shape)[1]
    jax.tree.map(lambda b, p: np.testing.assert_allclose(b[0], p, rtol=1e-6), batch, first)
    other = model.init(jax.random.PRNGKey(1), x1.shape)[1]
    assert not np.allclose(ravel_pytree(other)[0], ravel_pytree(params)[0])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_mapped_parameters_give_the_same_kernels(framework, inputs):
    """Same weights in every framework: the empirical NNGP and NTK agree to 1e-5."""
    x1, x2 = inputs
    model = make_model(framework)
    like = model.init(jax.random.PRNGKey(0), x1.shape)[1]
    canon = canonical_params(jax.random.PRNGKey(5))
    params = to_framework(framework, canon, like)
    assert jax.tree.structure(params) == jax.tree.structure(like)
    ref = reference.kernels(make_model("stax").apply, to_framework("stax", canon, None), x1,
                            x2, trace_axes=())
    got = reference.kernels(model.apply, params, x1, x2, trace_axes=())
    k = mcntk.empirical_kernel_fn(model.apply, trace_axes=())(x1, x2, ("nngp", "ntk"), params)
    for name in ["nngp", "ntk"]:
        scale = np.abs(ref[name]).max()
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(getattr(k, name), ref[name], rtol=1e-5, atol=1e-5 * scale)


def per_sample_kernels(model, key, x1, x2, n):
    """``n`` one-sample NNGPs and NTKs from the estimator's generator, ``(n, n1, n2)`` each."""
    kernel_fn = mcntk.monte_carlo_kernel_fn(*model, key, range(1, n + 1))
    means = [np.stack([k.nngp, k.ntk]) for k in kernel_fn(x1, x2, ("nngp", "ntk"))]
    counts = np.arange(1, n + 1)[:, None, None, None]
    sums = np.stack(means) * counts
    return np.diff(sums, axis=0, prepend=0.0)


def z_scores(a, b):
    """|difference of the means| over its standard error, per kernel entry."""
    n = len(a)
    se = np.sqrt(a.var(0, ddof=1) / n + b.var(0, ddof=1) / n)
    return np.abs(a.mean(0) - b.mean(0)) / (se + 1e-6 * np.abs(b.mean(0)).max())


def test_kernels_agree_in_distribution_across_frameworks(inputs):
    """Monte Carlo NNGP/NTK of each framework match stax's within 5 standard errors."""
    x1, x2 = inputs
    n = 64
    ref = per_sample_kernels(make_model("stax"), jax.random.PRNGKey(0), x1, x2, n)
    for i, framework in enumerate(["linen", "nnx", "haiku", "equinox"]):
        got = per_sample_kernels(make_model(framework), jax.random.PRNGKey(100 + i), x1, x2, n)
        assert z_scores(got, ref).max() < 5, framework
    # the check has power: a different architecture (first-layer std doubled) is rejected
    scaled = adapters.as_model(stax.serial(stax_dense(WIDTH, 2 * STD1, SB), stax.Relu,
                                  stax_dense(OUT, STD2, SB)))
    other = per_sample_kernels(scaled, jax.random.PRNGKey(7), x1, x2, n)
    assert z_scores(other, ref).max() > 5


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_vmap_axes_gives_the_same_estimate(framework, inputs):
    """The estimator's per-example path (vmap_axes=0) calls apply on one example at a time."""
    x1, x2 = inputs
    model = make_model(framework)
    key = jax.random.PRNGKey(2)
    whole = mcntk.monte_carlo_kernel_fn(*model, key, 2)(x1, x2)
    per_example = mcntk.monte_carlo_kernel_fn(*model, key, 2, vmap_axes=0)(x1, x2)
    for a, b in zip(whole, per_example):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
