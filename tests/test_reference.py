"""mcntk against the brute-force reference (explicit Jacobians, explicit axes rule)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import monte_carlo, stax_serial

import mcntk

N_SAMPLES = 2


def close(actual, expected, rtol=2e-4):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, (a.shape, e.shape)
        scale = max(np.abs(e).max(), 1e-6)
        assert np.abs(a - e).max() <= rtol * scale, np.abs(a - e).max() / scale


def field(result, name):
    """The kernel ``name`` of every output leaf: mcntk, like neural-tangents, returns the
    output's structure holding one namedtuple of kernels per output leaf."""
    is_kernels = lambda v: isinstance(v, tuple) and hasattr(v, "_fields")
    return jax.tree.map(lambda k: getattr(k, name), result, is_leaf=is_kernels)


def _x(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape)


MLP = (lambda: stax_serial(stax.Dense(8), stax.Relu, stax.Dense(3)), (5, 4), (3, 4))
CNN = (lambda: stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu, stax.Flatten,
                           stax.Dense(3)), (3, 5, 5, 2), (2, 5, 5, 2))
FCN = (lambda: stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu,
                           stax.Conv(3, (3, 3), padding="SAME")), (2, 4, 5, 2), (3, 4, 5, 2))
TUPLE = (lambda: stax_serial(stax.Dense(8), stax.Relu, stax.FanOut(2),
                             stax.parallel(stax.Dense(3), stax.Dense(2))), (4, 3), (2, 3))

CASES = {
    "mlp": (MLP, (-1,), ()),
    "mlp_no_trace": (MLP, (), ()),
    "mlp_diag_out": (MLP, (), (-1,)),
    "cnn": (CNN, (-1,), ()),
    "fcn_trace_c": (FCN, (-1,), ()),
    "fcn_diag_h": (FCN, (-1,), (1,)),
    "fcn_trace_hw": (FCN, (1, 2), ()),
    "fcn_diag_c": (FCN, (), (-1,)),
    "fcn_trace_hw_diag_c": (FCN, (1, 2), (3,)),
    "tuple": (TUPLE, (-1,), ()),
}


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("vmap_axes", [None, 0])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name, vmap_axes, implementation):
    (make, s1, s2), trace_axes, diagonal_axes = CASES[name]
    init_fn, apply_fn = make()
    x1, x2 = _x(1, s1), _x(2, s2)
    key = jax.random.PRNGKey(3)
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES,
                                            trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                                            vmap_axes=vmap_axes, implementation=implementation)
    expected = monte_carlo(init_fn, apply_fn, key, N_SAMPLES, x1, x2, trace_axes, diagonal_axes)
    got = kernel_fn(x1, x2)
    close(field(got, "nngp"), expected["nngp"])
    close(field(got, "ntk"), expected["ntk"])


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("diagonal_axes", [(), (0,)])
def test_x2_none_reference(implementation, diagonal_axes):
    init_fn, apply_fn = FCN[0]()
    x1 = _x(1, FCN[1])
    key = jax.random.PRNGKey(4)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES,
                                      diagonal_axes=diagonal_axes,
                                      implementation=implementation)(x1)
    expected = monte_carlo(init_fn, apply_fn, key, N_SAMPLES, x1, None, (-1,), diagonal_axes)
    close(got.nngp, expected["nngp"])
    close(got.ntk, expected["ntk"])


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("x2_kind", ["none", "equal", "other"])
def test_dropout_key_rule(implementation, x2_kind):
    init_fn, apply_fn = stax_serial(stax.Dense(16), stax.Relu, stax.Dropout(0.5, mode="train"),
                                    stax.Dense(3))
    x1 = _x(1, (4, 3))
    x2 = {"none": None, "equal": x1 + 0.0, "other": _x(2, (4, 3))}[x2_kind]
    key = jax.random.PRNGKey(5)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES,
                                      implementation=implementation)(x1, x2)
    expected = monte_carlo(init_fn, apply_fn, key, N_SAMPLES, x1, x2)
    close(got.nngp, expected["nngp"])
    close(got.ntk, expected["ntk"])
    if x2_kind != "other":  # the same key on both sides: a symmetric kernel
        np.testing.assert_allclose(got.nngp, got.nngp.T, rtol=1e-6, atol=1e-6)


def _pytree_model():
    def init_fn(key, input_shape):
        ka, kb, kv = jax.random.split(key, 3)
        params = {"wa": jax.random.normal(ka, (input_shape["a"][-1], 6)),
                  "wb": jax.random.normal(kb, (input_shape["b"][-1], 6)),
                  "v": jax.random.normal(kv, (6, 2))}
        return (input_shape["a"][0], 2), params

    def apply_fn(params, x):  # a plain f(params, x): no rng argument
        h = jax.nn.relu(x["a"] @ params["wa"] + x["b"] @ params["wb"])
        return {"out": h @ params["v"], "hidden": h}

    return init_fn, apply_fn


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("vmap_axes", [None, 0])
def test_pytree_inputs_and_outputs(implementation, vmap_axes):
    init_fn, apply_fn = _pytree_model()
    x1 = {"a": _x(1, (3, 4)), "b": _x(2, (3, 2))}
    x2 = {"a": _x(3, (2, 4)), "b": _x(4, (2, 2))}
    key = jax.random.PRNGKey(6)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES, vmap_axes=vmap_axes,
                                      implementation=implementation)(x1, x2)
    expected = monte_carlo(init_fn, apply_fn, key, N_SAMPLES, x1, x2, rng=False)
    assert set(got) == {"out", "hidden"}  # the output's dict, one namedtuple per leaf
    for leaf in ("out", "hidden"):
        close(got[leaf].nngp, expected["nngp"][leaf])
        close(got[leaf].ntk, expected["ntk"][leaf])


def _kwargs_model():
    def init_fn(key, input_shape):
        return (input_shape[0], 2), {"w": jax.random.normal(key, (input_shape[-1], 2))}

    def apply_fn(params, x, scale=1.0, shift=None, **kwargs):
        del kwargs
        out = jnp.tanh(x @ params["w"]) * scale
        return out if shift is None else out + shift

    return init_fn, apply_fn


@pytest.mark.parametrize("implementation", [1, 2])
def test_kwargs_split_and_shared(implementation):
    init_fn, apply_fn = _kwargs_model()
    x1, x2 = _x(1, (3, 4)), _x(2, (2, 4))
    shift = jnp.array([[0.5, -0.5]])
    key = jax.random.PRNGKey(7)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES,
                                      implementation=implementation)(
        x1, x2, None, scale=(2.0, 3.0), shift=shift)

    total = None
    k = key
    for _ in range(N_SAMPLES):
        k, split = jax.random.split(k)
        init_key, _ = jax.random.split(split)
        params = init_fn(init_key, x1.shape)[1]
        f1 = lambda p: apply_fn(p, x1, scale=2.0, shift=shift)
        f2 = lambda p: apply_fn(p, x2, scale=3.0, shift=shift)
        j1, j2 = jax.jacobian(f1)(params)["w"], jax.jacobian(f2)(params)["w"]
        ntk = np.einsum("icab,jcab->ij", j1, j2) / 2
        nngp = np.einsum("ic,jc->ij", f1(params), f2(params)) / 2
        total = (ntk, nngp) if total is None else (total[0] + ntk, total[1] + nngp)
    close(got.ntk, total[0] / N_SAMPLES)
    close(got.nngp, total[1] / N_SAMPLES)


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("vmap_axes", [None, 0])
def test_static_scalar_kwargs_with_vmap_axes(implementation, vmap_axes):
    """Python scalars stay static, also on the per-example path: the model branches on them."""
    init_fn, _ = _kwargs_model()

    def apply_fn(params, x, train=True, scale=1.0):
        out = jnp.tanh(x @ params["w"])
        if train:  # a Python branch: fails if `train` were traced
            out = out * 0.0
        return out * scale

    x1, x2 = _x(1, (3, 4)), _x(2, (2, 4))
    key = jax.random.PRNGKey(8)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES, vmap_axes=vmap_axes,
                                      implementation=implementation)(
        x1, x2, None, train=False, scale=2.0)
    expected = monte_carlo(init_fn, apply_fn, key, N_SAMPLES, x1, x2,
                           kwargs=dict(train=False, scale=2.0), rng=False)
    close(got.nngp, expected["nngp"])
    close(got.ntk, expected["ntk"])
    emp = mcntk.empirical_ntk_fn(apply_fn, vmap_axes=vmap_axes, implementation=implementation)
    params = init_fn(key, x1.shape)[1]
    assert np.abs(np.asarray(emp(x1, x2, params, train=False, scale=2.0))).max() > 0


@pytest.mark.parametrize("implementation", [1, 2])
def test_pair_kwargs_with_x2_none_mean_x2_is_x1(implementation):
    init_fn, apply_fn = _kwargs_model()
    x1 = _x(1, (3, 4))
    key = jax.random.PRNGKey(9)
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES,
                                     implementation=implementation)
    expected = monte_carlo(init_fn, apply_fn, key, N_SAMPLES, x1, None,
                           kwargs={"scale": 2.0}, kwargs2={"scale": 3.0})
    for x2 in (None, x1):
        got = kf(x1, x2, None, scale=(2.0, 3.0))
        close(got.ntk, expected["ntk"])
        close(got.nngp, expected["nngp"])
    # and it is not the kernel with scale 2.0 on both sides
    both = monte_carlo(init_fn, apply_fn, key, N_SAMPLES, x1, None, kwargs={"scale": 2.0})
    assert np.abs(both["ntk"] - expected["ntk"]).max() > 0.1 * np.abs(expected["ntk"]).max()


@pytest.mark.parametrize("implementation", [1, 2])
def test_tuple_output_nests_like_neural_tangents(implementation):
    """Code ported from neural-tangents indexes the output first: ``r[0].nngp``."""
    (make, s1, s2), _, _ = CASES["tuple"]
    init_fn, apply_fn = make()
    x1, x2 = _x(1, s1), _x(2, s2)
    key = jax.random.PRNGKey(3)
    r = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES,
                                    implementation=implementation)(x1, x2, ("nngp", "ntk"))
    expected = monte_carlo(init_fn, apply_fn, key, N_SAMPLES, x1, x2)
    assert isinstance(r, list) and len(r) == 2 and r[0]._fields == ("nngp", "ntk")  # stax: list
    for i in range(2):
        close(r[i].nngp, expected["nngp"][i])
        close(r[i].ntk, expected["ntk"][i])
    single = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES,
                                         implementation=implementation)(x1, x2, "ntk")
    assert isinstance(single, list) and len(single) == 2  # one kernel per output leaf
    close(single[1], expected["ntk"][1])
    # the empirical kernel nests the same way
    params = init_fn(jax.random.PRNGKey(0), x1.shape)[1]
    emp = mcntk.empirical_kernel_fn(apply_fn, implementation=implementation)(x1, x2, None, params)
    one = monte_carlo(lambda k, s: (None, params), apply_fn, key, 1, x1, x2)
    assert emp[1]._fields == ("nngp", "ntk")
    close(emp[1].ntk, one["ntk"][1])
    close(emp[0].nngp, one["nngp"][0])
