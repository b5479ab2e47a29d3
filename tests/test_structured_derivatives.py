"""``implementation=STRUCTURED_DERIVATIVES`` (3) against Jacobian contraction (1), the
brute-force reference, and the structure it is meant to find."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import monte_carlo, stax_serial

import mcntk
from mcntk import _apply, adapters
from mcntk.ntk import _program, _structure

SD, JC = 3, 1
RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, (a.shape, e.shape)
        scale = max(np.abs(e).max(), 1e-30)
        assert np.abs(a - e).max() <= rtol * scale, np.abs(a - e).max() / scale


def _x(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def agree(apply_fn, params, x1, x2, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None,
          **kwargs):
    """SD and JC give the same kernels through ``empirical_kernel_fn`` (jitted: one
    compilation is faster than running op by op); returns SD's NTK."""
    got = {}
    for impl in (SD, JC):
        kernel_fn = mcntk.empirical_kernel_fn(apply_fn, trace_axes, diagonal_axes, vmap_axes,
                                              implementation=impl)
        got[impl] = jax.jit(lambda p, a, b, kw, f=kernel_fn: f(a, b, "ntk", p, **kw))(
            params, x1, x2, kwargs)
    assert_close(got[SD], got[JC])
    return got[SD]


def structure(apply_fn, params, x, **kwargs):
    """The structure SD finds in ``apply_fn(params, x)``: per trainable leaf (in
    ``jax.tree.leaves`` order), the kinds of its uses or ``'jacobian'``."""
    trainable, merge = _apply.split_trainable(params)
    program = _program.trace(lambda p: apply_fn(merge(p), x, **kwargs), trainable)
    found = _structure.analyse(program, len(trainable))
    found, _ = _structure.pair(found, found)
    return ["jacobian" if i in found.unstructured else sorted(u.kind for u in uses)
            for i, uses in enumerate(found.uses)]


# --- stax models -----------------------------------------------------------------------

MLP = (lambda: stax_serial(stax.Dense(8), stax.Relu, stax.Dense(3)), (5, 4), (3, 4))
CNN = (lambda: stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu, stax.Flatten,
                           stax.Dense(3)), (3, 5, 5, 2), (2, 5, 5, 2))
POOL = (lambda: stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu,
                            stax.AvgPool((2, 2)), stax.Conv(3, (2, 2)), stax.MaxPool((2, 2)),
                            stax.Flatten, stax.Dense(3)), (2, 6, 6, 2), (3, 6, 6, 2))
FCN = (lambda: stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu,
                           stax.Conv(3, (3, 2), strides=(2, 1), padding="VALID")),
       (2, 7, 5, 2), (3, 7, 5, 2))
TUPLE = (lambda: stax_serial(stax.Dense(8), stax.Relu, stax.FanOut(2),
                             stax.parallel(stax.Dense(3), stax.Dense(2))), (4, 3), (2, 3))
# a conv, then only linear layers: the conv's cotangents do not depend on the example
LINEAR_HEAD = (lambda: stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu,
                                   stax.Conv(3, (2, 2), padding="SAME"), stax.Flatten,
                                   stax.Dense(3)), (3, 4, 4, 2), (2, 4, 4, 2))
DENSE_HEAD = (lambda: stax_serial(stax.Dense(8), stax.Relu, stax.Dense(6), stax.Dense(3)),
              (5, 4), (3, 4))

CASES = {
    "mlp": (MLP, (-1,), ()),
    "mlp_no_trace": (MLP, (), ()),
    "mlp_diag_out": (MLP, (), (-1,)),
    "cnn": (CNN, (-1,), ()),
    "pool": (POOL, (-1,), ()),
    "fcn_trace_c": (FCN, (-1,), ()),
    "fcn_no_trace": (FCN, (), ()),
    "fcn_trace_hw": (FCN, (1, 2), ()),
    "fcn_diag_h": (FCN, (-1,), (1,)),
    "fcn_trace_hw_diag_c": (FCN, (1, 2), (3,)),
    "tuple": (TUPLE, (-1,), ()),
    "linear_head": (LINEAR_HEAD, (-1,), ()),
    "linear_head_no_trace": (LINEAR_HEAD, (), ()),
    "dense_head": (DENSE_HEAD, (-1,), ()),
}


# each case with and without vmap_axes, or with x2 None, not every combination: CI time
COMBINATIONS = [("mlp", None, False), ("mlp", 0, True), ("mlp_no_trace", 0, False),
                ("mlp_diag_out", None, True), ("cnn", 0, False), ("cnn", None, True),
                ("pool", None, False), ("fcn_trace_c", None, False),
                ("fcn_no_trace", 0, True), ("fcn_trace_hw", 0, False),
                ("fcn_diag_h", None, False), ("fcn_diag_h", 0, True),
                ("fcn_trace_hw_diag_c", 0, False), ("tuple", None, False), ("tuple", 0, True),
                ("linear_head", 0, False), ("linear_head", None, True),
                ("linear_head_no_trace", 0, False), ("dense_head", 0, True),
                ("dense_head", None, False)]


@pytest.mark.parametrize("name,vmap_axes,x2_none", COMBINATIONS)
def test_stax_models_agree_with_jacobian_contraction(name, vmap_axes, x2_none):
    (make, s1, s2), trace_axes, diagonal_axes = CASES[name]
    init_fn, apply_fn = make()
    params = init_fn(jax.random.PRNGKey(0), s1)[1]
    x2 = None if x2_none else _x(2, s2)
    agree(apply_fn, params, _x(1, s1), x2, trace_axes, diagonal_axes, vmap_axes)


@pytest.mark.parametrize("name,x2_none", [("linear_head", False), ("dense_head", True)])
def test_example_independent_cotangents_are_found(monkeypatch, name, x2_none):
    """Cotangents behind only linear layers are computed once, without an example
    axis (a spy on the decision), and the kernel still agrees with JC."""
    from mcntk.ntk import structured_derivatives as sd

    decided = []
    real = sd._cotangent_axes

    def spy(*args):
        axes = real(*args)
        decided.append([a for leaf in axes for a in leaf.values()])
        return axes

    monkeypatch.setattr(sd, "_cotangent_axes", spy)
    (make, s1, s2), trace_axes, _ = CASES[name]
    init_fn, apply_fn = make()
    params = init_fn(jax.random.PRNGKey(0), s1)[1]
    agree(apply_fn, params, _x(1, s1), None if x2_none else _x(2, s2), trace_axes,
          vmap_axes=0)
    assert decided and all(None in d and 0 in d for d in decided), decided


@pytest.mark.parametrize("name", ["dense_head", "linear_head"])
@pytest.mark.parametrize("trace_axes,diagonal_axes", [((0,), ()), ((0, -1), ()), ((), (0,))])
def test_example_axis_traced_or_diagonal_with_independent_cotangents(name, trace_axes,
                                                                     diagonal_axes):
    """A bias behind a linear head has an example-independent cotangent: tracing the
    example axis must still sum its term over the examples (found by review)."""
    (make, s1, _), _, _ = CASES[name]
    init_fn, apply_fn = make()
    params = init_fn(jax.random.PRNGKey(0), s1)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the traced-example-axis warning
        for vmap_axes in (0, None):
            agree(apply_fn, params, _x(1, s1), _x(2, s1), trace_axes, diagonal_axes, vmap_axes)


def test_monte_carlo_with_independent_cotangents_matches_reference():
    (make, s1, s2), _, _ = CASES["linear_head"]
    init_fn, apply_fn = make()
    x1, x2 = _x(1, s1), _x(2, s2)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(3), 3, vmap_axes=0,
                                      implementation=SD)(x1, x2, "ntk")
    assert_close(got, monte_carlo(init_fn, apply_fn, jax.random.PRNGKey(3), 3, x1, x2)["ntk"])


def test_batch_axis_diagonal():
    init_fn, apply_fn = FCN[0]()
    params = init_fn(jax.random.PRNGKey(0), FCN[1])[1]
    agree(apply_fn, params, _x(1, FCN[1]), _x(2, FCN[1]), (-1,), (0, 2), vmap_axes=0)


@pytest.mark.parametrize("name,shape", [("mlp", MLP[1]), ("cnn", CNN[1]), ("pool", POOL[1]),
                                        ("fcn", FCN[1])])
def test_stax_layers_are_all_structured(name, shape):
    make = {"mlp": MLP, "cnn": CNN, "pool": POOL, "fcn": FCN}[name][0]
    init_fn, apply_fn = make()
    params = init_fn(jax.random.PRNGKey(0), shape)[1]
    found = structure(apply_fn, params, _x(1, shape))
    assert "jacobian" not in found and all(found), found


def test_monte_carlo_matches_reference():
    """A fully-convolutional net with a diagonal spatial axis, x2 None, per example.
    (The MLP and CNN goldens of neural-tangents' implementation 3 are in test_golden.)"""
    (make, shape, _), trace_axes, diagonal_axes = CASES["fcn_diag_h"]
    init_fn, apply_fn = make()
    x1, key = _x(1, shape), jax.random.PRNGKey(3)
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, trace_axes=trace_axes,
                                            diagonal_axes=diagonal_axes, vmap_axes=0,
                                            implementation=SD)
    expected = monte_carlo(init_fn, apply_fn, key, 2, x1, None, trace_axes, diagonal_axes)
    got = kernel_fn(x1, None)
    assert_close(got.ntk, expected["ntk"], rtol=2e-4)
    assert_close(got.nngp, expected["nngp"], rtol=2e-4)


def _dropout_mlp():
    return stax_serial(stax.Dense(16), stax.Relu, stax.Dropout(0.5, mode="train"),
                       stax.Dense(3))


@pytest.mark.parametrize("vmap_axes,x2_none", [(None, False), (0, True)])
def test_dropout(vmap_axes, x2_none):
    init_fn, apply_fn = _dropout_mlp()
    x1 = _x(1, (4, 3))
    x2 = None if x2_none else _x(2, (5, 3))
    params = init_fn(jax.random.PRNGKey(0), x1.shape)[1]
    agree(apply_fn, params, x1, x2, vmap_axes=vmap_axes, rng=jax.random.PRNGKey(5))


def test_dropout_monte_carlo_matches_reference():
    init_fn, apply_fn = _dropout_mlp()
    x1, x2 = _x(1, (4, 3)), _x(2, (5, 3))
    key = jax.random.PRNGKey(6)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, implementation=SD)(x1, x2)
    expected = monte_carlo(init_fn, apply_fn, key, 2, x1, x2)
    assert_close(got.ntk, expected["ntk"], rtol=2e-4)


# --- hand-written models: every kind of use -------------------------------------------


def _pytree_model(params, x):
    h = jax.nn.relu(x["a"] @ params["wa"] + x["b"] @ params["wb"])
    return {"out": h @ params["v"], "hidden": h}


@pytest.mark.parametrize("vmap_axes", [None, 0])
def test_pytree_inputs_and_dict_outputs(vmap_axes):
    params = {"wa": _x(1, (4, 6)), "wb": _x(2, (2, 6)), "v": _x(3, (6, 2))}
    x1 = {"a": _x(4, (3, 4)), "b": _x(5, (3, 2))}
    x2 = {"a": _x(6, (2, 4)), "b": _x(7, (2, 2))}
    ntk = agree(_pytree_model, params, x1, x2, vmap_axes=vmap_axes)
    assert set(ntk) == {"out", "hidden"}


def _shared(params, x):
    """``w`` used three times (twice as is, once transposed and scaled), ``b`` added and
    subtracted, ``s`` a scalar parameter scaling ``w`` and scaling a result."""
    w, b, s = params["w"], params["b"], params["s"]
    h = jnp.tanh(x @ w + b)
    h = jnp.tanh(h @ (w.T / 3.0) * s - b)
    h = jnp.tanh(h @ (-w * s))
    return h @ params["v"] * s


def test_weight_sharing_is_structured():
    params = {"w": _x(1, (4, 4)), "b": _x(2, (1, 4)), "s": jnp.asarray(0.7), "v": _x(3, (4, 2))}
    agree(_shared, params, _x(4, (3, 4)), _x(5, (2, 4)), vmap_axes=0)
    agree(_shared, params, _x(4, (3, 4)), None, (), (), vmap_axes=None)
    found = structure(_shared, params, _x(4, (3, 4)))
    assert found == [["add", "add"], ["mul", "mul", "mul"], ["dot"], ["dot", "dot", "dot"]]


def _unsupported(params, x):
    """``e`` gathered (an embedding), ``c`` through ``sin``, ``w`` structured; ``u`` unused."""
    del params["u"]
    ids = jnp.argmax(x, axis=-1)
    h = jnp.tanh(x @ params["w"] + params["e"][ids])
    return h * jnp.sin(params["c"])  # c: (1, 5)


@pytest.mark.parametrize("vmap_axes", [None, 0])
def test_unsupported_uses_fall_back_per_parameter(vmap_axes):
    params = {"c": _x(1, (1, 5)), "e": _x(2, (4, 5)), "u": _x(3, (2,)), "w": _x(4, (4, 5))}
    agree(lambda p, x: _unsupported(dict(p), x), params, _x(5, (3, 4)), _x(6, (2, 4)),
          (), (), vmap_axes)
    found = structure(lambda p, x: _unsupported(dict(p), x), params, _x(5, (3, 4)))
    assert found == ["jacobian", "jacobian", [], ["dot"]]


def _general_dots(params, x):
    """dot_general with batch dimensions, and a parameter as the left operand."""
    n, h = x.shape[0], params["heads"].shape[0]
    y = jnp.einsum("nhi,hio->nho", x.reshape(n, h, -1), params["heads"],
                   precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum("ok,nhk->nho", params["mix"], jnp.tanh(y),
                   precision=jax.lax.Precision.HIGHEST)
    return (y * params["scale"] + params["shift"]).reshape(n, -1)


@pytest.mark.parametrize("vmap_axes", [None, 0])
def test_dot_general_dimension_numbers_and_elementwise_scale(vmap_axes):
    params = {"heads": _x(1, (2, 3, 4)), "mix": _x(2, (5, 4)), "scale": _x(3, (1, 2, 5)),
              "shift": _x(4, (1, 1, 5))}
    agree(_general_dots, params, _x(5, (3, 6)), _x(6, (2, 6)), (), (), vmap_axes)
    found = structure(_general_dots, params, _x(5, (3, 6)))
    assert found == [["dot"], ["dot"], ["mul"], ["add"]]


CONVS = {
    "nchw_strided": dict(dn=("NCHW", "OIHW", "NCHW"), window_strides=(2, 1),
                         padding=((1, 0), (2, 1)), kernel=(3, 2)),
    "nhwc_dilated": dict(dn=("NHWC", "HWIO", "NHWC"), rhs_dilation=(2, 1), padding="SAME",
                         kernel=(2, 3)),
    "transposed": dict(dn=("NHWC", "HWIO", "NHWC"), lhs_dilation=(2, 2), padding=((1, 0), (1, 1)),
                       kernel=(2, 2)),
    "odd_layout": dict(dn=("HNCW", "IHWO", "CWNH"), padding="SAME", kernel=(3, 3)),
}


@pytest.mark.parametrize("name,vmap_axes", [("nchw_strided", None), ("nhwc_dilated", 0),
                                             ("transposed", None), ("odd_layout", 0)])
def test_convolution_layouts(name, vmap_axes):
    cfg = dict(CONVS[name])
    dn, kernel = cfg.pop("dn"), cfg.pop("kernel")
    sizes = {"O": 3, "I": 2, "H": kernel[0], "W": kernel[1]}
    w = _x(1, tuple(sizes[c] for c in dn[1]))

    def apply_fn(params, x):
        x = jnp.moveaxis(x, (0, 1, 2, 3), tuple(dn[0].index(c) for c in "NHWC"))
        y = jax.lax.conv_general_dilated(x, params, window_strides=cfg.get("window_strides",
                                                                          (1, 1)),
                                         padding=cfg["padding"],
                                         lhs_dilation=cfg.get("lhs_dilation"),
                                         rhs_dilation=cfg.get("rhs_dilation"),
                                         dimension_numbers=dn,
                                         precision=jax.lax.Precision.HIGHEST)
        return jnp.moveaxis(jnp.tanh(y), tuple(dn[2].index(c) for c in "NHWC"), (0, 1, 2, 3))

    x1, x2 = _x(2, (2, 5, 6, 2)), _x(3, (3, 5, 6, 2))
    agree(apply_fn, w, x1, x2, (-1,), (), vmap_axes)
    assert structure(apply_fn, w, x1) == [["conv"]]


def test_bfloat16_and_python_scalar_parameters():
    """bfloat16 (which NumPy does not count as floating) and a Python float parameter
    are structured like any other parameter."""
    def apply_fn(params, x):
        return jnp.tanh(x @ params["w"] * params["s"]) @ params["v"]

    params = {"s": 0.5, "v": _x(1, (4, 2)).astype(jnp.bfloat16),
              "w": _x(2, (3, 4)).astype(jnp.bfloat16)}
    x = _x(3, (5, 3)).astype(jnp.bfloat16)
    for vmap_axes in (None, 0):
        got = {impl: np.asarray(mcntk.empirical_ntk_fn(apply_fn, vmap_axes=vmap_axes,
                                                       implementation=impl)(x, None, params),
                                np.float32) for impl in (SD, JC)}
        assert_close(got[SD], got[JC], rtol=2e-2)
    assert structure(apply_fn, params, x) == [["mul"], ["dot"], ["dot"]]


def test_custom_derivative_rules_are_kept():
    """relu's custom JVP gives 0 at 0, while max(x, 0) would give 1/2; inputs with zero
    rows hit exactly 0. A custom_vjp function is evaluated with its own rule too."""
    @jax.custom_vjp
    def double_grad(x):
        return x

    double_grad.defvjp(lambda x: (x, None), lambda _, g: (2 * g,))

    def apply_fn(params, x):
        h = jax.nn.relu(double_grad(x @ params["w"]))
        return jax.jit(lambda a, b: a @ b)(h, params["v"])

    params = {"w": _x(1, (3, 4)), "v": _x(2, (4, 2))}
    x = jnp.concatenate([jnp.zeros((2, 3)), _x(3, (2, 3))])
    for vmap_axes in (None, 0):
        agree(apply_fn, params, x, None, (), (), vmap_axes)


def test_kernel_is_differentiable_both_ways():
    """SD's NTK has the same gradient and JVP with respect to the inputs as JC's (the
    convolution rule of structured derivatives keeps a JVP)."""
    init_fn, apply_fn = CNN[0]()
    params = init_fn(jax.random.PRNGKey(0), CNN[1])[1]
    x1, x2, t = _x(1, CNN[1]), _x(2, CNN[2]), _x(3, CNN[1])
    got = {}
    for impl in (SD, JC):
        ntk_fn = mcntk.empirical_ntk_fn(apply_fn, vmap_axes=0, implementation=impl)
        f = lambda a, f=ntk_fn: jnp.sum(_x(4, (3, 2)) * f(a, x2, params))
        got[impl] = jax.jit(lambda a, f=f: (jax.grad(f)(a), jax.jvp(f, (a,), (t,))[1]))(x1)
    assert_close(got[SD], got[JC], rtol=1e-4)


def test_control_flow_falls_back():
    def apply_fn(params, x):
        h = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, params["stack"])[0]
        return h @ params["out"]

    params = {"out": _x(1, (3, 2)), "stack": _x(2, (2, 3, 3))}
    agree(apply_fn, params, _x(3, (4, 3)), _x(4, (2, 3)), vmap_axes=0)
    assert structure(apply_fn, params, _x(3, (4, 3))) == [["dot"], "jacobian"]


def test_no_parameters_in_use():
    def apply_fn(params, x):
        return jnp.tanh(x) * jax.lax.stop_gradient(params["w"])

    params = {"w": _x(1, (1, 3))}
    ntk = agree(apply_fn, params, _x(2, (2, 3)), _x(3, (4, 3)), vmap_axes=0)
    assert not np.any(np.asarray(ntk))


def test_output_reads_a_parameter():
    def apply_fn(params, x):
        return x * 0.0 + params["b"], params["b"] * 2.0

    params = {"b": _x(1, (1, 3))}
    agree(apply_fn, params, _x(2, (2, 3)), _x(3, (4, 3)), (), ())


# --- frameworks through the adapters ---------------------------------------------------


def _linen():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Conv(4, (3, 3))(x)
            h = nn.LayerNorm()(h)
            h = nn.BatchNorm(use_running_average=True)(h)
            h = nn.Dropout(0.5, deterministic=not train)(h.reshape(h.shape[0], -1))
            ids = jnp.argmax(x.reshape(x.shape[0], -1), axis=-1) % 7
            return nn.Dense(3)(nn.relu(h)) + nn.Embed(7, 3)(ids)

    return adapters.as_model(Net())


def _nnx():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.lin = nnx.Linear(100, 3, rngs=rngs)

        def __call__(self, x):
            h = self.norm(self.conv(x))
            return self.lin(jax.nn.gelu(h.reshape(h.shape[0], -1)))

    return adapters.nnx_model(lambda rngs: Net(rngs))


def _haiku():
    hk = pytest.importorskip("haiku")

    def f(x):
        h = hk.Conv2D(4, 3)(x)
        h = hk.LayerNorm(-1, True, True)(h)
        ids = jnp.argmax(x.reshape(x.shape[0], -1), axis=-1) % 7
        return hk.Linear(3)(jnp.tanh(h.reshape(h.shape[0], -1))) + hk.Embed(7, 3)(ids)

    return adapters.as_model(hk.transform(f))


def _equinox():
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        norm: eqx.nn.LayerNorm
        lin: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.conv = eqx.nn.Conv2d(5, 4, 3, padding=1, key=k1)
            self.norm = eqx.nn.LayerNorm((4, 5, 2))
            self.lin = eqx.nn.Linear(40, 3, key=k2)

        def __call__(self, x):  # one example (H, W, C): channels first for the conv
            h = self.norm(self.conv(jnp.moveaxis(x, -1, 0)))
            return self.lin(jax.nn.relu(h).reshape(-1))

    return adapters.equinox_model(lambda key: Net(key))


FRAMEWORKS = {"linen": (_linen, (3, 5, 5, 2)), "nnx": (_nnx, (3, 5, 5, 2)),
              "haiku": (_haiku, (3, 5, 5, 2)), "equinox": (_equinox, (3, 5, 2, 5))}


@pytest.mark.parametrize("name,vmap_axes", [("linen", 0), ("nnx", None), ("haiku", 0),
                                             ("equinox", None), ("equinox", 0)])
def test_frameworks_agree(name, vmap_axes):
    make, shape = FRAMEWORKS[name]
    model = make()
    params = model.init(jax.random.PRNGKey(0), shape)[1]
    x1, x2 = _x(1, shape), _x(2, (2, *shape[1:]))
    agree(model.apply, params, x1, x2, vmap_axes=vmap_axes)
    found = structure(model.apply, params, x1)
    # only embeddings (a gather) need their Jacobian
    assert sum(f == "jacobian" for f in found) == (name in ("linen", "haiku")), found


def test_linen_dropout_through_monte_carlo():
    model = _linen()
    x1, x2 = _x(1, (3, 5, 5, 2)), _x(2, (2, 5, 5, 2))
    key = jax.random.PRNGKey(4)
    got = {impl: mcntk.monte_carlo_kernel_fn(model, key, 2, implementation=impl)(
        x1, x2, "ntk", train=True) for impl in (SD, JC)}
    assert_close(got[SD], got[JC])


# --- public JAX APIs only ---------------------------------------------------------------


def test_only_public_jax_apis():
    root = pathlib.Path(mcntk.__file__).parent / "ntk"
    for path in root.glob("*.py"):
        text = path.read_text()
        for private in ("jax._src", "jax.core", "jax.interpreters", "jax.util", "jax.lib"):
            assert private not in text, (path.name, private)



@pytest.mark.parametrize("la,lb,out", [
    ("ikf", "jkf", "ij"),  # a dense layer's cotangent Gram: two contracting axes
    ("iokf", "jokf", "ioj"),  # a size-1 batch axis, moved
    ("bikf", "bjkf", "bij"),  # a batch label
    ("ikf", "jkf", "ji"),  # output transposed
    ("ikfs", "jkf", "ij"),  # a label summed on one side first
    ("ifk", "jkf", "ij"),  # contracting axes in another order: jnp.einsum's layout
    ("iik", "jk", "ij"),  # a repeated label: left to jnp.einsum
    ("i", "j", "ij"),  # nothing contracted
])
def test_pairwise_contraction_is_einsum(la, lb, out):
    from mcntk.ntk import _contract
    sizes = {"i": 3, "j": 4, "k": 5, "f": 6, "b": 2, "s": 7, "o": 1}
    names = {c: n for n, c in enumerate(sorted(sizes))}
    rng = np.random.default_rng(0)
    a = rng.standard_normal([sizes[c] for c in la]).astype(np.float32)
    b = rng.standard_normal([sizes[c] for c in lb]).astype(np.float32)
    if la == "iik":
        a = rng.standard_normal((3, 3, 5)).astype(np.float32)
    labels = lambda s: [names[c] for c in s]
    got = _contract._pair(jnp.asarray(a), labels(la), jnp.asarray(b), labels(lb), labels(out))
    want = np.einsum(f"{la},{lb}->{out}", a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    mixed = _contract._pair(jnp.asarray(a, jnp.bfloat16), labels(la), jnp.asarray(b),
                            labels(lb), labels(out))
    assert mixed.dtype == jnp.float32  # promoted as jnp.einsum promotes


def test_dense_cotangent_gram_is_one_matrix_product():
    """The Gram of a dense layer's cotangents [example, output, feature] contracts one
    merged axis (XLA's CPU compiler copied both operands for two contracting axes)."""
    from mcntk.ntk import _contract
    g = jnp.ones((8, 10, 32))
    jaxpr = jax.make_jaxpr(lambda a, b: _contract._pair(a, [0, 1, 2], b, [3, 1, 2], [0, 3]))(
        g, g)
    (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    (contracting, _), _ = dot.params["dimension_numbers"]
    assert len(contracting) == 1 and dot.invars[0].aval.shape == (1, 8, 320)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.bool_])
def test_pairwise_contraction_keeps_einsum_types_for_integers(dtype):
    from mcntk.ntk import _contract
    a = jnp.ones((2, 3, 4), dtype)
    b = jnp.ones((5, 3), dtype)
    got = _contract._pair(a, [0, 1, 2], b, [3, 1], [0, 3])
    want = jnp.einsum(a, [0, 1, 2], b, [3, 1], [0, 3])
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_program_inputs_read_by_the_outputs():
    """A key split but never drawn from is not read; one drawn from is."""
    def f(a, key, c):
        jax.random.split(key)  # results unused
        return a * 2 + c

    assert _program.trace(f, 1.0, jax.random.PRNGKey(0), 2.0).read_inputs() == [
        True, False, True]
    g = lambda a, key: a + jax.random.normal(key, ())
    assert _program.trace(g, 1.0, jax.random.PRNGKey(0)).read_inputs() == [True, True]


def _dot_count(closed):
    """``dot_general`` equations in a jaxpr and the jaxprs inside it."""
    count = 0
    for eqn in closed.jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                    count += _dot_count(sub)
    return count


@pytest.mark.parametrize("dropout", [False, True], ids=["no_draws", "dropout"])
def test_nngp_reuses_the_ntk_outputs_when_the_model_ignores_rng(dropout):
    """With per-example NTK derivatives and an ``rng``, the NNGP takes whole-batch
    outputs (dropout masks drawn per call, as neural-tangents draws them), but only for
    a model that reads ``rng``: one that never does reuses the NTK's outputs."""
    from mcntk.empirical import KernelSpec
    layers = [stax.Dense(16), stax.Relu] + ([stax.Dropout(0.5)] if dropout else []) + [
        stax.Dense(3)]
    init_fn, apply_fn = stax_serial(*layers)
    params = init_fn(jax.random.PRNGKey(0), (4, 5))[1]
    x1, x2 = _x(1, (4, 5)), _x(2, (4, 5))
    spec = KernelSpec(apply_fn, (-1,), (), 0, mcntk.NtkImplementation.AUTO, True)
    k1, k2 = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
    names = ("nngp", "ntk")

    def program(key2, names=names):
        return _dot_count(jax.make_jaxpr(lambda p: spec.kernels(
            names, p, x1, x2, {"rng": k1}, {"rng": key2}, mcntk.NtkImplementation(SD)))(params))

    # the NNGP adds its own contraction (one product), and a forward pass per side
    # only for a model that draws
    added = program(k2) - program(k2, ("ntk",))
    assert (added > 1) if dropout else (added == 1)
    got = spec.kernels(names, params, x1, x2, {"rng": k1}, {"rng": k2},
                       mcntk.NtkImplementation(SD))
    want = spec.kernels(names, params, x1, x2, {"rng": k1}, {"rng": k2},
                        mcntk.NtkImplementation(JC))
    assert_close(got["ntk"], want["ntk"])
    assert_close(got["nngp"], want["nngp"])


def _init_two_layers(key, shape):
    k1, k2 = jax.random.split(key)
    return (shape[0], 3), (jax.random.normal(k1, (shape[-1], 8)),
                           jax.random.normal(k2, (8, 3)))


def _dropout_in_training(params, x, rng=None, train=False):
    h = jnp.tanh(x @ params[0])
    if train:
        h = jnp.where(jax.random.bernoulli(rng, 0.5, h.shape), h * 2, 0.0)
    return h @ params[1]


def test_nngp_draws_for_the_side_that_reads_rng():
    """Only f(x2) draws (a flag given as a pair): its NNGP outputs are still the whole
    batch's, as in neural-tangents' key schedule (the reference)."""
    key = jax.random.PRNGKey(5)
    x1, x2 = _x(1, (4, 5)), _x(2, (3, 5))
    kernel_fn = mcntk.monte_carlo_kernel_fn(_init_two_layers, _dropout_in_training, key, 2,
                                            vmap_axes=0)
    got = kernel_fn(x1, x2, ("nngp", "ntk"), train=(False, True))
    want = monte_carlo(_init_two_layers, _dropout_in_training, key, 2, x1, x2,
                       kwargs={"train": False}, kwargs2={"train": True})
    assert_close(got.nngp, want["nngp"])


def test_declared_vmap_axes_are_checked_when_rng_is_unused():
    """An empirical kernel with ``rng=`` checks a declared ``vmap_axes`` like one
    without, when the model never reads ``rng`` (here its examples interact)."""
    def centred(params, x, rng=None):
        h = jnp.tanh(x @ params[0])
        return (h - h.mean(0, keepdims=True)) @ params[1]

    params = _init_two_layers(jax.random.PRNGKey(0), (4, 5))[1]
    kernel_fn = mcntk.empirical_kernel_fn(centred, vmap_axes=0)
    with pytest.raises(ValueError, match="`vmap_axes`"):
        kernel_fn(_x(1, (4, 5)), None, ("nngp", "ntk"), params, rng=jax.random.PRNGKey(1))
