"""The host-stepped sampler (mcntk._sampler._stepped): on one CPU device, a kernel
with a convolution runs one compiled call per sample and block instead of inside an
XLA loop. It must give the numbers of the in-program loop, and of the brute-force
reference, with every run feature (blocks, x2=None, stderr, generators, failures)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax

import mcntk
from mcntk import _sampler
from mcntk.errors import NonFiniteSampleError
from tests.mcntk_reference import depthwise_network, monte_carlo, stax_serial

NI = mcntk.NtkImplementation
NAMES = ("nngp", "ntk")


def _cnn():
    return stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu,
                       stax.Conv(3, (2, 2)), stax.Flatten, stax.Dense(2))


def _x(seed, n):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, 5, 5, 2))


@pytest.fixture
def spy(monkeypatch):
    """Counts the stepped programs built."""
    built = []
    real = _sampler._stepped

    def stepped(*args, **kwargs):
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_sampler, "_stepped", stepped)
    return built


def test_has_convolution_looks_inside_sub_programs():
    x = jnp.ones((1, 4, 4, 2))
    w = jnp.ones((3, 3, 2, 2))
    conv = lambda x: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    has = lambda f: _sampler.has_convolution(jax.make_jaxpr(f)(x))
    assert has(conv)
    assert has(lambda x: jax.lax.cond(x.sum() > 0, conv, lambda x: x, x))
    assert has(lambda x: jax.lax.scan(lambda c, _: (conv(c), None), x, None, length=2)[0])
    assert has(lambda x: jax.jit(conv)(x))
    assert has(lambda x: jax.grad(lambda v: conv(v).sum())(x))
    assert not has(lambda x: jnp.tanh(x @ jnp.ones((2, 3))))
    assert not has(lambda x: jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x))


def test_convolutions_are_stepped_and_dense_models_are_not(spy):
    init_fn, apply_fn = _cnn()
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2)
    kf(_x(1, 3), _x(2, 2), NAMES)
    assert len(spy) == 1
    mlp = stax_serial(stax.Flatten, stax.Dense(3), stax.Relu, stax.Dense(2))
    kf = mcntk.monte_carlo_kernel_fn(*mlp, jax.random.PRNGKey(0), 2)
    kf(_x(1, 3), _x(2, 2), NAMES)
    assert len(spy) == 1


@pytest.mark.parametrize("impl", [NI.JACOBIAN_CONTRACTION, NI.NTK_VECTOR_PRODUCTS,
                                  NI.STRUCTURED_DERIVATIVES])
@pytest.mark.parametrize("symmetric", [False, True])
def test_stepped_matches_the_reference_with_blocks(impl, symmetric, spy):
    init_fn, apply_fn = _cnn()
    key = jax.random.PRNGKey(3)
    x1 = _x(1, 5)
    x2 = None if symmetric else _x(2, 3)
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 3, batch_size=2,
                                     implementation=impl)
    got = kf(x1, x2, NAMES)
    assert spy, "the stepped program was not used"
    want = monte_carlo(init_fn, apply_fn, key, 3, x1, x2, rng=False)
    for name in NAMES:
        np.testing.assert_allclose(getattr(got, name), want[name], rtol=2e-5, atol=1e-6)


def test_stepped_equals_the_in_program_loop(monkeypatch, spy):
    """Same key, same numbers: standard errors, generator counts, blocks, dropout."""
    init_fn, apply_fn = stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu,
                                    stax.Dropout(0.7, mode="train"), stax.Flatten,
                                    stax.Dense(2))
    key = jax.random.PRNGKey(7)
    x1, x2 = _x(1, 5), _x(2, 4)

    def run():
        kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, (2, 5), batch_size=2,
                                         stderr=True)
        return [jax.tree.map(np.asarray, e) for e in kf(x1, x2, NAMES)]

    stepped = run()
    assert spy
    monkeypatch.setattr(_sampler, "has_convolution", lambda closed, grouped=False: False)
    count = len(spy)
    looped = run()
    assert len(spy) == count  # the second run did not step
    for a, b in zip(stepped, looped):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_non_finite_sample_is_named_when_stepped(spy):
    init_fn, apply_fn = _cnn()
    key = jax.random.PRNGKey(0)
    chain = key
    for _ in range(3):
        chain, _ = jax.random.split(chain)
    bad_key = jax.random.split(jax.random.split(chain)[1])[0]

    def init(k, shape):
        out, params = init_fn(k, shape)
        (w, b), *rest = params
        return out, [(jnp.where(jnp.all(k == bad_key), jnp.nan, 1.0) * w, b), *rest]

    kf = mcntk.monte_carlo_kernel_fn(init, apply_fn, key, 6, batch_size=2)
    with pytest.raises(NonFiniteSampleError, match=r"sample 3 \(0-based\)") as info:
        kf(_x(1, 4), _x(2, 3), NAMES)
    assert spy
    assert info.value.sample == 3 and info.value.block == (0, 0)
    fine = mcntk.monte_carlo_kernel_fn(init, apply_fn, key, 3, batch_size=2)
    assert np.isfinite(np.asarray(fine(_x(1, 4), _x(2, 3), "ntk"))).all()


def test_has_convolution_tells_grouped_ones():
    x = jnp.ones((1, 4, 4, 2))
    plain = jax.make_jaxpr(lambda x: jax.lax.conv_general_dilated(
        x, jnp.ones((3, 3, 2, 2)), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x)
    grouped = jax.make_jaxpr(lambda x: depthwise_network()[1](depthwise_network()[0](
        jax.random.PRNGKey(0), x.shape)[1], x))(x)
    assert _sampler.has_convolution(plain) and not _sampler.has_convolution(plain, grouped=True)
    assert _sampler.has_convolution(grouped, grouped=True)


@pytest.mark.parametrize("impl", [NI.JACOBIAN_CONTRACTION, NI.NTK_VECTOR_PRODUCTS,
                                  NI.STRUCTURED_DERIVATIVES, NI.AUTO])
@pytest.mark.parametrize("batch_size", [0, 2])
def test_depthwise_convolution_matches_the_reference(impl, batch_size):
    """JAX cannot batch a grouped convolution's gradient under a mesh sharding; the
    stepped program runs it without one (one device)."""
    init_fn, apply_fn = depthwise_network()
    key = jax.random.PRNGKey(2)
    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 3))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 3))
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, batch_size=batch_size,
                                     implementation=impl)
    got = kf(x1, x2, NAMES)
    want = monte_carlo(init_fn, apply_fn, key, 2, x1, x2, rng=False)
    for name in NAMES:
        np.testing.assert_allclose(getattr(got, name), want[name], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("impl", [NI.JACOBIAN_CONTRACTION, NI.NTK_VECTOR_PRODUCTS,
                                  NI.STRUCTURED_DERIVATIVES])
def test_grouped_means_the_model_not_the_kernels_vmaps(impl, monkeypatch):
    """A kernel's per-example vmaps turn a plain convolution's gradient into grouped
    convolutions; only the model's own grouped convolutions count."""
    seen = []
    real = _sampler.make_program

    def spy(*args, **kwargs):
        seen.append(inspect.signature(real).bind(*args, **kwargs).arguments["grouped"])
        return real(*args, **kwargs)

    monkeypatch.setattr(_sampler, "make_program", spy)
    init_fn, apply_fn = _cnn()
    mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                implementation=impl)(_x(1, 3), _x(2, 2), NAMES)
    init_fn, apply_fn = depthwise_network()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 3))
    mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                implementation=impl)(x, None, NAMES)
    assert seen == [False, True]


def _unlowerable():
    """A model with an operation that has no lowering: NotImplementedError when compiled."""
    from jax.extend import core as jcore

    prim = jcore.Primitive("mcntk_test_without_lowering")
    prim.def_abstract_eval(lambda x: x)

    @jax.custom_jvp
    def op(x):
        return prim.bind(x)

    op.defjvp(lambda primals, tangents: (op(primals[0]), tangents[0]))

    def init_fn(key, shape):
        return (shape[0], 2), jax.random.normal(key, (shape[-1], 2))

    return init_fn, lambda w, x, **kw: op(x @ w)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_other_not_implemented_errors_are_not_explained_as_grouped_convolutions(get):
    init_fn, apply_fn = _unlowerable()
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2)
    with pytest.raises(NotImplementedError, match="mcntk_test_without_lowering") as info:
        kf(jax.random.normal(jax.random.PRNGKey(1), (3, 4)), None, get)
    assert not isinstance(info.value, mcntk.errors.NotYetImplementedError)
