"""Dropout in every framework is driven by the estimator's key, so the x1/x2 dropout-key
rule of the estimator (f(x2) uses the same key when x2 is None or equals x1, else
``fold_in(key, 1)``) carries over to linen, NNX, Haiku and Equinox random streams."""

import jax
import jax.numpy as jnp
import mcntk_reference as reference
import numpy as np
import pytest
from jax.example_libraries import stax

import mcntk
from mcntk import adapters

D, WIDTH, OUT, RATE = 3, 16, 2, 0.5
FRAMEWORKS = ["stax", "linen", "nnx", "haiku", "equinox"]


def stax_dense(out):
    def init_fn(key, input_shape):
        w = jax.random.normal(key, (input_shape[-1], out)) / jnp.sqrt(input_shape[-1])
        return input_shape[:-1] + (out,), w

    return init_fn, lambda w, x, **kwargs: x @ w


def make_model(framework):
    if framework == "stax":
        return adapters.as_model(stax.serial(stax_dense(WIDTH), stax.Relu, stax.Dropout(RATE),
                                    stax_dense(OUT)))
    if framework == "linen":
        nn = pytest.importorskip("flax.linen")

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, deterministic=False):
                h = nn.Dropout(RATE, deterministic=deterministic)(nn.relu(nn.Dense(WIDTH)(x)))
                return nn.Dense(OUT)(h)

        return adapters.as_model(Net())
    if framework == "nnx":
        nnx = pytest.importorskip("flax.nnx")

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.l1 = nnx.Linear(D, WIDTH, rngs=rngs)
                self.drop = nnx.Dropout(RATE, rngs=rngs)
                self.l2 = nnx.Linear(WIDTH, OUT, rngs=rngs)

            def __call__(self, x):
                return self.l2(self.drop(jax.nn.relu(self.l1(x))))

        return adapters.nnx_model(Net)
    if framework == "haiku":
        hk = pytest.importorskip("haiku")

        def f(x):
            h = hk.dropout(hk.next_rng_key(), RATE, jax.nn.relu(hk.Linear(WIDTH)(x)))
            return hk.Linear(OUT)(h)

        return adapters.as_model(hk.transform(f))
    if framework == "equinox":
        eqx = pytest.importorskip("equinox")

        class Net(eqx.Module):
            l1: eqx.nn.Linear
            drop: eqx.nn.Dropout
            l2: eqx.nn.Linear

            def __init__(self, key):
                k1, k2 = jax.random.split(key)
                self.l1 = eqx.nn.Linear(D, WIDTH, key=k1)
                self.drop = eqx.nn.Dropout(RATE)
                self.l2 = eqx.nn.Linear(WIDTH, OUT, key=k2)

            def __call__(self, x, *, key=None):
                return self.l2(self.drop(jax.nn.relu(self.l1(x)), key=key))

        return adapters.equinox_model(Net)
    raise AssertionError(framework)


@pytest.fixture(scope="module")
def inputs():
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    return jax.random.normal(k1, (5, D)), jax.random.normal(k2, (3, D))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_dropout_mask_is_driven_by_rng(framework, inputs):
    x, _ = inputs
    model = make_model(framework)
    params = model.init(jax.random.PRNGKey(0), x.shape)[1]
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    out = model.apply(params, x, rng=k1)
    np.testing.assert_array_equal(model.apply(params, x, rng=k1), out)
    np.testing.assert_allclose(jax.jit(model.apply)(params, x, rng=k1), out, rtol=1e-6)
    assert not np.allclose(model.apply(params, x, rng=k2), out)
    typed = model.apply(params, x, rng=jax.random.wrap_key_data(k1))
    np.testing.assert_allclose(typed, out, rtol=1e-6)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_x2_none_is_x2_equal_to_x1(framework, inputs):
    """Both take the estimator's symmetric path (f(x1) serves both sides), so each is
    checked against the key schedule written out, which computes f(x2) on its own with
    x1's dropout key."""
    x, _ = inputs
    model = make_model(framework)
    key = jax.random.PRNGKey(0)
    kernel_fn = mcntk.monte_carlo_kernel_fn(*model, key, 4)
    expected = reference.monte_carlo(*model, key, 4, x, None)
    for x2 in (None, x + 0.0):
        got = kernel_fn(x, x2, ("nngp", "ntk"))
        for name in ["nngp", "ntk"]:
            a = np.asarray(getattr(got, name))
            np.testing.assert_allclose(a, expected[name], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a, a.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_x2_gets_the_folded_key(framework, inputs):
    """The estimator matches the key schedule written out: f(x1) uses each sample's
    dropout key, f(x2) uses fold_in(dropout key, 1)."""
    x1, x2 = inputs
    model = make_model(framework)
    key = jax.random.PRNGKey(9)
    expected = reference.monte_carlo(*model, key, 2, x1, x2)
    estimate = mcntk.monte_carlo_kernel_fn(*model, key, 2)(x1, x2, ("nngp", "ntk"))
    for name in ["nngp", "ntk"]:
        np.testing.assert_allclose(getattr(estimate, name), expected[name], rtol=1e-5,
                                   atol=1e-6)


def test_linen_several_streams_and_no_rng(inputs):
    nn = pytest.importorskip("flax.linen")

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(WIDTH)(x)
            noise = jax.random.normal(self.make_rng("noise"), h.shape)
            return nn.Dropout(RATE, deterministic=False)(h + noise)

    x, _ = inputs
    model = adapters.as_model(Noisy(), rng_streams=("dropout", "noise"))
    params = model.init(jax.random.PRNGKey(0), x.shape)[1]
    key = jax.random.PRNGKey(1)
    out = model.apply(params, x, rng=key)
    np.testing.assert_array_equal(model.apply(params, x, rng=key), out)
    keys = jax.random.split(key)
    expected = Noisy().apply(params, x, rngs={"dropout": keys[0], "noise": keys[1]})
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(Exception, match="noise|dropout"):  # flax needs the streams
        model.apply(params, x)


def test_linen_deterministic_kwarg_passes_through(inputs):
    x, _ = inputs
    model = make_model("linen")
    params = model.init(jax.random.PRNGKey(0), x.shape)[1]
    a = model.apply(params, x, rng=jax.random.PRNGKey(1), deterministic=True)
    b = model.apply(params, x, deterministic=True)
    np.testing.assert_array_equal(a, b)


def test_nnx_every_stream_is_rekeyed(inputs):
    """Streams beyond rng_streams (here the Rngs kept by the module) also follow rng."""
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.rngs = rngs
            self.lin = nnx.Linear(D, WIDTH, rngs=rngs)

        def __call__(self, x):
            h = self.lin(x)
            return h + jax.random.normal(self.rngs.noise(), h.shape)

    x, _ = inputs
    model = adapters.nnx_model(Net, rng_streams=("noise",))
    params = model.init(jax.random.PRNGKey(0), x.shape)[1]
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    out = model.apply(params, x, rng=k1)
    np.testing.assert_array_equal(model.apply(params, x, rng=k1), out)
    assert not np.allclose(model.apply(params, x, rng=k2), out)
    np.testing.assert_array_equal(model.apply(params, x), model.apply(params, x))


def test_equinox_gets_one_key_per_example():
    model = make_model("equinox")
    x = jnp.ones((4, D))
    params = model.init(jax.random.PRNGKey(0), x.shape)[1]
    out = model.apply(params, x, rng=jax.random.PRNGKey(1))
    assert not np.allclose(out[0], out[1])  # identical examples, independent masks


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_x2_none_blocks_follow_the_key_rule(framework, monkeypatch):
    """With x2=None cut into blocks, block (j, i) sees other dropout masks than block
    (i, j) (f(x1) gets the sample's key, f(x2) the folded one), so it is computed, not
    mirrored: each block against the key schedule written out for that block."""
    from mcntk import _grid

    mirrors = []
    pairs = _grid.GridPlan.pairs
    monkeypatch.setattr(_grid.GridPlan, "pairs",
                        lambda self: mirrors.append(self.mirror) or pairs(self))
    model = make_model(framework)
    x = jax.random.normal(jax.random.PRNGKey(4), (4, D))
    key = jax.random.PRNGKey(3)
    got = mcntk.monte_carlo_kernel_fn(*model, key, 2, batch_size=2)(x, None, "ntk")
    assert mirrors and not any(mirrors)
    xs = [x[:2], x[2:]]
    expected = np.block([[reference.monte_carlo(*model, key, 2, xs[i], None if i == j else
                                                xs[j])["ntk"] for j in range(2)]
                         for i in range(2)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected[2:, :2], expected[:2, 2:].T, rtol=1e-3)  # not mirrored


@pytest.mark.parametrize("deterministic", [True, False])
def test_x2_none_blocks_mirror_when_the_rng_is_not_read(deterministic, monkeypatch):
    """A model that takes an rng but draws nothing with it (dropout switched off by a
    Python flag) gets only the blocks i <= j of x2=None computed, the others mirrored."""
    from mcntk import _grid

    mirrors = []
    pairs = _grid.GridPlan.pairs
    monkeypatch.setattr(_grid.GridPlan, "pairs",
                        lambda self: mirrors.append(self.mirror) or pairs(self))
    model = make_model("linen")
    x = jax.random.normal(jax.random.PRNGKey(4), (6, D))
    key = jax.random.PRNGKey(3)
    kf = mcntk.monte_carlo_kernel_fn(*model, key, 2, batch_size=2)
    got = kf(x, None, ("nngp", "ntk"), deterministic=deterministic)
    assert mirrors and all(m == deterministic for m in mirrors)
    whole = mcntk.monte_carlo_kernel_fn(*model, key, 2)(x, None, ("nngp", "ntk"),
                                                       deterministic=deterministic)
    if deterministic:  # the same kernel as one block; with dropout, blocks see other masks
        for name in ["nngp", "ntk"]:
            np.testing.assert_allclose(getattr(got, name), getattr(whole, name), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("framework", ["linen", "haiku", "equinox"])
def test_an_empirical_kernel_without_rng_names_rng(framework, inputs):
    """A model with dropout given no key says so in mcntk's terms (the framework's own
    error is chained), and the same call with ``rng=`` works."""
    x, _ = inputs
    model = make_model(framework)
    params = model.init(jax.random.PRNGKey(0), x.shape)[1]
    kernel_fn = mcntk.empirical_kernel_fn(model.apply)
    with pytest.raises(ValueError, match=r"called with `rng`=None.*rng=key") as info:
        kernel_fn(x, None, "ntk", params)
    assert info.value.__cause__ is not None
    assert kernel_fn(x, None, "ntk", params, rng=jax.random.PRNGKey(1)).shape == (5, 5)


def test_an_equinox_module_without_a_key_argument_says_so(inputs):
    eqx = pytest.importorskip("equinox")
    x, _ = inputs
    model = adapters.equinox_model(
        lambda key: eqx.nn.Sequential([eqx.nn.Linear(D, WIDTH, key=key), eqx.nn.Dropout(RATE)]))
    params = model.init(jax.random.PRNGKey(0), x.shape)[1]
    model.apply(params, x, rng=jax.random.PRNGKey(1))  # Sequential passes key on

    class NoKey(eqx.Module):
        inner: eqx.nn.Sequential

        def __call__(self, x):
            return self.inner(x)

    model = adapters.equinox_model(lambda key: NoKey(eqx.nn.Sequential(
        [eqx.nn.Linear(D, WIDTH, key=key), eqx.nn.Dropout(RATE)])))
    with pytest.raises(ValueError, match="takes no `key` argument"):
        model.init(jax.random.PRNGKey(0), x.shape)  # init calls it with a key for shapes


def test_a_linen_stream_outside_rng_streams_names_rng_streams(inputs):
    nn = pytest.importorskip("flax.linen")
    x, _ = inputs

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(WIDTH)(x)
            return nn.Dense(OUT)(h + jax.random.normal(self.make_rng("noise"), h.shape))

    model = adapters.as_model(Noisy())
    params = model.init(jax.random.PRNGKey(0), x.shape)[1]
    for rng in (None, jax.random.PRNGKey(1)):
        with pytest.raises(ValueError, match=r"rng stream 'noise'.*"
                                             r"rng_streams=\('dropout', 'noise'\)"):
            model.apply(params, x, rng=rng)
    fixed = adapters.as_model(Noisy(), rng_streams=("dropout", "noise"))
    assert fixed.apply(params, x, rng=jax.random.PRNGKey(1)).shape == (5, OUT)


def test_haiku_without_apply_rng_that_draws_says_so(inputs):
    hk = pytest.importorskip("haiku")
    x, _ = inputs

    def f(x):
        return hk.dropout(hk.next_rng_key(), RATE, hk.Linear(OUT)(x))

    with pytest.raises(ValueError, match="hk.without_apply_rng"):
        adapters.as_model(hk.without_apply_rng(hk.transform(f))).init(jax.random.PRNGKey(0),
                                                                       x.shape)
