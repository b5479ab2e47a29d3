"""Parameter draws with the threefry hash unrolled (mcntk._draws) are bit for bit
JAX's: the hash against JAX's primitive, whole inits of every framework and of
distributions whose constants XLA could fold (gamma, t, beta; a jitted helper given a
constant) against the init itself (both ``jax_threefry_partitionable`` settings, legacy
and typed keys, other key types, weak types), and the estimator's CPU programs use it
and give the same estimate."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from jax.extend.random import threefry_2x32
from mcntk_reference import stax_serial

import mcntk
from mcntk import _draws


@contextlib.contextmanager
def partitionable(value):
    old = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", value)
    try:
        yield
    finally:
        jax.config.update("jax_threefry_partitionable", old)


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert leaves_a
    for u, v in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(u) == jax.random.key_impl(v)
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u.view(np.uint8), v.view(np.uint8))


def test_hash_is_jaxs():
    words = jax.random.randint(jax.random.PRNGKey(0), (4, 1000), 0, 2**31 - 1).astype(
        jnp.uint32) * jnp.uint32(3)  # spans all 32 bits
    for k0, k1 in [(0, 0), (0x12345678, 0xFFFFFFFF), (7, 42)]:
        key = jnp.array([k0, k1], jnp.uint32)
        expected = threefry_2x32(key, words.ravel())
        half = words.size // 2
        mine = _draws.threefry2x32(key[0], key[1], words.ravel()[:half], words.ravel()[half:])
        np.testing.assert_array_equal(np.concatenate([np.asarray(m) for m in mine]),
                                      np.asarray(expected))


def _inits():
    """``name -> init(key) -> params`` of models as people write them."""
    import equinox as eqx
    import flax.linen as nn
    import haiku as hk
    from flax import nnx

    x = jnp.ones((2, 8))
    init_fn, _ = stax.serial(stax.Dense(64), stax.Relu, stax.Dense(3))

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(32, kernel_init=nn.initializers.truncated_normal(0.5))(x)
            x = nn.LayerNorm()(nn.relu(x))
            return nn.Dense(2, kernel_init=nn.initializers.orthogonal())(x)

    hk_model = hk.transform(lambda x: hk.nets.MLP([16, 4])(x))

    def nnx_init(key):
        model = nnx.Linear(8, 5, rngs=nnx.Rngs(params=key))
        return nnx.state(model, nnx.Param)

    @jax.jit
    def truncated(key, lower, shape=(64, 32)):  # a user's jitted helper, given a constant
        return jax.random.truncated_normal(key, lower, -lower, shape)

    def distributions(k):
        k1, k2, k3 = jax.random.split(k, 3)
        return (truncated(k1, -1.7), jax.random.gamma(k2, 0.5, (8,)),
                jax.random.t(k3, 3.0, (3, 2)), jax.random.beta(k1, 2.0, 3.0, (8,)),
                jax.random.loggamma(k2, 2.5, (4,)), jax.random.dirichlet(k3, jnp.ones(3)))

    return {
        "distributions": distributions,
        "stax": lambda k: init_fn(k, x.shape)[1],
        "linen": lambda k: Linen().init(k, x),
        "haiku": lambda k: hk_model.init(k, x),
        "equinox": lambda k: eqx.filter(eqx.nn.MLP(8, 2, 16, 2, key=k), eqx.is_array),
        "nnx": nnx_init,
        "bits": lambda k: (jax.random.bits(k, (5, 3), jnp.uint8),
                           jax.random.bits(k, (7,), jnp.uint16),
                           jax.random.split(k, 3), jax.random.fold_in(k, 3),
                           jax.random.uniform(k, (2, 3)),
                           *([jax.random.bits(k, (3,), jnp.uint64)]
                             if jax.config.jax_enable_x64 else [])),
    }


@pytest.mark.parametrize("name", ["stax", "linen", "haiku", "equinox", "nnx", "bits",
                                  "distributions"])
@pytest.mark.parametrize("split_mode", [False, True])
@pytest.mark.parametrize("typed", [False, True])
def test_inits_draw_the_same_bits(name, split_mode, typed, monkeypatch):
    init = _inits()[name]
    calls = []
    hash_ = _draws.threefry2x32
    monkeypatch.setattr(_draws, "threefry2x32", lambda *a: calls.append(1) or hash_(*a))
    with partitionable(split_mode):
        key = jax.random.key(5) if typed else jax.random.PRNGKey(5)
        expected = jax.jit(init)(key)
        got = jax.jit(_draws.unrolled(init))(key)
        assert_bitwise_equal(got, expected)
        assert calls, "the unrolled hash was not used"
        # batched over keys, as when samples are vmapped
        keys = jax.random.split(key, 3)
        assert_bitwise_equal(jax.jit(jax.vmap(_draws.unrolled(init)))(keys),
                             jax.jit(jax.vmap(init))(keys))


def test_weak_types_of_arguments_are_kept():
    """An argument's weak type decides the dtype of what it multiplies (here bfloat16
    draws stay bfloat16)."""
    def init(key, scale):
        return jax.random.normal(key, (3,), jnp.bfloat16) * scale

    key, scale = jax.random.PRNGKey(0), jnp.asarray(0.5)
    expected = jax.jit(init)(key, scale)
    assert expected.dtype == jnp.bfloat16
    assert_bitwise_equal(jax.jit(_draws.unrolled(init))(key, scale), expected)


def test_other_key_types_are_left_to_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(_draws, "threefry2x32", lambda *a: calls.append(1))
    init = _inits()["stax"]
    key = jax.random.key(0, impl="rbg")
    assert_bitwise_equal(jax.jit(_draws.unrolled(init))(key), jax.jit(init)(key))
    assert not calls


@pytest.mark.parametrize("split_mode", [False, True])
def test_cpu_estimates_use_it_and_equal_jaxs_draws(split_mode, monkeypatch):
    init_fn, apply_fn = stax_serial(stax.Dense(32), stax.Relu, stax.Dense(2))
    x1 = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (4, 3))

    def estimate():
        kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 3,
                                         implementation=1)
        return kf(x1, x2, ("nngp", "ntk"))

    seen = []
    unrolled = _draws.unrolled
    with partitionable(split_mode):
        monkeypatch.setattr(_draws, "unrolled", lambda f: seen.append(f) or unrolled(f))
        fast = estimate()
        assert seen
        monkeypatch.setattr(_draws, "unrolled", lambda f: f)
        plain = estimate()
    assert_bitwise_equal(fast, plain)
