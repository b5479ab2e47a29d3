"""Framework specifics of the adapters: fixed state and its mutation, options, inputs
of other dtypes and pytree inputs."""

import jax
import jax.numpy as jnp
import mcntk_reference as reference
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mcntk
from mcntk import adapters

X = (jnp.arange(12.0).reshape(4, 3) / 10 - 0.4).astype(jnp.float32)


def state_cotangents(model, params, x, **kwargs):
    """Cotangents of ``sum(apply(params, x))`` for every leaf of ``params`` (vjp accepts
    integer leaves, giving them float0 cotangents)."""
    out, vjp = jax.vjp(lambda p: model.apply(p, x, **kwargs), params)
    return vjp(jnp.ones_like(out))[0]


def assert_all_zero(tree):
    leaves = [g for g in jax.tree.leaves(tree) if g.dtype != jax.dtypes.float0]
    assert leaves and all(not np.any(g) for g in leaves)


def assert_any_nonzero(tree):
    assert any(np.any(g) for g in jax.tree.leaves(tree))


# --- Flax linen -----------------------------------------------------------------------


def linen_batchnorm():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        def setup(self):
            self.dense = nn.Dense(5)
            self.norm = nn.BatchNorm()
            self.out = nn.Dense(2)

        def __call__(self, x, train=False):
            h = self.norm(self.dense(x), use_running_average=not train)
            return self.out(nn.relu(h))

        def hidden(self, x):
            return self.dense(x)

    return Net()


def test_linen_collections_are_held_fixed():
    model = adapters.as_model(linen_batchnorm())
    params = model.init(jax.random.PRNGKey(0), X.shape)[1]
    assert set(params) == {"params", "batch_stats"}
    grads = state_cotangents(model, params, X)
    assert_all_zero(grads["batch_stats"])
    assert_any_nonzero(grads["params"])


def test_linen_mutation_is_an_error_unless_opted_in():
    module = linen_batchnorm()
    model = adapters.as_model(module)
    params = model.init(jax.random.PRNGKey(0), X.shape)[1]
    with pytest.raises(adapters.StateMutationError, match="batch_stats.*vmap_axes.*mutable="):
        model.apply(params, X, train=True)
    for mutable in ["batch_stats", ["batch_stats"], True]:
        out = adapters.as_model(module, mutable=mutable).apply(params, X, train=True)
        expected, _ = module.apply(params, X, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_linen_kwargs_and_method():
    module = linen_batchnorm()
    model = adapters.as_model(module, init_kwargs={"train": True})  # init in training mode
    params = model.init(jax.random.PRNGKey(0), X.shape)[1]
    hidden = adapters.as_model(module, method="hidden")
    assert hidden.init(jax.random.PRNGKey(0), X.shape)[0] == (4, 5)
    dense = params["params"]["dense"]
    np.testing.assert_allclose(hidden.apply(params, X),
                               X @ dense["kernel"] + dense["bias"][None], rtol=1e-5)
    kernel_fn = mcntk.monte_carlo_kernel_fn(*model, jax.random.PRNGKey(0), 2)
    assert kernel_fn(X, None, "ntk", train=False).shape == (4, 4)


def test_linen_token_ids_and_pytree_inputs():
    nn = pytest.importorskip("flax.linen")

    class Tagger(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            tokens = nn.Embed(10, 6)(inputs["ids"])
            return {"tags": nn.Dense(3)(tokens + nn.Dense(6)(inputs["extra"])[:, None])}

    ids = jax.ShapeDtypeStruct((4, 7), jnp.int32)
    model = adapters.as_model(Tagger())
    shape, params = model.init(jax.random.PRNGKey(0), {"ids": ids, "extra": (4, 2)})
    assert shape == {"tags": (4, 7, 3)}
    x = {"ids": jnp.arange(28).reshape(4, 7) % 10, "extra": jnp.ones((4, 2))}
    assert model.apply(params, x)["tags"].shape == (4, 7, 3)
    embed = adapters.as_model(nn.Embed(10, 6), input_dtype=jnp.int32)
    assert embed.init(jax.random.PRNGKey(0), (4, 7))[0] == (4, 7, 6)
    kernel = mcntk.monte_carlo_kernel_fn(*embed, jax.random.PRNGKey(0), 2)(x["ids"], None,
                                                                           "nngp")
    assert kernel.shape == (4, 4, 7, 7)


# --- Flax NNX -------------------------------------------------------------------------


def nnx_batchnorm(use_running_average):
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 5, rngs=rngs)
            self.bn = nnx.BatchNorm(5, use_running_average=use_running_average, rngs=rngs)
            self.out = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.bn(self.lin(x))))

    return Net


def test_nnx_variables_are_held_fixed():
    model = adapters.nnx_model(nnx_batchnorm(True))
    params = model.init(jax.random.PRNGKey(0), X.shape)[1]
    assert set(params) == {"params", "fixed"}
    assert set(params["fixed"]["bn"]) == {"mean", "var"}
    grads = state_cotangents(model, params, X)
    assert_all_zero(grads["fixed"])
    assert_any_nonzero(grads["params"])
    kernel = mcntk.monte_carlo_kernel_fn(*model, jax.random.PRNGKey(0), 2)(X, None, "ntk")
    assert kernel.shape == (4, 4)


def test_nnx_mutation_is_an_error_unless_opted_in():
    factory = nnx_batchnorm(False)
    params = adapters.nnx_model(factory).init(jax.random.PRNGKey(0), X.shape)[1]
    with pytest.raises(adapters.StateMutationError, match="vmap_axes.*mutable=True"):
        adapters.nnx_model(factory).apply(params, X)
    out = jax.jit(adapters.nnx_model(factory, mutable=True).apply)(params, X)
    assert out.shape == (4, 2)


def test_nnx_params_are_fresh_and_match_the_factory():
    nnx = pytest.importorskip("flax.nnx")
    factory = nnx_batchnorm(True)
    model = adapters.nnx_model(factory)
    params = model.init(jax.random.PRNGKey(3), X.shape)[1]
    module = factory(nnx.Rngs(jax.random.PRNGKey(3)))  # params come from the default stream
    np.testing.assert_allclose(model.apply(params, X), module(X), rtol=1e-6)
    with pytest.raises(ValueError, match="lacks the NNX variable"):
        model.apply({"params": {}}, X)


# --- Haiku ----------------------------------------------------------------------------


def haiku_batchnorm():
    """Haiku BatchNorm creates its state only when called with is_training=True: init
    with init_kwargs={'is_training': True}."""
    hk = pytest.importorskip("haiku")

    def f(x, is_training=False):
        h = hk.BatchNorm(True, True, 0.9)(hk.Linear(5)(x), is_training)
        return hk.Linear(2)(jax.nn.relu(h))

    return hk.transform_with_state(f)


def test_haiku_state_is_held_fixed():
    model = adapters.as_model(haiku_batchnorm(), init_kwargs={"is_training": True})
    params = model.init(jax.random.PRNGKey(0), X.shape)[1]
    assert set(params) == {"params", "state"}
    grads = state_cotangents(model, params, X)
    assert_all_zero(grads["state"])
    assert_any_nonzero(grads["params"])


def test_haiku_state_mutation_is_an_error_unless_opted_in():
    f = haiku_batchnorm()
    params = adapters.as_model(f, init_kwargs={"is_training": True}).init(jax.random.PRNGKey(0),
                                                                X.shape)[1]
    with pytest.raises(adapters.StateMutationError, match="is_training.*vmap_axes.*mutable=True"):
        adapters.as_model(f).apply(params, X, is_training=True)
    with pytest.raises(adapters.StateMutationError):
        apply = jax.jit(adapters.as_model(f).apply, static_argnames="is_training")
        apply(params, X, is_training=True)
    out = adapters.as_model(f, mutable=True).apply(params, X, is_training=True)
    expected, _ = f.apply(params["params"], params["state"], None, X, True)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_haiku_state_with_integer_leaves_through_the_estimator():
    model = adapters.as_model(haiku_batchnorm(), init_kwargs={"is_training": True})
    kernel_fn = mcntk.monte_carlo_kernel_fn(*model, jax.random.PRNGKey(0), 2)
    assert kernel_fn(X, None, "ntk").shape == (4, 4)


def test_haiku_without_apply_rng_and_state():
    hk = pytest.importorskip("haiku")
    f = hk.without_apply_rng(haiku_batchnorm())
    model = adapters.as_model(f, init_kwargs={"is_training": True})
    params = model.init(jax.random.PRNGKey(0), X.shape)[1]
    out = model.apply(params, X, rng=jax.random.PRNGKey(1))  # rng is ignored
    np.testing.assert_allclose(out, f.apply(params["params"], params["state"], X)[0],
                               rtol=1e-6)


def test_haiku_token_ids():
    hk = pytest.importorskip("haiku")
    model = adapters.as_model(hk.transform(lambda ids: hk.Embed(10, 4)(ids)), input_dtype="int32")
    assert model.init(jax.random.PRNGKey(0), (3, 5))[0] == (3, 5, 4)


# --- Equinox --------------------------------------------------------------------------


def test_equinox_batched_and_unbatched_agree():
    eqx = pytest.importorskip("equinox")
    class Batched(eqx.Module):
        inner: eqx.Module

        def __call__(self, x):
            return jax.vmap(self.inner)(x)

    factory = lambda key: eqx.nn.MLP(3, 2, 8, 2, key=key)
    single = adapters.equinox_model(factory)
    batch = adapters.equinox_model(lambda key: Batched(factory(key)), batched=True)
    key = jax.random.PRNGKey(0)
    p1, p2 = single.init(key, X.shape)[1], batch.init(key, X.shape)[1]
    np.testing.assert_allclose(single.apply(p1, X), batch.apply(p2, X), rtol=1e-6)
    np.testing.assert_allclose(single.apply(p1, X), jax.vmap(factory(key))(X), rtol=1e-6)


def test_equinox_static_parts_and_token_ids():
    eqx = pytest.importorskip("equinox")

    class Lookup(eqx.Module):
        table: jax.Array
        offset: int

        def __init__(self, key):
            self.table = jax.random.normal(key, (10, 4))
            self.offset = 1

        def __call__(self, i):
            return self.table[i + self.offset]

    model = adapters.equinox_model(Lookup, input_dtype=jnp.int32)
    shape, params = model.init(jax.random.PRNGKey(0), (5,))
    assert shape == (5, 4) and params.offset is None
    out = model.apply(params, jnp.arange(5))
    np.testing.assert_allclose(out, params.table[1:6])


def equinox_batchnorm(inference=True, store_state=False):
    """A factory of an Equinox model with BatchNorm: ``(module, state)`` as
    ``eqx.nn.make_with_state`` returns, or (``store_state``) a module holding its
    state as a field and called as ``module(x)``."""
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        lin: eqx.nn.Linear
        bn: eqx.nn.BatchNorm
        out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.lin = eqx.nn.Linear(3, 5, key=k1)
            self.bn = eqx.nn.BatchNorm(5, axis_name="batch", mode="batch",
                                       inference=inference)
            self.out = eqx.nn.Linear(5, 2, key=k2)

        def __call__(self, x, state):
            h, state = self.bn(self.lin(x), state)
            return self.out(jax.nn.relu(h)), state

    class Holder(eqx.Module):  # a user's wrapper: the state as a field
        net: Net
        state: eqx.nn.State

        def __call__(self, x):
            return self.net(x, self.state)[0]

    make = eqx.nn.make_with_state(Net)
    return (lambda key: Holder(*make(key))) if store_state else make


@pytest.mark.parametrize("store_state", [False, True], ids=["make_with_state", "field"])
def test_equinox_state_is_held_fixed(store_state):
    eqx = pytest.importorskip("equinox")
    factory = equinox_batchnorm(store_state=store_state)
    model = adapters.equinox_model(factory)
    key = jax.random.PRNGKey(0)
    shape, params = model.init(key, X.shape)
    assert shape == (4, 2)
    state = params.state if store_state else params[1]
    assert isinstance(state, eqx.nn.State)
    grads = state_cotangents(model, params, X)
    assert_all_zero(grads.state if store_state else grads[1])
    assert_any_nonzero(grads.net if store_state else grads[0])
    # the output is the module's own, called on one example at a time
    module = factory(key)
    call = (lambda xi: module(xi)) if store_state else (lambda xi: module[0](xi, module[1])[0])
    np.testing.assert_allclose(model.apply(params, X), jax.vmap(call)(X), rtol=1e-6)


def test_equinox_state_is_not_differentiated_by_the_estimator():
    """The NTK of a stateful model against explicit Jacobians with respect to the
    module's parameters only (its BatchNorm statistics left out by hand)."""
    eqx = pytest.importorskip("equinox")
    factory = equinox_batchnorm()
    key = jax.random.PRNGKey(1)
    module, state = factory(key)
    x1, x2 = X, X[::-1] * 2 + 0.3
    trainable, rest = eqx.partition(module, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(trainable)

    def f(theta, x):
        net = eqx.combine(unravel(theta), rest)
        return jax.vmap(lambda xi: net(xi, state)[0])(x)

    j1 = jax.jacobian(f)(flat, x1)  # (4, 2, P)
    j2 = jax.jacobian(f)(flat, x2)
    # the traced output axis is averaged (trace_axes=(-1,))
    expected = np.einsum("ikp,jkp->ij", np.asarray(j1, np.float64),
                         np.asarray(j2, np.float64)) / j1.shape[1]
    model = adapters.equinox_model(factory)
    params = model.init(key, X.shape)[1]
    for implementation in (1, 2, 3):
        kernel_fn = mcntk.empirical_kernel_fn(model.apply, implementation=implementation)
        got = kernel_fn(x1, x2, "ntk", params)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_equinox_batchnorm_in_training_mode_through_the_estimator():
    """A module that maps the batch itself with a named axis (BatchNorm in training
    mode, batched=True): the estimator's programs (inside shard_map) match the brute
    force on the adapter's apply, whose examples interact."""
    eqx = pytest.importorskip("equinox")
    make = equinox_batchnorm(inference=False)

    class Batched(eqx.Module):
        net: eqx.Module

        def __call__(self, x, state):
            return jax.vmap(self.net, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(x, state)

    def factory(key):
        net, state = make(key)
        return Batched(net), state

    model = adapters.equinox_model(factory, batched=True)
    key = jax.random.PRNGKey(2)
    # random inputs: collinear examples would put a normalised feature at ReLU's kink
    x1, x2 = (jax.random.normal(k, (n, 3)) for k, n in zip(jax.random.split(key), (4, 3)))
    kernel_fn = mcntk.monte_carlo_kernel_fn(model, key=key, n_samples=2)
    got = kernel_fn(x1, x2, ("nngp", "ntk"))
    expected = reference.monte_carlo(model.init, model.apply, key, 2, x1, x2)
    np.testing.assert_allclose(got.nngp, expected["nngp"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.ntk, expected["ntk"], rtol=1e-5, atol=1e-6)


def test_equinox_ema_batchnorm_in_training_mode_says_to_use_batch_mode():
    """mode='ema' writes a constant to its state, which eqx.nn.State.set refuses under
    the estimator's shard_map: an error in mcntk's terms."""
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        bn: eqx.nn.BatchNorm

        def __init__(self, key):
            # float32 statistics for float32 inputs, also under x64 (its 'ema' mode
            # mixes them with lax.select, which needs equal dtypes)
            self.bn = eqx.nn.BatchNorm(3, axis_name="batch", mode="ema", dtype=jnp.float32)

        def __call__(self, x, state):
            return jax.vmap(self.bn, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(x, state)

    model = adapters.equinox_model(eqx.nn.make_with_state(Net), batched=True)
    with pytest.raises(ValueError, match="State.set refused.*mode='batch'"):
        mcntk.monte_carlo_kernel_fn(model, key=jax.random.PRNGKey(0), n_samples=1)(X, None,
                                                                                   "nngp")


def test_equinox_state_errors():
    model = adapters.equinox_model(equinox_batchnorm(inference=False))
    with pytest.raises(ValueError, match="named axis.*inference_mode.*batched=True"):
        model.init(jax.random.PRNGKey(0), X.shape)
    eqx = pytest.importorskip("equinox")

    class NoPair(eqx.Module):
        lin: eqx.nn.Linear

        def __init__(self, key):
            self.lin = eqx.nn.Linear(3, 2, key=key)

        def __call__(self, x, state):
            return self.lin(x)

    model = adapters.equinox_model(eqx.nn.make_with_state(NoPair))
    with pytest.raises(TypeError, match=r"module\(x, state\) and must return \(output, state\)"):
        model.init(jax.random.PRNGKey(0), X.shape)

    class OwnState(eqx.Module):  # the state made by hand: its indices differ per call
        lin: eqx.nn.Linear
        bn: eqx.nn.BatchNorm
        state: eqx.nn.State

        def __init__(self, key):
            self.lin = eqx.nn.Linear(3, 2, key=key)
            self.bn = eqx.nn.BatchNorm(2, axis_name="batch", mode="batch", inference=True)
            self.state = eqx.nn.State(self.bn)

        def __call__(self, x):
            return self.bn(self.lin(x), self.state)[0]

    with pytest.raises(TypeError, match="without eqx.nn.make_with_state"):
        adapters.equinox_model(OwnState)

    with pytest.raises(TypeError, match="takes no state argument"):  # a stateless module
        adapters.equinox_model(lambda key: (eqx.nn.MLP(3, 2, 4, 1, key=key),
                                            eqx.nn.make_with_state(OwnState)(key)[1]))


# --- options --------------------------------------------------------------------------


def test_options_are_validated():
    nn = pytest.importorskip("flax.linen")
    hk = pytest.importorskip("haiku")
    eqx = pytest.importorskip("equinox")
    dense = nn.Dense(2)
    cases = [
        (TypeError, "`input_dtype`", lambda: adapters.as_model(dense, input_dtype="not-a-dtype")),
        (TypeError, "`rng_streams`", lambda: adapters.as_model(dense, rng_streams=3)),
        (ValueError, "`rng_streams`", lambda: adapters.as_model(dense, rng_streams=("a", "a"))),
        (ValueError, "'params'", lambda: adapters.as_model(dense, rng_streams=("params",))),
        (TypeError, "`init_kwargs`", lambda: adapters.as_model(dense, init_kwargs=["train"])),
        (TypeError, "`mutable`", lambda: adapters.as_model(dense, mutable=3)),
        (TypeError, "`mutable`", lambda: adapters.as_model(hk.transform_with_state(lambda x: x),
                                                  mutable="yes")),
        (TypeError, "`batched`", lambda: adapters.equinox_model(lambda k: eqx.nn.Identity(),
                                                       batched="no")),
        (TypeError, "unexpected keyword", lambda: adapters.as_model(dense, batched=True)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    model = adapters.as_model(dense)
    with pytest.raises(TypeError, match="`input_shape` must be a shape"):
        model.init(jax.random.PRNGKey(0), (4, 2.5))
    with pytest.raises(ValueError, match="non-negative"):
        model.init(jax.random.PRNGKey(0), (4, -1))


def test_pytree_input_dtype_for_mixed_inputs():
    """Token ids and a float mask in one dict input: input_dtype is a pytree of dtypes."""
    hk = pytest.importorskip("haiku")

    def net(x):
        return hk.Linear(2)(hk.Embed(11, 4)(x["t"]).mean(1) * x["m"][:, :1])

    model = adapters.as_model(hk.transform(net), input_dtype={"t": jnp.int32, "m": jnp.float32})
    tokens = jnp.arange(15).reshape(3, 5) % 11
    x1 = {"t": tokens, "m": jnp.ones((3, 5))}
    x2 = {"t": tokens[:2], "m": 2 * jnp.ones((2, 5))}
    ntk = mcntk.monte_carlo_kernel_fn(*model, jax.random.PRNGKey(0), 2)(x1, x2, "ntk")
    assert ntk.shape == (3, 2) and bool(jnp.all(jnp.isfinite(ntk)))
    with pytest.raises(TypeError, match=r"`input_dtype` must be a dtype .* got 'nope'"):
        adapters.as_model(hk.transform(net), input_dtype={"t": "nope"})
