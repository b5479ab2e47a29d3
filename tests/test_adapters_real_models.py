"""Models as people write them, through the estimator: a required flag (``train``,
``is_training``, ``deterministic``, ``inference``) or mask reaches ``init`` as well as
``apply``, and integer token ids reach ``init`` as integers.

Kernels are checked against the brute-force reference (``mcntk_reference``), whose
``init_fn``/``apply_fn`` are written here with the framework's own calls
(``module.init``, ``f.apply``, ``nnx.split``, ``eqx.partition``), not with the adapters.
The reference uses neural-tangents' key schedule, as the estimator does, so both see
the same parameters and dropout keys and agree up to float rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import monte_carlo

import mcntk
from mcntk import adapters

N_SAMPLES = 2
GET = ("nngp", "ntk")


def assert_kernels_close(got, expected):
    """Float32 Jacobians against the float64 reference: relative 2e-4 of the kernel's scale."""
    for name in GET:
        want = np.asarray(expected[name])
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(np.asarray(getattr(got, name)), want, rtol=2e-4,
                                   atol=2e-5 * scale, err_msg=name)


def estimate(model, key, x1, x2, **kwargs):
    """The estimator on a framework model given as is (``apply_fn`` omitted)."""
    kernel_fn = mcntk.monte_carlo_kernel_fn(model, key=key, n_samples=N_SAMPLES)
    return kernel_fn(x1, x2, GET, **kwargs)


def reference(init_params, apply_fn):
    """``(init_fn, apply_fn)`` for ``mcntk_reference.monte_carlo`` from
    ``init_params(key) -> params`` (the reference passes shapes, which are not needed)."""
    return lambda key, _shapes: (None, init_params(key)), apply_fn


def zeros_like_spec(x):
    return jnp.zeros(jnp.shape(x), jnp.result_type(x))


def images(key, n):
    return jax.random.normal(key, (n, 6, 6, 1))


def tokens(key, n, length=5, vocab=11):
    return jax.random.randint(key, (n, length), 0, vocab, dtype=jnp.int32)


# --- Flax linen -----------------------------------------------------------------------


def linen_reference(module, x1, **call_kwargs):
    """``(init_fn, apply_fn)`` of the reference: only ``params`` is differentiated;
    the other collections (BatchNorm's running statistics, the same for every key) are
    constants closed over."""
    def init_params(key):
        return module.init({"params": key}, zeros_like_spec(x1), **call_kwargs)["params"]

    variables = module.init({"params": jax.random.PRNGKey(0)}, zeros_like_spec(x1),
                            **call_kwargs)
    fixed = {c: v for c, v in variables.items() if c != "params"}

    def apply_fn(params, x, rng=None, **kwargs):
        return module.apply({"params": params, **fixed}, x, rngs={"dropout": rng}, **kwargs)

    return reference(init_params, apply_fn)


def test_linen_cnn_with_a_required_train_flag(key):
    nn = pytest.importorskip("flax.linen")

    class Cnn(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            h = nn.Conv(4, (3, 3))(x)
            h = nn.BatchNorm(use_running_average=not train)(h)
            h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
            return nn.Dense(2)(h.mean((1, 2)))

    x1, x2 = images(jax.random.PRNGKey(1), 3), images(jax.random.PRNGKey(2), 2)
    got = estimate(Cnn(), key, x1, x2, train=False)
    expected = monte_carlo(*linen_reference(Cnn(), x1, train=False), key, N_SAMPLES,
                           x1, x2, kwargs={"train": False})
    assert_kernels_close(got, expected)
    # linen's BatchNorm starts from running variance 1, so inference mode is sound
    params = adapters.as_model(Cnn()).init(key, jax.ShapeDtypeStruct(x1.shape, x1.dtype),
                                           train=False)[1]
    np.testing.assert_array_equal(params["batch_stats"]["BatchNorm_0"]["var"], 1.0)


def test_linen_embedding_on_int32_token_ids(key):
    nn = pytest.importorskip("flax.linen")

    class Bag(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3)(nn.Embed(11, 8)(ids).mean(1))

    x1, x2 = tokens(jax.random.PRNGKey(1), 4), tokens(jax.random.PRNGKey(2), 3)
    got = estimate(Bag(), key, x1, x2)
    expected = monte_carlo(*linen_reference(Bag(), x1), key, N_SAMPLES, x1, x2)
    assert_kernels_close(got, expected)


def test_linen_required_mask_array_reaches_init(key):
    nn = pytest.importorskip("flax.linen")

    class MaskedMean(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            h = nn.relu(nn.Dense(8)(x)) * mask[..., None]
            return nn.Dense(2)(h.sum(1) / mask.sum(1, keepdims=True))

    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 2))
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], x.dtype)
    got = estimate(MaskedMean(), key, x, None, mask=mask)
    expected = monte_carlo(*linen_reference(MaskedMean(), x, mask=mask), key, N_SAMPLES, x,
                           kwargs={"mask": mask})
    assert_kernels_close(got, expected)


# --- Haiku ----------------------------------------------------------------------------


def haiku_bn_net():
    """``net(x, is_training)``: Linear, BatchNorm, ReLU, dropout in training mode, Linear."""
    hk = pytest.importorskip("haiku")

    def net(x, is_training):
        h = hk.BatchNorm(True, True, 0.9)(hk.Linear(8)(x), is_training)
        h = jax.nn.relu(h)
        if is_training:
            h = hk.dropout(hk.next_rng_key(), 0.5, h)
        return hk.Linear(2)(h)

    return hk.transform_with_state(net)


def haiku_reference(f, x1, init_kwargs, with_state=True):
    """``(init_fn, apply_fn)`` of the reference, from ``f.init`` and ``f.apply``; Haiku
    state (the same for every key) is a constant closed over."""
    def init_params(key):
        out = f.init(key, zeros_like_spec(x1), **init_kwargs)
        return out[0] if with_state else out

    if with_state:
        state = f.init(jax.random.PRNGKey(0), zeros_like_spec(x1), **init_kwargs)[1]

    def apply_fn(params, x, rng=None, **kwargs):
        if with_state:
            return f.apply(params, state, rng, x, **kwargs)[0]
        return f.apply(params, rng, x, **kwargs)

    return reference(init_params, apply_fn)


def test_haiku_net_with_a_required_is_training_flag(key):
    """Training mode is the sound way to take the kernel of a Haiku BatchNorm net: each
    batch is normalised by its own statistics (mutable=True, vmap_axes=None)."""
    f = haiku_bn_net()
    x1 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 3))
    got = estimate(adapters.as_model(f, mutable=True), key, x1, x2, is_training=True)
    expected = monte_carlo(*haiku_reference(f, x1, {"is_training": True}), key, N_SAMPLES,
                           x1, x2, kwargs={"is_training": True})
    assert_kernels_close(got, expected)


def test_haiku_batchnorm_in_inference_mode_is_diagnosed(key):
    """hk.BatchNorm has no state unless init runs in training mode: the error says to
    pass init_kwargs and warns of the zero running variance that follows."""
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    with pytest.raises(ValueError, match=r"init_kwargs=\{'is_training': True\}(.|\n)*"
                                         r"running variance is 0"):
        estimate(haiku_bn_net(), key, x, None, is_training=False)


def test_haiku_init_kwargs_win_and_the_batchnorm_advice(key):
    f = haiku_bn_net()
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    model = adapters.as_model(f, init_kwargs={"is_training": True})
    # is_training=False from the call would leave BatchNorm without state
    shape, params = model.init(key, spec, is_training=False)
    assert shape == (4, 2)
    # what the docs and the advice say: init's example input (zeros) has variance 0
    var = params["state"]["batch_norm/~/var_ema"]["average"]
    np.testing.assert_array_equal(var, 0.0)
    got = estimate(model, key, x, None, is_training=False)
    expected = monte_carlo(*haiku_reference(f, x, {"is_training": True}), key, N_SAMPLES, x,
                           kwargs={"is_training": False})
    assert_kernels_close(got, expected)
    # docs/adapters.md's remedy: an init that sets Flax's starting statistics
    def flax_start(name, s):
        if not name.endswith(("mean_ema", "var_ema")):
            return s
        fill = jnp.ones_like if name.endswith("var_ema") else jnp.zeros_like
        return {**s, "average": fill(s["average"])}

    def init(k, input_shape):
        shape, params = model.init(k, input_shape)
        state = {name: flax_start(name, s) for name, s in params["state"].items()}
        return shape, {**params, "state": state}

    remedied = mcntk.monte_carlo_kernel_fn(init, model.apply, key, N_SAMPLES)(
        x, None, "nngp", is_training=False)
    ratio = np.diag(got.nngp) / np.diag(remedied)
    assert np.all((ratio > 1e4) & (ratio < 1e6)), ratio  # ~1/eps, eps = 1e-5
    with pytest.raises(adapters.StateMutationError,
                       match="pass mutable=True(.|\n)*running variance is 0(.|\n)*"
                             r"training mode \(mutable=True, is_training=True, vmap_axes=None"
                             r"\)(.|\n)*set the statistics after init"):
        model.apply(params, x, rng=key, is_training=True)
    doc = adapters.StateMutationError.__doc__
    assert all(s in doc for s in ("hk.BatchNorm", "variance 0", "init_kwargs", "ones"))


def test_haiku_embedding_on_int32_token_ids(key):
    hk = pytest.importorskip("haiku")
    f = hk.transform(lambda ids: hk.Linear(3)(hk.Embed(11, 8)(ids).mean(1)))
    x1, x2 = tokens(jax.random.PRNGKey(1), 4), tokens(jax.random.PRNGKey(2), 3)
    got = estimate(f, key, x1, x2)
    expected = monte_carlo(*haiku_reference(f, x1, {}, with_state=False), key, N_SAMPLES,
                           x1, x2)
    assert_kernels_close(got, expected)


# --- Flax NNX and Equinox ---------------------------------------------------------------


def test_nnx_model_with_a_required_deterministic_flag(key):
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 8, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.l2 = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x, *, deterministic):
            return self.l2(self.drop(jax.nn.relu(self.l1(x)), deterministic=deterministic))

    def init_params(k):
        # with a 'dropout' stream, Dropout does not draw from the stream of the parameters
        return nnx.split(Net(nnx.Rngs(k, dropout=0)), nnx.Param, ...)[1]

    graphdef, _, rest = nnx.split(Net(nnx.Rngs(0, dropout=0)), nnx.Param, ...)

    def apply_fn(params, x, rng=None, **kwargs):
        return nnx.merge(graphdef, params, rest)(x, **kwargs)

    x1 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 3))
    got = estimate(adapters.nnx_model(Net), key, x1, x2, deterministic=True)
    expected = monte_carlo(*reference(init_params, apply_fn), key,
                           N_SAMPLES, x1, x2, kwargs={"deterministic": True})
    assert_kernels_close(got, expected)


def test_equinox_model_with_a_required_inference_flag(key):
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        l1: eqx.nn.Linear
        drop: eqx.nn.Dropout
        l2: eqx.nn.Linear

        def __init__(self, k):
            k1, k2 = jax.random.split(k)
            self.l1, self.drop = eqx.nn.Linear(3, 8, key=k1), eqx.nn.Dropout(0.5)
            self.l2 = eqx.nn.Linear(8, 2, key=k2)

        def __call__(self, x, *, inference, key=None):
            return self.l2(self.drop(jax.nn.relu(self.l1(x)), inference=inference, key=key))

    static = eqx.partition(Net(jax.random.PRNGKey(0)), eqx.is_array)[1]

    def init_params(k):
        return eqx.partition(Net(k), eqx.is_array)[0]

    def apply_fn(params, x, rng=None, **kwargs):
        return jax.vmap(lambda xi: eqx.combine(params, static)(xi, **kwargs))(x)

    x1 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 3))
    got = estimate(adapters.equinox_model(Net), key, x1, x2, inference=True)
    expected = monte_carlo(*reference(init_params, apply_fn), key,
                           N_SAMPLES, x1, x2, kwargs={"inference": True})
    assert_kernels_close(got, expected)


# --- init_kwargs and input_dtype against what init is called with -----------------------


def width_model(framework, width_of):
    """A model whose output width is ``width_of(x, **kwargs)``: it shows what init saw."""
    if framework == "linen":
        nn = pytest.importorskip("flax.linen")

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, **kwargs):
                return nn.Dense(width_of(x, **kwargs))(x.astype(jnp.float32))

        return lambda **options: adapters.as_model(Net(), **options)
    if framework == "haiku":
        hk = pytest.importorskip("haiku")
        f = hk.transform(lambda x, **kw: hk.Linear(width_of(x, **kw))(x.astype(jnp.float32)))
        return lambda **options: adapters.as_model(f, **options)
    if framework == "nnx":
        nnx = pytest.importorskip("flax.nnx")

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.lin = nnx.Linear(3, 4, rngs=rngs)

            def __call__(self, x, **kwargs):
                return self.lin(x.astype(jnp.float32))[..., :width_of(x, **kwargs)]

        return lambda **options: adapters.nnx_model(Net, **options)
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        lin: eqx.nn.Linear

        def __init__(self, key):
            self.lin = eqx.nn.Linear(3, 4, key=key)

        def __call__(self, x, **kwargs):
            return self.lin(x.astype(jnp.float32))[:width_of(x, **kwargs)]

    return lambda **options: adapters.equinox_model(Net, **options)


FRAMEWORKS = ["linen", "nnx", "haiku", "equinox"]
SPEC = jax.ShapeDtypeStruct((5, 3), jnp.float32)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_init_kwargs_win_over_call_kwargs(framework, key):
    make = width_model(framework, lambda x, *, width, offset: width - offset)
    assert make().init(key, SPEC, width=3, offset=0)[0] == (5, 3)
    assert make(init_kwargs={"width": 2}).init(key, SPEC, width=3, offset=0)[0] == (5, 2)
    # through the estimator: the call's keyword arguments reach init
    kernel = mcntk.monte_carlo_kernel_fn(make(), key=key, n_samples=1)(
        jnp.ones((5, 3)), None, "nngp", width=4, offset=1)
    assert kernel.shape == (5, 5)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_input_dtype_wins_over_the_input_dtype_of_x1(framework, key):
    make = width_model(framework, lambda x: 3 if jnp.issubdtype(x.dtype, jnp.integer) else 2)
    ids = jax.ShapeDtypeStruct((5, 3), jnp.int32)
    assert make().init(key, ids)[0] == (5, 3)
    assert make().init(key, SPEC)[0] == (5, 2)
    assert make(input_dtype=jnp.float32).init(key, ids)[0] == (5, 2)
    assert make(input_dtype=jnp.int32).init(key, SPEC)[0] == (5, 3)
    assert make(input_dtype=jnp.int32).init(key, (5, 3))[0] == (5, 3)


def test_adapter_inits_take_input_specs_and_stax_inits_do_not():
    from mcntk._apply import INPUT_SPECS_ATTRIBUTE

    for framework in FRAMEWORKS:
        model = width_model(framework, lambda x: 2)()
        assert getattr(model.init, INPUT_SPECS_ATTRIBUTE) is True
        assert isinstance(model, adapters.Model) and len(model) == 2
    stax_model = adapters.as_model(stax.Dense(2))
    assert not getattr(stax_model.init, INPUT_SPECS_ATTRIBUTE, False)
