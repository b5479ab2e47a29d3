"""With ``vmap_axes=None``, mcntk detects models that treat examples independently and
computes their NTK per example (mcntk/_independence.py). A model whose examples
interact must never be vectorised; one that is detected must give the kernel of the
non-vectorised computation (``detect_vmap_axes=False``) and of the same ``vmap_axes``
declared by hand.

Most cases are checked on the decision alone (tracing only, fast); a few per code
path also compute kernels. For interacting models, ``test_vectorising_would_be_wrong``
shows that declaring them independent really changes the NTK, so that the decision
tests guard a real difference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.example_libraries import stax
from mcntk_reference import stax_serial

import mcntk
from mcntk import _independence, _inputs, adapters

RTOL = 1e-5
GET = ("nngp", "ntk")
JC = mcntk.NtkImplementation.JACOBIAN_CONTRACTION


def _x(seed, shape):  # numpy's generator: no compilation per shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def assert_close(actual, expected, rtol=RTOL):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, (a.shape, e.shape)
        scale = max(np.abs(e).max(), 1e-30)
        assert np.abs(a - e).max() <= rtol * scale, np.abs(a - e).max() / scale


def the_decision(kernel_fn):
    (decision,) = kernel_fn.independence.values()
    return decision


def decide(fn, params, x1, x2=None, **kwargs):
    """The analysis alone, as ``kernel_fn(x1, x2, params, **kwargs)`` would run it."""
    pairs = {k for k, v in kwargs.items() if isinstance(v, tuple) and len(v) == 2}
    sides = []
    for i, x in enumerate((x1, x2)):
        if x is not None:
            kw = {k: v[i] if k in pairs else v for k, v in kwargs.items()}
            sides.append(_inputs._side(x, kw, pairs, None, f"x{i + 1}"))
    return _independence.decide(fn, params, sides)


W = {"w": _x(0, (6, 6)), "t": _x(3, (11, 6))}
X1, X2 = _x(1, (4, 6)), _x(2, (3, 6))


# --- models, by what they do with the examples ----------------------------------------


def _scan_time(p, x):  # an RNN over the 2 steps of each example
    h, _ = lax.scan(lambda h, xt: (jnp.tanh(h @ p["w"] + xt @ p["w"][:3]), None),
                    jnp.zeros((x.shape[0], 6)), jnp.swapaxes(x.reshape(-1, 2, 3), 0, 1))
    return h


def _conv_nchw(p, x):
    y = lax.conv_general_dilated(x.reshape(x.shape[0], 1, 2, 3),
                                 p["w"][:2, :2].reshape(2, 1, 2, 1), (1, 1), "SAME",
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y.reshape(y.shape[0], -1)


def _callback(h):  # an effect with no operand and no result (a timer, a log line)
    jax.debug.callback(lambda: None)
    return h


def _max_pool(p, x):
    h = (x @ p["w"]).reshape(-1, 3, 2)
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 1), (1, 1, 1), "VALID")


def _while(p, x):  # not differentiable in reverse mode: on the input side only
    body = lambda c: (c[0] + 1, jnp.sin(c[1]) + c[0])
    return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1] @ p["w"]


def _per_example_attention(p, x):  # attention within each example, over its 2 tokens
    h = x.reshape(-1, 2, 3) @ p["w"][:3, :3]
    a = jax.nn.softmax(jnp.einsum("nid,njd->nij", h, h), axis=-1)
    # einsum, not `a @ h`: jnp.matmul squeezes a batch of one, another program (declined)
    return jnp.einsum("nij,njd->nid", a, h).reshape(-1, 6)


def _feature_ops(p, x):
    h = jnp.concatenate([jnp.cumsum(jnp.sort(x, 1), 1), jnp.pad(x, ((0, 0), (1, 0)))], 1)
    return h[:, :6] @ p["w"]


def _attention_over_the_batch(p, x):
    h = x @ p["w"]
    return jax.nn.softmax(h @ h.T / 3.0) @ h  # each example attends to the others


@jax.custom_jvp
def _batch_mixing_jvp(h):  # the identity, whose derivative mixes the examples
    return h


_batch_mixing_jvp.defjvp(lambda primals, tangents: (
    primals[0], tangents[0] + tangents[0].mean(0, keepdims=True)))


@jax.custom_vjp
def _batch_mixing_vjp(h):  # the identity, whose backward rule mixes the examples
    return h


_batch_mixing_vjp.defvjp(lambda h: (h, None), lambda _, ct: (ct + ct.mean(0, keepdims=True),))


@jax.custom_jvp
def _softplus(h):  # a per-example custom_jvp: accepted
    return jnp.logaddexp(h, 0.0)


_softplus.defjvp(lambda primals, tangents: (_softplus(primals[0]),
                                            jax.nn.sigmoid(primals[0]) * tangents[0]))


def _one_example_differs(p, x):  # independent, but one example computes sin(h) ** 2:
    h = x @ p["w"]  # the same operations, one of them reading other values
    a, b = jnp.sin(h), jnp.cos(h)
    return a * (b if x.shape[0] > 1 else a)


def _three_examples_mix(p, x):  # independent for 4 examples, not for 3 (x2)
    h = x @ p["w"]
    return h - h.mean(0) if x.shape[0] == 3 else h


def _dropout(p, x):
    h = x @ p["w"]
    keep = jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, h.shape)
    return jnp.where(keep, h, 0.0)


def _per_example_keys_dropout(p, x):  # a key per example: still a draw per call
    keys = jax.random.split(jax.random.PRNGKey(0), x.shape[0])
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (6,)))(keys)
    return jnp.where(keep, x @ p["w"], 0.0)


def _unused_draw(p, x):  # a draw nobody reads cannot change the output
    jax.random.normal(jax.random.PRNGKey(0), (3,))
    return x @ p["w"]


def _batchnorm(p, x):
    h = x @ p["w"]
    return (h - h.mean(0, keepdims=True)) * lax.rsqrt(h.var(0, keepdims=True) + 1e-5)


CASES = [  # (name, fn(params, x), independent)
    ("dense", lambda p, x: x @ p["w"], True),
    ("relu_and_softmax", lambda p, x: jax.nn.softmax(jax.nn.relu(x @ p["w"])), True),
    ("flatten", lambda p, x: x.reshape(x.shape[0], 2, 3).reshape(x.shape[0], -1) @ p["w"],
     True),
    ("transposes", lambda p, x: (p["w"].T @ x.T).T, True),
    ("per_example_attention", _per_example_attention, True),
    ("embedding", lambda p, x: p["t"][jnp.argmax(x, 1) % 11] @ p["w"], True),
    ("vmapped_indexing", lambda p, x: jax.vmap(lambda r, i: r[i])(x @ p["w"], jnp.argmax(x, 1)),
     True),
    ("static_index", lambda p, x: (x @ p["w"])[:, 2:4] * x[:, 1:2], True),
    ("features_ops", _feature_ops, True),
    ("max_pool", _max_pool, True),
    ("rnn_scan", _scan_time, True),
    ("conv_nchw", _conv_nchw, True),
    ("cond_on_params", lambda p, x: lax.cond(p["w"][0, 0] > 0, jnp.sin, jnp.cos, x @ p["w"]),
     True),
    ("while_loop", _while, True),
    ("checkpointed", lambda p, x: jax.checkpoint(lambda y: jnp.tanh(y @ p["w"]))(x), True),
    ("jitted", lambda p, x: jax.jit(lambda q, y: jnp.tanh(y @ q))(p["w"], x), True),
    ("custom_jvp_per_example", lambda p, x: _softplus(x @ p["w"]), True),
    ("batch_constant_broadcast", lambda p, x: x @ p["w"] + jnp.ones((x.shape[0], 6)), True),
    ("output_examples_on_axis_1", lambda p, x: (x @ p["w"]).T, True),
    ("unused_random_draw", _unused_draw, True),  # dropped by make_jaxpr: never drawn
    # examples that interact
    ("batchnorm_training", _batchnorm, False),
    ("attention_over_the_batch", _attention_over_the_batch, False),
    ("mean_over_examples", lambda p, x: x @ p["w"] - (x @ p["w"]).mean(0, keepdims=True),
     False),
    ("sum_over_examples", lambda p, x: jnp.tanh(x @ p["w"]).sum(0, keepdims=True) + x, False),
    ("max_over_examples", lambda p, x: x @ p["w"] * jnp.max(x, 0, keepdims=True), False),
    ("cumsum_over_examples", lambda p, x: jnp.cumsum(x @ p["w"], 0), False),
    ("sort_examples", lambda p, x: jnp.sort(x @ p["w"], 0), False),
    ("roll_examples", lambda p, x: jnp.roll(x @ p["w"], 1, axis=0), False),
    ("reverse_examples", lambda p, x: (x @ p["w"])[::-1], False),
    ("scan_over_examples", lambda p, x: lax.scan(lambda c, r: (c + r, c), jnp.zeros(6),
                                                 x @ p["w"])[1], False),
    ("cond_on_examples", lambda p, x: lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x @ p["w"]),
     False),
    ("while_on_examples", lambda p, x: lax.while_loop(lambda h: h.sum() < 9.0,
                                                      lambda h: h + 1.0, x @ p["w"]), False),
    ("position_in_batch", lambda p, x: x @ p["w"] + jnp.arange(x.shape[0])[:, None], False),
    ("gram_of_examples", lambda p, x: (x @ p["w"]) @ (x @ p["w"]).T, False),
    ("first_example_everywhere", lambda p, x: x @ p["w"] + x[:1], False),
    ("index_examples", lambda p, x: (x @ p["w"])[jnp.array([1, 0, 3, 2])[:x.shape[0]] %
                                                  x.shape[0]], False),
    ("gather_by_example_values", lambda p, x: (x @ p["w"])[jnp.argmax(x[:, :1], 0)] + x, False),
    ("dynamic_slice_of_examples", lambda p, x: lax.dynamic_slice_in_dim(
        x @ p["w"], jnp.argmax(x[0]) % 2, 1, 0) + x, False),
    ("scatter_into_examples", lambda p, x: (x @ p["w"]).at[0].add(x[-1]), False),
    ("concatenate_examples", lambda p, x: jnp.concatenate([x, x[::-1]], 1) @ jnp.concatenate(
        [p["w"], p["w"]]), False),
    ("reshape_merges_examples", lambda p, x: x.reshape(-1).reshape(x.shape) @ p["w"], False),
    ("transpose_reshape_mixes", lambda p, x: (x @ p["w"]).T.reshape(x.shape), False),
    ("jitted_mean_over_examples", lambda p, x: jax.jit(lambda h: h - h.mean(0, keepdims=True))(
        x @ p["w"]),
     False),
    ("checkpointed_gram", lambda p, x: jax.checkpoint(lambda h: h @ h.T @ h)(x @ p["w"]),
     False),
    ("custom_jvp_mixes_derivatives", lambda p, x: _batch_mixing_jvp(x @ p["w"]), False),
    ("custom_vjp_on_parameters", lambda p, x: _batch_mixing_vjp(x @ p["w"]), False),
    ("one_example_differs", _one_example_differs, False),
    ("callback_without_operands", lambda p, x: _callback(x @ p["w"]), False),
    ("divides_by_the_batch_size", lambda p, x: x @ p["w"] / x.shape[0], False),
    ("dropout", _dropout, False),
    ("dropout_with_per_example_keys", _per_example_keys_dropout, False),
    # one example takes another path through jnp (a size-1 axis is special): declined
    ("take_along_axis", lambda p, x: jnp.take_along_axis(x @ p["w"], jnp.argsort(x, 1), 1),
     False),
]
FNS = {name: fn for name, fn, _ in CASES}


@pytest.mark.parametrize("name,fn,independent", CASES, ids=[c[0] for c in CASES])
def test_decision(name, fn, independent):
    decision = decide(fn, W, X1, X2)
    assert decision.independent == independent, decision
    assert decision.reason
    if independent:
        out_axes = 1 if name == "output_examples_on_axis_1" else 0
        assert decision.vmap_axes == mcntk._apply.VmapAxes(0, out_axes, {}), decision
    else:  # declined by the analysis, not because the model failed to trace
        assert str(decision).startswith("not vectorised: ")
        assert "cannot be traced" not in decision.reason, decision


def _scaled(p, x):  # a pytree input: features, and one scale shared or per example
    a, scale = x
    h = jnp.tanh(a @ p["w"])
    return h * scale.reshape(-1, 1)[:h.shape[0]]


@pytest.mark.parametrize("swap", [False, True])
def test_input_leaf_shared_in_x1_and_per_example_in_x2(swap):
    """One vmap_axes serves both sides: a leaf whose examples are on axis 0 in one side
    and shared (0-d) in the other must not be vectorised with either side's axes."""
    shared = (X1[:3], jnp.float32(0.5))
    per_example = (X2, jnp.asarray([0.5, -1.0, 2.0], jnp.float32))
    x1, x2 = (per_example, shared) if swap else (shared, per_example)
    assert not decide(_scaled, W, x1, x2).independent
    detected = mcntk.empirical_ntk_fn(_scaled, trace_axes=(), implementation=JC)(x1, x2, W)
    jac = lambda x: jax.jacrev(lambda w: _scaled({**W, "w": w}, x))(W["w"]).reshape(3, 6, -1)
    assert_close(detected, jnp.einsum("iap,jbp->ijab", jac(x1), jac(x2)))


def test_x2_with_another_number_of_examples_is_analysed_too():
    assert decide(_three_examples_mix, W, X1).independent
    assert not decide(_three_examples_mix, W, X1, X2).independent
    assert not decide(_three_examples_mix, W, X2, X1).independent


@pytest.mark.parametrize("name,outputs_mix", [("attention_over_the_batch", True),
                                               ("custom_jvp_mixes_derivatives", False),
                                               ("one_example_differs", True)])
def test_vectorising_would_be_wrong(name, outputs_mix):
    """Declaring these independent changes the NTK; detection does not vectorise them.
    Declared axes of a model whose outputs mix the examples are refused (checked on
    values); one whose derivatives alone mix them is not seen by that check."""
    fn = FNS[name]
    declared = lambda: mcntk.empirical_ntk_fn(fn, (), vmap_axes=0, implementation=JC)(
        X1, X2, W)
    detecting = mcntk.empirical_ntk_fn(fn, (), implementation=JC)
    got = detecting(X1, X2, W)
    assert not the_decision(detecting).independent
    if outputs_mix:
        with pytest.raises(ValueError, match="`vmap_axes`.*interact"):
            declared()
    else:
        assert not np.allclose(declared(), got, rtol=1e-3, atol=1e-3)


def _int_embedding(p, x):  # integer inputs: a table lookup per token, then a sum
    return jnp.tanh(p["t"][x].sum(1) @ p["w"])


@pytest.mark.parametrize("name,fn,x1,x2,vmap_axes", [
    ("conv_nchw", _conv_nchw, X1, X2, 0),
    ("output_examples_on_axis_1", FNS["output_examples_on_axis_1"], X1, X2, (0, 1, {})),
    ("integer_inputs", _int_embedding, jnp.array([[1, 2], [3, 10], [0, 0], [5, 7]]),
     jnp.array([[4, 4], [9, 1], [2, 6]]), 0),
])
def test_detected_equals_declared_and_undetected(name, fn, x1, x2, vmap_axes):
    kernel = lambda **kw: mcntk.empirical_kernel_fn(fn, (), implementation=JC, **kw)
    detecting = kernel()
    got = detecting(x1, x2, GET, W)
    decision = the_decision(detecting)
    assert decision.independent, decision
    assert decision.vmap_axes == mcntk._apply.canonicalize_vmap_axes(vmap_axes)
    assert_close(got, kernel(detect_vmap_axes=False)(x1, x2, GET, W))
    if vmap_axes != 0:  # (with 0 the declared run is the same program as the detected one)
        assert_close(got, kernel(vmap_axes=vmap_axes)(x1, x2, GET, W))


def _with_keywords(p, x, scale=1.0, flag=False, mask=1.0):
    h = jnp.tanh(x @ p["w"]) * mask * scale
    return h if flag else -h


@pytest.mark.parametrize("kwargs", [
    {"scale": jnp.float32(2.0), "flag": True},  # 0-d arrays and static values: shared
    {"mask": (jnp.ones((4, 6)), jnp.zeros((3, 6)))},  # 2-tuple: rows on axis 0
])
def test_keyword_arguments(kwargs):
    kernel_fn = mcntk.empirical_kernel_fn(_with_keywords, (), implementation=JC)
    got = kernel_fn(X1, X2, GET, W, **kwargs)
    decision = the_decision(kernel_fn)
    assert decision.independent, decision
    assert set(decision.vmap_axes.kwargs_axes) == {k for k, v in kwargs.items()
                                                   if not isinstance(v, bool)}
    expected = mcntk.empirical_kernel_fn(_with_keywords, (), implementation=JC,
                                         detect_vmap_axes=False)(X1, X2, GET, W, **kwargs)
    assert_close(got, expected)


def test_array_keyword_without_a_batch_axis_is_declined():
    decision = decide(_with_keywords, W, X1, X2, mask=jnp.ones((1, 6)))
    assert not decision.independent and "`mask`" in decision.reason, decision


def test_per_example_mask_used_across_examples():
    fn = lambda p, x, mask: (x @ p["w"]) * mask.mean(0)  # a 2-tuple keyword, mixed
    mask = (jnp.ones((4, 6)), jnp.zeros((3, 6)))
    assert not decide(fn, W, X1, X2, mask=mask).independent
    assert decide(lambda p, x, mask: (x @ p["w"]) * mask, W, X1, X2, mask=mask).independent


def test_pytree_inputs_and_outputs():
    def fn(p, x):
        h = x["a"] @ p["w"] + x["b"][:, :1]
        return {"logits": h, "features": jnp.stack([h, -h], axis=2)}

    x1 = {"a": X1, "b": _x(2, (4, 2))}
    x2 = {"a": X2, "b": _x(4, (3, 2))}
    kernel_fn = mcntk.empirical_kernel_fn(fn, (), implementation=JC)
    got = kernel_fn(x1, x2, "ntk", W)
    assert the_decision(kernel_fn).independent
    expected = mcntk.empirical_kernel_fn(fn, (), implementation=JC, detect_vmap_axes=False)(
        x1, x2, "ntk", W)
    assert_close(got, expected)
    # one leaf whose examples are mixed spoils the whole input
    mixed = lambda p, x: fn(p, {"a": x["a"], "b": x["b"] - x["b"].mean(0)})
    assert not decide(mixed, W, x1, x2).independent


# --- framework models through monte_carlo_kernel_fn ----------------------------------


def _linen(train):
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
            h = nn.Dropout(0.5, deterministic=True)(nn.gelu(nn.LayerNorm()(h)))
            return nn.Dense(2)(h)

    return adapters.as_model(Net(), mutable=["batch_stats"]), {"train": train}


def _linen_dropout():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.Dropout(0.5, deterministic=False)(nn.Dense(8)(x)))

    return adapters.as_model(Net()), {}


def _haiku(train):
    hk = pytest.importorskip("haiku")

    def net(x, is_training):
        h = hk.BatchNorm(True, True, 0.9)(hk.Linear(8)(x), is_training)
        return hk.Linear(2)(jax.nn.relu(h))

    return (adapters.as_model(hk.transform_with_state(net), mutable=True),
            {"is_training": train})


INTERACTING_FRAMEWORKS = {
    "linen_batchnorm_training": lambda: _linen(True),
    "linen_dropout": _linen_dropout,
    "haiku_batchnorm_training": lambda: _haiku(True),
}
X3 = _x(1, (4, 3)), _x(2, (3, 3))


@pytest.mark.parametrize("name", sorted(INTERACTING_FRAMEWORKS))
def test_framework_models_whose_examples_interact(name):
    model, kwargs = INTERACTING_FRAMEWORKS[name]()
    params = model.init(jax.random.PRNGKey(0), X3[0].shape, **kwargs)[1]
    rng = jax.random.PRNGKey(1)  # what monte_carlo_kernel_fn passes as `rng`
    pairs = set()
    sides = [_inputs._side(x, kwargs, pairs, None, "x") for x in X3]
    decision = _independence.decide(model.apply, params, sides, rng)
    assert not decision.independent, decision
    assert "cannot be traced" not in decision.reason, decision


def test_linen_model_with_independent_examples_through_monte_carlo():
    model, kwargs = _linen(False)
    kernel = lambda d: mcntk.monte_carlo_kernel_fn(
        model, key=jax.random.PRNGKey(0), n_samples=1, implementation=JC, detect_vmap_axes=d)
    detecting = kernel(True)
    got = detecting(*X3, "ntk", **kwargs)
    assert the_decision(detecting).independent, the_decision(detecting)
    assert_close(got, kernel(False)(*X3, "ntk", **kwargs))



# --- the decision in use ----------------------------------------------------------------


def test_monte_carlo_with_blocks_and_one_example():
    init_fn, apply_fn = stax_serial(stax.Dense(4), stax.Relu, stax.Dense(2))
    x1, x2 = _x(1, (1, 3)), _x(2, (5, 3))
    out = [mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2,
                                       batch_size=2, implementation=JC, detect_vmap_axes=d)
           for d in (True, False)]
    assert_close(out[0](x1, x2, GET), out[1](x1, x2, GET))
    (decision,) = out[0].independence.values()  # one signature: all blocks have 2 rows
    assert decision.independent, decision
    assert not out[1].independence  # detection off: nothing analysed


def test_decision_is_cached_per_signature():
    init_fn, apply_fn = stax_serial(stax.Dense(2), stax.Relu)
    params = init_fn(jax.random.PRNGKey(0), (3, 5))[1]
    kernel_fn = mcntk.empirical_kernel_fn(apply_fn, implementation=JC)
    x = _x(1, (3, 5))
    kernel_fn(x, None, "ntk", params)
    kernel_fn(x + 1, None, "ntk", params)
    assert len(kernel_fn.independence) == 1
    kernel_fn(_x(1, (2, 5)), None, "ntk", params)
    assert len(kernel_fn.independence) == 2
    kernel_fn(x, None, "nngp", params)  # no NTK, nothing to decide
    assert len(kernel_fn.independence) == 2
    assert "vmap_axes=(in_axes=0, out_axes=0" in str(next(iter(
        kernel_fn.independence.values())))


def test_declared_vmap_axes_and_option_type():
    init_fn, apply_fn = stax_serial(stax.Dense(2))
    params = init_fn(jax.random.PRNGKey(0), (3, 5))[1]
    for kwargs in ({"vmap_axes": 0}, {"detect_vmap_axes": False}):
        ntk_fn = mcntk.empirical_ntk_fn(apply_fn, implementation=JC, **kwargs)
        ntk_fn(_x(1, (3, 5)), None, params)
        assert not ntk_fn.independence  # declared, or detection off: nothing analysed
    with pytest.raises(TypeError, match="`detect_vmap_axes` must be a bool"):
        mcntk.empirical_ntk_fn(apply_fn, detect_vmap_axes="yes")
    with pytest.raises(TypeError, match="`detect_vmap_axes` must be a bool"):
        mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                    detect_vmap_axes=1)
