"""The public API: get, result types, shape rule, empirical building blocks, AUTO."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import kernels, monte_carlo, stax_serial

import mcntk
from mcntk.ntk import auto


def _conv():
    return stax_serial(stax.Conv(3, (3, 3), padding="SAME"))


SHAPE_ROWS = [  # (trace_axes, diagonal_axes, x2 is None, kernel shape) for outputs (N, 5, 6, 3)
    ((-1,), (), False, (2, 3, 5, 5, 6, 6)),
    ((), (), False, (2, 3, 5, 5, 6, 6, 3, 3)),
    ((-1,), (1,), False, (2, 3, 5, 6, 6)),
    ((1, 2), (), False, (2, 3, 3, 3)),
    ((), (-1,), False, (2, 3, 5, 5, 6, 6, 3)),
    ((-1,), (0,), True, (2, 5, 5, 6, 6)),
]


@pytest.mark.parametrize("trace_axes,diagonal_axes,x2_none,shape", SHAPE_ROWS)
@pytest.mark.parametrize("implementation", [1, 2])
def test_shape_rule(trace_axes, diagonal_axes, x2_none, shape, implementation):
    init_fn, apply_fn = _conv()
    x1 = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 2))
    x2 = None if x2_none else jax.random.normal(jax.random.PRNGKey(2), (3, 5, 6, 2))
    _, params = init_fn(jax.random.PRNGKey(0), x1.shape)
    k = mcntk.empirical_kernel_fn(apply_fn, trace_axes, diagonal_axes,
                                  implementation=implementation)(x1, x2, None, params)
    chex.assert_shape([k.nngp, k.ntk], shape)
    ref = kernels(apply_fn, params, x1, x2, trace_axes, diagonal_axes)
    np.testing.assert_allclose(k.ntk, ref["ntk"], rtol=2e-4, atol=2e-4 * np.abs(ref["ntk"]).max())
    np.testing.assert_allclose(k.nngp, ref["nngp"], rtol=2e-4,
                               atol=2e-4 * np.abs(ref["nngp"]).max())


def test_shape_rule_monte_carlo():
    init_fn, apply_fn = _conv()
    x1 = jnp.ones((2, 5, 6, 2))
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                     trace_axes=(), diagonal_axes=(-1,))
    chex.assert_shape(kf(x1, x1[:1] * 2, "ntk"), (2, 1, 5, 5, 6, 6, 3))


@pytest.fixture
def mlp():
    return stax_serial(stax.Dense(4), stax.Relu, stax.Dense(2))


def test_get_forms(mlp):
    init_fn, apply_fn = mlp
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 2))
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2)
    both = kf(x)
    assert type(both) is mcntk.EmpiricalKernel
    ntk_first = kf(x, None, ("NTK", "nngp"))
    assert type(ntk_first).__name__ == "MonteCarloKernel"
    assert ntk_first._fields == ("ntk", "nngp")
    pair = kf(x, None, ["nngp", "ntk"])
    assert type(pair).__name__ == "MonteCarloKernel" and pair._fields == ("nngp", "ntk")
    single = kf(x, None, "Ntk")
    assert isinstance(single, jax.Array)
    only = kf(x, None, ("nngp",))
    assert only._fields == ("nngp",)
    # every value against the brute-force reference, not against another get form
    expected = monte_carlo(init_fn, apply_fn, jax.random.PRNGKey(0), 2, x)
    for result in (both, ntk_first, pair, only):
        for name in result._fields:
            np.testing.assert_allclose(getattr(result, name), expected[name], rtol=1e-4,
                                       atol=1e-5)
    np.testing.assert_allclose(single, expected["ntk"], rtol=1e-4, atol=1e-5)
    emp = mcntk.empirical_kernel_fn(apply_fn)
    params = init_fn(jax.random.PRNGKey(0), x.shape)[1]
    assert type(emp(x, None, None, params)) is mcntk.EmpiricalKernel
    assert type(emp(x, None, ("ntk",), params)).__name__ == "EmpiricalKernel"


def test_only_requested_kernels_computed():
    @jax.custom_jvp
    def no_derivative(x):
        return x

    @no_derivative.defjvp
    def _jvp(primals, tangents):
        raise AssertionError("the NTK was computed but only the NNGP was asked for")

    def apply_fn(params, x):
        return no_derivative(x @ params)

    params = jnp.ones((2, 3))
    x = jnp.ones((4, 2))
    for impl in (0, 1, 2):
        emp = mcntk.empirical_kernel_fn(apply_fn, implementation=impl)
        chex.assert_shape(emp(x, None, "nngp", params), (4, 4))
        with pytest.raises(AssertionError, match="only the NNGP"):
            emp(x, None, "ntk", params)
    init_fn = lambda key, shape: (shape, jax.random.normal(key, (2, 3)))
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 3)
    chex.assert_shape(kf(x, None, "nngp"), (4, 4))


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("x2_none", [True, False])
def test_one_forward_pass_serves_both(implementation, x2_none):
    """The computed program holds one forward pass per input (counted as tanh operations
    in its jaxpr; abstract shape checks do not count: they compute nothing). On the
    whole-batch path: per-example vector products recompute the primal in each JVP."""
    def apply_fn(params, x):
        return jnp.tanh(x @ params)

    params = jnp.ones((2, 3))
    x1, x2 = jnp.ones((4, 2)), jnp.full((5, 2), 0.5)
    emp = mcntk.empirical_kernel_fn(apply_fn, implementation=implementation,
                                    detect_vmap_axes=False)
    jaxpr = jax.make_jaxpr(lambda p: emp(x1, None if x2_none else x2, ("nngp", "ntk"), p))(
        params)
    assert str(jaxpr).count(" tanh ") == (1 if x2_none else 2), jaxpr


def test_empirical_functions_match_reference(mlp):
    init_fn, apply_fn = mlp
    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 2))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (4, 2))
    params = init_fn(jax.random.PRNGKey(0), x1.shape)[1]
    ref = kernels(apply_fn, params, x1, x2, (), ())
    nngp = mcntk.empirical_nngp_fn(apply_fn, trace_axes=())(x1, x2, params)
    np.testing.assert_allclose(nngp, ref["nngp"], rtol=1e-4, atol=1e-5)
    for impl in mcntk.NtkImplementation:
        ntk = mcntk.empirical_ntk_fn(apply_fn, (), (), 0, impl)(x1, x2, params)
        np.testing.assert_allclose(ntk, ref["ntk"], rtol=1e-4, atol=1e-5)


def test_empirical_rng_rule():
    init_fn, apply_fn = stax_serial(stax.Dense(8), stax.Dropout(0.5, mode="train"))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 2))
    params = init_fn(jax.random.PRNGKey(0), x.shape)[1]
    rng = jax.random.PRNGKey(3)
    emp = mcntk.empirical_nngp_fn(apply_fn)
    f1 = apply_fn(params, x, rng=rng)
    for x2 in (None, x + 0.0):  # f(x2) gets x1's key
        np.testing.assert_allclose(emp(x, x2, params, rng=rng), f1 @ f1.T / 8, rtol=1e-5,
                                   atol=1e-6)
    f2 = apply_fn(params, 2 * x, rng=jax.random.fold_in(rng, 1))
    np.testing.assert_allclose(emp(x, 2 * x, params, rng=rng), f1 @ f2.T / 8, rtol=1e-5,
                               atol=1e-6)


def test_auto_choice_is_cached(monkeypatch, mlp):
    init_fn, apply_fn = mlp
    calls = []
    real = auto.cost
    monkeypatch.setattr(auto, "cost", lambda *a: calls.append(1) or real(*a))
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 2))
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1)
    kf(x, None, "ntk")
    first = len(calls)
    assert first == len(auto.IMPLEMENTATIONS) == 3
    kf(x, None, "ntk")
    assert len(calls) == first
    kf(x[:5], None, "ntk")  # a new shape is costed again
    assert len(calls) == 2 * first


def _auto_case(widths, n, trace_axes, vmap_axes):
    """``tanh(x @ w) @ v`` with x (n, d), w (d, h), v (h, k); ``make`` for auto.choose."""
    d, h, k = widths

    def apply_fn(params, x):
        return jnp.tanh(x @ params["w"]) @ params["v"]

    params = {"w": jnp.ones((d, h)) / d, "v": jnp.ones((h, k)) / h}
    x = jnp.ones((n, d))

    def make(impl, options=mcntk.ntk.DEFAULT_OPTIONS):
        spec = mcntk.empirical.KernelSpec(apply_fn, trace_axes, (), vmap_axes, impl)
        return lambda p, a: spec.kernels(("ntk",), p, a, None, {}, {}, impl, options)

    return make, (params, x)


@pytest.mark.parametrize("case", [((3, 2000, 1), 30, (-1,), None),
                                  ((3, 10, 200), 30, (), None),
                                  ((8, 16, 4), 6, (), 0)])
def test_auto_takes_the_lowest_cost(case):
    """The choice is the candidate of lowest FLOPs + BYTE_COST x bytes, among all three."""
    make, args = _auto_case(*case)
    costing = mcntk.ntk.Options(loop_free=True)
    details = {impl: auto.cost(make(impl, costing), *args) for impl in auto.IMPLEMENTATIONS}
    assert set(details) == {1, 2, 3}
    assert all(0 < d.flops < float("inf") and d.bytes > 0 for d in details.values()), details
    choice = auto.choose(make, args)
    totals = {impl: d.flops + auto.BYTE_COST * d.bytes for impl, d in details.items()}
    assert choice.implementation == min(totals, key=totals.get)
    assert choice.costs == pytest.approx(totals)


def test_auto_prefers_structured_derivatives_for_a_wide_mlp():
    """Like issue 8's W1 (an MLP 32-512-10, per example): JC materialises Jacobians and
    VP runs hundreds of VJP/JVP pairs, while SD needs a Gram of layer inputs and one of
    cotangents per layer."""
    make, args = _auto_case((32, 512, 10), 64, (-1,), 0)
    choice = auto.choose(make, args)
    assert choice.implementation == mcntk.NtkImplementation.STRUCTURED_DERIVATIVES
    text = str(choice)
    assert text.startswith("STRUCTURED_DERIVATIVES: lowest estimated cost")
    for name in ("JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "FLOPs", "bytes"):
        assert name in text


def test_import_is_light():
    code = ("import sys, mcntk; bad = [m for m in ('flax', 'haiku', 'equinox', 'optax', "
            "'matplotlib', 'tqdm', 'orbax') if m in sys.modules]; print(bad); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    assert mcntk.NtkImplementation.AUTO == 0
    assert mcntk.NtkImplementation.JACOBIAN_CONTRACTION == 1
    assert mcntk.NtkImplementation.NTK_VECTOR_PRODUCTS == 2
    assert mcntk.NtkImplementation.STRUCTURED_DERIVATIVES == 3
    for name in mcntk.__all__:
        assert getattr(mcntk, name).__doc__, name


@pytest.mark.parametrize("module", ["mcntk.monte_carlo", "mcntk.empirical"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    with jax.numpy_rank_promotion("allow"):  # the examples use jax.example_libraries.stax
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_errors_have_help_pages():
    from mcntk import errors

    for name in ("NotYetImplementedError", "MissingFrameworkError", "UnsupportedModelError",
                 "StateMutationError"):
        assert len(getattr(errors, name).__doc__) > 100
    from mcntk import adapters

    assert adapters.StateMutationError is errors.StateMutationError
