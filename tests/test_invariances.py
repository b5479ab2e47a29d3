"""Invariances: batched == unbatched, generator == int calls, one compilation, ..."""

import chex
import jax
import jax.numpy as jnp
import mcntk_reference as reference
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import lenient, stax_serial

import mcntk
from mcntk import _budget, monte_carlo


def _fcn():
    return stax_serial(stax.Conv(3, (3, 3), padding="SAME"), stax.Relu,
                       stax.Conv(2, (3, 3), padding="SAME"))


def _mlp():
    return stax_serial(stax.Dense(6), stax.Relu, stax.Dense(2))


def _x(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape)


def close(a, b, rtol=1e-5):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=rtol * max(
        float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(b)))


BATCH_CASES = [  # (batch_size, x2 is None, diagonal_axes, fully convolutional); 5 x1 examples
    (1, False, (), False), (2, False, (), False), (4, False, (), False), (3, False, (), False),
    (2, True, (), False), (3, True, (), False), (2, False, (0,), False), (3, True, (0,), False),
    (2, False, (1,), True), (2, True, (-1,), True), (3, False, (0,), True),
]


@pytest.mark.parametrize("batch_size,x2_none,diagonal_axes,conv", BATCH_CASES)
def test_batched_equals_unbatched(batch_size, x2_none, diagonal_axes, conv):
    init_fn, apply_fn = _fcn() if conv else _mlp()
    shape = (4, 4, 2) if conv else (3,)
    x1 = _x(1, (5, *shape))
    x2 = None if x2_none else _x(2, (5 if 0 in diagonal_axes else 3, *shape))
    assert batch_size < x1.shape[0]  # really batched: more than one block
    key = jax.random.PRNGKey(0)
    make = lambda b, sod=True: mcntk.monte_carlo_kernel_fn(
        init_fn, apply_fn, key, 2, batch_size=b, store_on_device=sod,
        trace_axes=() if conv else (-1,), diagonal_axes=diagonal_axes, implementation=1)
    whole = make(0)(x1, x2)
    blocked = make(batch_size)(x1, x2)
    close(blocked, whole)
    host = make(batch_size, False)(x1, x2)
    assert all(isinstance(v, np.ndarray) for v in jax.tree.leaves(host))
    close(host, whole)


@pytest.mark.parametrize("store_on_device", [False, True])
def test_one_kernel_fn_serves_one_block_and_many_blocks(store_on_device):
    """Calls whose x2 fits in one block and calls that need several, in either order,
    on one kernel function: each is right (programs for cut and uncut sides differ)."""
    init_fn, apply_fn = _mlp()
    key = jax.random.PRNGKey(3)
    x1, small, large = _x(1, (2, 3)), _x(2, (2, 3)), _x(4, (4, 3))
    for order in ((small, large), (large, small)):
        kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, batch_size=2,
                                                store_on_device=store_on_device,
                                                device_count=0)
        for x2 in order:
            expected = reference.monte_carlo(init_fn, apply_fn, key, 2, x1, x2)
            close(kernel_fn(x1, x2, "ntk"), expected["ntk"])


@pytest.mark.parametrize("batch_size", [0, 2])
def test_generator_equals_int_calls(batch_size):
    init_fn, apply_fn = _mlp()
    x1, x2 = _x(1, (3, 3)), _x(2, (2, 3))
    key = jax.random.PRNGKey(1)
    counts = [3, 1, 6, 3]
    gen = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, counts, batch_size=batch_size)(
        x1, x2, ("ntk", "nngp"))
    assert not isinstance(gen, (list, tuple))
    for n, est in zip([1, 3, 6], gen):
        one = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, n, batch_size=batch_size)(
            x1, x2, ("ntk", "nngp"))
        assert type(est).__name__ == "MonteCarloKernel"
        close(est, one)


def test_generator_is_lazy_and_incremental():
    calls = []

    def init_fn(key, shape):
        return shape, {"w": jax.random.normal(key, (shape[-1], 2))}

    def apply_fn(params, x):
        return x @ params["w"]

    x = _x(1, (3, 4))
    # count samples through a host callback that runs once per evaluated sample
    def counting_apply(params, x):
        jax.debug.callback(lambda: calls.append(1))
        return apply_fn(params, x)

    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, counting_apply, jax.random.PRNGKey(0),
                                            (1, 10, 100))
    gen = kernel_fn(x, None, "nngp")
    assert calls == []  # nothing runs until asked
    results = list(gen)
    jax.effects_barrier()
    assert len(results) == 3
    assert len(calls) == 100  # 100 samples in all, not 111


def test_one_compilation_serves_any_n_samples():
    traces = []

    def apply_fn(params, x):
        traces.append(1)  # runs at trace time only
        return jnp.tanh(x @ params["w"])

    def init_fn(key, shape):
        return shape, {"w": jax.random.normal(key, (shape[-1], 3))}

    x = _x(1, (4, 5))
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0),
                                            [1, 7, 1000], implementation=1)
    gen = kernel_fn(x, None, "ntk")
    next(gen)
    after_first = len(traces)
    list(gen)
    assert len(traces) == after_first  # 7 and 1000 samples: no new trace


def test_samples_per_step_matches(monkeypatch):
    """Samples vmapped per step (as on GPUs and TPUs) == one at a time (as on CPUs)."""
    init_fn, apply_fn = _mlp()
    x1, x2 = _x(1, (3, 3)), _x(2, (2, 3))
    key = jax.random.PRNGKey(2)
    ref_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 7, memory_budget=2**30)
    ref = ref_fn(x1, x2)
    assert set(ref_fn.samples_per_step.values()) == {1}  # on CPUs: one at a time
    monkeypatch.setattr(monte_carlo._Estimator, "_vmaps_samples", lambda self: True)
    chunked_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 7, memory_budget=2**30)
    chunked = chunked_fn(x1, x2)
    assert set(chunked_fn.samples_per_step.values()) == {7}  # all 7 fit in 1 GiB
    close(chunked, ref)


_DROPOUT = stax_serial(stax.Dense(8), stax.Relu, stax.Dropout(0.6, mode="train"), stax.Dense(2))


@pytest.mark.parametrize("case", ["dropout", "generator", "stderr", "x2_none_blocks", "conv",
                                  "conv_jacobian", "rbg_key", "rest_one_at_a_time"])
def test_vmapped_samples_match_one_at_a_time(case, monkeypatch):
    """Several samples per step, vmapped (GPUs, TPUs) == one per step (CPUs): the
    dropout keys, the generator's boundaries, stderr's moments, the blocks of x2=None,
    a CNN's per-example NTK; a CNN's Jacobians, which JAX cannot vmap over samples, and
    rbg keys, whose vmapped bits differ, take one sample per step; so do the samples of
    a call that do not fill a step."""
    model = {"dropout": _DROPOUT, "conv": _fcn(), "conv_jacobian": _fcn()}.get(case) or _mlp()
    x1, x2 = _x(1, (6, 3)), _x(2, (4, 3))
    if case.startswith("conv"):
        x1, x2 = _x(1, (3, 4, 4, 2)), _x(2, (2, 4, 4, 2))
    counts, kw, key, expected = 11, {"memory_budget": 2**30}, jax.random.PRNGKey(4), {11}
    if case == "generator":
        counts = [2, 5, 11]
    elif case == "stderr":
        kw["stderr"] = True
    elif case == "x2_none_blocks":  # blocks off the diagonal reuse x1's part: one per step
        x2, kw["batch_size"], expected = None, 2, {1, 11}
    elif case == "conv_jacobian":
        kw["implementation"], kw["trace_axes"], expected = 1, (), {1}
    elif case == "rbg_key":
        model, key, expected = _DROPOUT, jax.random.key(4, impl="rbg"), {1}
    elif case == "rest_one_at_a_time":  # steps of 4: calls of 2, 3 and 6 samples
        counts, expected = [2, 5, 11], {4}

    def run():
        fn = mcntk.monte_carlo_kernel_fn(*model, key, counts, **kw)
        out = fn(x1, x2, ("nngp", "ntk"))
        return list(out) if isinstance(counts, list) else out, set(fn.samples_per_step.values())

    ref, one = run()
    monkeypatch.setattr(monte_carlo._Estimator, "_vmaps_samples", lambda self: True)
    if case == "rest_one_at_a_time":
        monkeypatch.setattr(_budget, "samples_per_step", lambda *args: 4)
    got, many = run()
    assert one == {1} and many == expected, (one, many)
    close(got, ref)


def test_fallback_to_one_per_step_is_kept(monkeypatch):
    """After JAX failed to vmap a CNN's Jacobians over samples, later calls reuse the
    one-per-step program instead of building it again."""
    from mcntk import _sampler
    monkeypatch.setattr(monte_carlo._Estimator, "_vmaps_samples", lambda self: True)
    built = []
    real = _sampler.make_program
    monkeypatch.setattr(_sampler, "make_program",
                        lambda *a, **k: built.append(a[7]) or real(*a, **k))
    fn = mcntk.monte_carlo_kernel_fn(*_fcn(), jax.random.PRNGKey(0), 3, implementation=1,
                                     trace_axes=(), memory_budget=2**30)
    x = _x(1, (2, 4, 4, 2))
    first = fn(x, None, "ntk")
    assert built == [3, 1] and set(fn.samples_per_step.values()) == {1}, built
    again = fn(x, None, "ntk")
    assert built == [3, 1]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))


def test_grouped_convolution_takes_one_sample_per_step(monkeypatch):
    """A grouped convolution's gradient cannot be batched under a mesh sharding: such a
    model's NTK runs one sample per step whatever the budget."""
    monkeypatch.setattr(monte_carlo._Estimator, "_vmaps_samples", lambda self: True)
    fn = mcntk.monte_carlo_kernel_fn(*reference.depthwise_network(), jax.random.PRNGKey(0), 4,
                                     memory_budget=2**30)
    out = fn(_x(5, (3, 4, 4, 2)), None, "ntk")
    assert set(fn.samples_per_step.values()) == {1}
    assert np.isfinite(np.asarray(out)).all()
    plain = mcntk.monte_carlo_kernel_fn(*_mlp(), jax.random.PRNGKey(0), 4, memory_budget=2**30)
    plain(_x(1, (3, 3)), None, "ntk")
    assert set(plain.samples_per_step.values()) == {4}  # the same budget, no grouped conv


@pytest.mark.parametrize("vmap_axes,trace_axes,diagonal_axes", [
    (None, (-1,), ()), (0, (-1,), ()), (None, (), ()), (0, (1, 2), (3,)), (None, (-1,), (1,)),
    (0, (), (0,))])
def test_implementations_agree(vmap_axes, trace_axes, diagonal_axes):
    init_fn, apply_fn = _fcn()
    x1 = _x(1, (3, 4, 4, 2))
    x2 = x1[:3] * 0.5 if 0 in diagonal_axes else _x(2, (2, 4, 4, 2))
    key = jax.random.PRNGKey(3)
    results = [mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, trace_axes=trace_axes,
                                           diagonal_axes=diagonal_axes, vmap_axes=vmap_axes,
                                           implementation=i)(x1, x2, "ntk") for i in (0, 1, 2)]
    close(results[1], results[0])
    close(results[2], results[1])


def test_vmap_axes_match_without():
    init_fn, apply_fn = _mlp()
    x1, x2 = _x(1, (3, 3)), _x(2, (2, 3))
    key = jax.random.PRNGKey(4)
    a = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2)(x1, x2)
    b = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, vmap_axes=0)(x1, x2)
    c = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, vmap_axes=(0, 0, {}))(x1, x2)
    close(b, a)
    close(c, a)


def test_vmap_axes_non_leading_and_kwargs():
    """Batch axis 1 for inputs and outputs, and a per-example keyword argument."""
    def init_fn(key, shape):
        return shape, {"w": jax.random.normal(key, (shape[-1], 3))}

    def apply_fn(params, x, bias):  # x: (T, N, D), bias: (N, 3)
        return jnp.tanh(x @ params["w"] + bias[None])

    x1, x2 = _x(1, (2, 4, 5)), _x(2, (2, 3, 5))
    b1, b2 = _x(3, (4, 3)), _x(4, (3, 3))
    key = jax.random.PRNGKey(5)
    kw = dict(trace_axes=(-1,), diagonal_axes=())
    plain = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, **kw)(x1, x2, "ntk",
                                                                         bias=(b1, b2))
    mapped = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, vmap_axes=(1, 1, {"bias": 0}),
                                         **kw)(x1, x2, "ntk", bias=(b1, b2))
    chex.assert_shape(plain, (2, 2, 4, 3))
    close(mapped, plain)


def test_x2_none_and_x2_equal_to_x1_follow_the_key_rule():
    """``x2=None`` and an x2 equal to x1 give f(x2) x1's dropout key. Both take the
    symmetric path (f(x1) serves both sides), so they are checked against the reference,
    which computes f(x2) on its own; a 2-tuple keyword (ignored by the model) forces the
    general path, which computes f(x2) on its own too."""
    init_fn, apply_fn = stax_serial(stax.Dense(8), stax.Relu, stax.Dropout(0.7, mode="train"),
                                    stax.Dense(2))
    x = _x(1, (4, 3))
    key = jax.random.PRNGKey(6)
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 3)
    expected = reference.monte_carlo(init_fn, apply_fn, key, 3, x, None)
    expected = mcntk.EmpiricalKernel(expected["nngp"], expected["ntk"])
    for x2, kwargs in [(None, {}), (x + 0.0, {}), (None, {"unused": (0, 0)}),
                       (x + 0.0, {"unused": (0, 0)})]:
        close(kf(x, x2, None, **kwargs), expected, rtol=2e-4)
    # the comparison has teeth: an x2 off by rounding gets the folded key, other masks
    nearly = kf(x, x * (1 + 1e-6), None, unused=(0, 0))
    assert np.abs(np.asarray(nearly.ntk) - expected.ntk).max() > 0.05 * np.abs(expected.ntk).max()


def test_jitted_kernel_fn_inputs_and_lenient_apply():
    """A jitted apply_fn is accepted and still gets rng."""
    init_fn, apply_fn = stax.serial(stax.Dense(8), stax.Relu, stax.Dropout(0.5, mode="train"),
                                    stax.Dense(2))
    jitted = jax.jit(lenient(apply_fn))
    x = _x(1, (4, 3))
    a = mcntk.monte_carlo_kernel_fn(init_fn, jitted, jax.random.PRNGKey(7), 2)(x, None, "nngp")
    b = mcntk.monte_carlo_kernel_fn(init_fn, lenient(apply_fn), jax.random.PRNGKey(7), 2)(
        x, None, "nngp")
    close(a, b)


def test_typed_key_matches_raw_key():
    init_fn, apply_fn = _mlp()
    x = _x(1, (2, 3))
    raw = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(8), 2)(x, None, "ntk")
    typed = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.wrap_key_data(
        jax.random.PRNGKey(8)), 2)(x, None, "ntk")
    close(typed, raw)


@pytest.mark.parametrize("vmap_axes", [None, 0])
@pytest.mark.parametrize("x2_none", [True, False])
def test_vector_products_in_chunks(monkeypatch, vmap_axes, x2_none):
    """Bounding the tangents in flight (lax.map in chunks) does not change the kernel."""
    from mcntk.ntk import vector_products

    init_fn, apply_fn = _fcn()
    x1 = _x(1, (3, 4, 4, 2))
    x2 = None if x2_none else _x(2, (2, 4, 4, 2))
    params = init_fn(jax.random.PRNGKey(0), x1.shape)[1]
    make = lambda impl: mcntk.empirical_ntk_fn(apply_fn, trace_axes=(-1,), vmap_axes=vmap_axes,
                                               implementation=impl)
    ref = make(1)(x1, x2, params)
    monkeypatch.setattr(vector_products, "_MAX_IN_FLIGHT", 5)
    close(make(2)(x1, x2, params), ref)


def test_reads_rng_follows_the_key_through_sub_programs():
    """Mirroring blocks of x2=None needs outputs that do not depend on the rng; the
    decision follows the key into jitted calls and control flow."""
    from mcntk import _inputs, _planning

    side = _inputs.prepare(_x(1, (4, 3)), None, {}, None).side1
    params = jnp.ones((3,))
    key = jax.random.PRNGKey(0)
    noise = lambda k, x: jax.random.bernoulli(k, 0.5, x.shape) * x
    models = {
        "ignored": (lambda p, x, rng=None: x @ p, False),
        "split, unused": (lambda p, x, rng=None: (jax.random.split(rng), x @ p)[1], False),
        "drawn": (lambda p, x, rng=None: noise(rng, x) @ p, True),
        "inside jit": (lambda p, x, rng=None: jax.jit(noise)(rng, x) @ p, True),
        "inside cond": (lambda p, x, rng=None: jax.lax.cond(
            p[0] > 0, noise, lambda k, x: x, rng, x) @ p, True),
        "tuple output": (lambda p, x, rng=None: (x @ p, noise(rng, x)), True),
    }
    for name, (apply_fn, expected) in models.items():
        assert _planning._reads_rng(apply_fn, params, side, key) == expected, name
