"""Ordinary inputs that once gave a wrong kernel without an error, or the framework's raw
error (issue 6): per-example keyword arguments under ``batch_size``, models with one
output per example, x1 and x2 that do not match, and ``vmap_axes`` that do not fit.

Batched kernels are compared with unbatched ones (one block, the kwargs whole) and with
the brute-force reference (``mcntk_reference``), which calls ``apply_fn`` on all the
examples at once with the keyword arguments as given.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mcntk_reference import kernels, monte_carlo

import mcntk
from mcntk import adapters

N1, N2, H = 6, 4, 5  # examples of x1 and of x2, hidden width
N_SAMPLES = 2


def _x(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape)


def _mask(key, n):
    return (jax.random.uniform(jax.random.PRNGKey(key), (n, H)) > 0.4).astype(jnp.float32)


def assert_close(actual, expected, rtol):
    """Largest difference within ``rtol`` of the largest entry of ``expected``."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (a.shape, e.shape)
        scale = np.abs(e).max()
        assert scale > 0
        assert np.abs(a - e).max() <= rtol * scale, np.abs(a - e).max() / scale


# --- per-example keyword arguments under batch_size -------------------------------------


def init_fn(key, input_shape):
    kw, kv = jax.random.split(key)
    return None, {"w": jax.random.normal(kw, (input_shape[-1], H)),
                  "v": jax.random.normal(kv, (H, 2))}


def masked_apply(params, x, mask, bias=None, train=True, mask_axis=0):
    """``mask`` holds one row of H entries per example: (N, H), or (H, N) with
    ``mask_axis=1``; ``bias`` (H,) is shared; ``train`` must stay a Python bool."""
    m = mask if mask_axis == 0 else mask.T
    h = jnp.tanh(x @ params["w"] + (0.0 if bias is None else bias[None]))
    if train:  # a Python branch: fails if `train` were traced
        h = 0.0 * h
    return (h * m) @ params["v"]


KWARGS_CASES = [  # (declared by, batch_size, x2, diagonal_axes); N1 = 6, N2 = 4
    ("kwargs_axes", 2, None, ()),
    ("kwargs_axes", 4, "other", ()),  # 4 divides N2 but not N1
    ("kwargs_axes", 4, None, (0,)),
    ("kwargs_axes", 1, "other", (0,)),
    ("pair", 2, "other", ()),
    ("pair", 4, None, ()),
    ("pair", 1, None, ()),  # once a silent broadcast of the whole mask: a rank-1 kernel
    ("pair", 4, "other", (0,)),
]


def kwargs_case(declared, x2_kind, diagonal_axes):
    """``(x1, x2, vmap_axes, kwargs for kernel_fn, kwargs of f(x1), kwargs of f(x2))``."""
    n2 = N1 if diagonal_axes else N2
    x1 = _x(1, (N1, 3))
    x2 = None if x2_kind is None else _x(2, (n2, 3))
    m1, m2 = _mask(3, N1), _mask(4, N1 if x2 is None else n2)
    if declared == "kwargs_axes":  # masks (H, N): examples on axis 1, a shared bias
        bias = _x(5, (H,))
        mask = m1.T if x2 is None else (m1.T, m2.T)
        kw = dict(mask=mask, bias=bias, train=False, mask_axis=1)
        kw1 = dict(kw, mask=m1.T)
        kw2 = dict(kw, mask=m1.T if x2 is None else m2.T)
        return x1, x2, (0, 0, {"mask": 1, "bias": None}), kw, kw1, kw2
    kw = dict(mask=(m1, m2), train=False)  # with x2=None, f(x2) is f(x1) with m2
    return x1, x2, None, kw, dict(kw, mask=m1), dict(kw, mask=m2)


@pytest.mark.parametrize("declared,batch_size,x2_kind,diagonal_axes", KWARGS_CASES)
def test_per_example_kwargs_batched_equals_unbatched(declared, batch_size, x2_kind,
                                                     diagonal_axes):
    x1, x2, vmap_axes, kw, kw1, kw2 = kwargs_case(declared, x2_kind, diagonal_axes)
    assert batch_size < N1  # more than one block
    key = jax.random.PRNGKey(6)
    make = lambda b: mcntk.monte_carlo_kernel_fn(
        init_fn, masked_apply, key, N_SAMPLES, batch_size=b, diagonal_axes=diagonal_axes,
        vmap_axes=vmap_axes, implementation=1)
    whole = make(0)(x1, x2, ("nngp", "ntk"), **kw)
    blocked = make(batch_size)(x1, x2, ("nngp", "ntk"), **kw)
    assert_close(blocked, whole, rtol=1e-6)
    expected = monte_carlo(init_fn, masked_apply, key, N_SAMPLES, x1, x2, (-1,), diagonal_axes,
                           kwargs=kw1, kwargs2=kw2, rng=False)
    assert_close(blocked.nngp, expected["nngp"], rtol=2e-4)
    assert_close(blocked.ntk, expected["ntk"], rtol=2e-4)


def test_shared_array_kwarg_in_one_block_goes_whole():
    """batch_size >= N: one block, which takes an undeclared array kwarg as it is."""
    x1, m1 = _x(1, (N1, 3)), _mask(3, N1)
    key = jax.random.PRNGKey(7)
    kf = lambda b: mcntk.monte_carlo_kernel_fn(init_fn, masked_apply, key, N_SAMPLES,
                                               batch_size=b)
    got = kf(N1)(x1, None, "ntk", mask=m1, train=False)
    expected = monte_carlo(init_fn, masked_apply, key, N_SAMPLES, x1, None,
                           kwargs=dict(mask=m1, train=False), rng=False)["ntk"]
    assert_close(got, expected, rtol=2e-4)


@pytest.mark.parametrize("vmap_axes", [
    None,
    (0, 0, {}),
], ids=["no_vmap_axes", "kwargs_axes_without_mask"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_undeclared_per_example_kwarg_is_refused(vmap_axes, batch_size):
    x1, m1 = _x(1, (N1, 3)), _mask(3, N1)
    kf = mcntk.monte_carlo_kernel_fn(init_fn, masked_apply, jax.random.PRNGKey(0), 1,
                                     batch_size=batch_size, vmap_axes=vmap_axes)
    with pytest.raises(ValueError, match=rf"`mask`(.|\n)*`batch_size`={batch_size}"):
        kf(x1, None, "ntk", mask=m1, train=False)


def label_apply(params, x, label):
    """Uses ``label`` without a per-example shape check: wrong rows do not crash."""
    return masked_apply(params, x, jnp.ones((1, H)), train=False) + jnp.mean(label)


def test_pair_kwarg_with_wrong_rows_is_refused():
    x1, x2 = _x(1, (N1, 3)), _x(2, (N2, 3))
    kf = mcntk.monte_carlo_kernel_fn(init_fn, label_apply, jax.random.PRNGKey(0), 1,
                                     batch_size=2)
    with pytest.raises(ValueError, match=r"`label` has 3 rows(.|\n)*`x2` has 4 examples"):
        kf(x1, x2, "ntk", label=(jnp.ones(N1), jnp.ones(3)))
    with pytest.raises(ValueError, match=r"`label` has 5 rows(.|\n)*`x1` has 6 examples"):
        kf(x1, x2, "ntk", label=(jnp.ones(5), jnp.ones(N2)))




@pytest.mark.parametrize("side", ["x1", "x2"])
def test_pair_kwarg_with_wrong_rows_that_crash_the_model_is_named(side):
    x1, x2 = _x(1, (N1, 3)), _x(2, (N2, 3))
    m1, m2 = _mask(3, N1), _mask(4, N2)
    mask = (m1[:3], m2) if side == "x1" else (m1, m2[:3])
    kf = mcntk.monte_carlo_kernel_fn(init_fn, masked_apply, jax.random.PRNGKey(0), 1,
                                     batch_size=2)
    with pytest.raises(ValueError, match=rf"`mask` has 3 rows(.|\n)*`{side}` has"):
        kf(x1, x2, "ntk", mask=mask, train=False)


# --- one output per example ----------------------------------------------------------


def scalar_model(kind):
    """``(model for monte_carlo_kernel_fn as a tuple of arguments, apply_fn or None)``."""
    if kind == "plain":
        def apply_fn(params, x):
            return (jnp.tanh(x @ params["w"]) @ params["v"])[:, 0]  # (N,)

        return (init_fn, apply_fn), apply_fn
    if kind == "equinox":
        eqx = pytest.importorskip("equinox")
        return (adapters.equinox_model(lambda key: eqx.nn.MLP(3, "scalar", H, 1, key=key)),), None
    nn = pytest.importorskip("flax.linen")

    class Regression(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.tanh(nn.Dense(H)(x)))[..., 0]  # a squeezed Dense(1)

    return (Regression(),), None


def scalar_kernel_fn(kind, **options):
    model, _ = scalar_model(kind)
    return mcntk.monte_carlo_kernel_fn(*model, key=jax.random.PRNGKey(8), n_samples=N_SAMPLES,
                                       **options)


def trace_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning)
            and "trace_axes" in str(w.message)]


SCALAR_MODELS = ["plain", "equinox", "linen"]


@pytest.mark.parametrize("kind", SCALAR_MODELS)
def test_scalar_output_default_trace_axes_warns(kind):
    """neural-tangents' meaning is kept (the examples' axis traced: a 0-d kernel, the mean
    of K(x1_i, x2_i)), with a warning that names `trace_axes` and suggests ()."""
    x = _x(1, (N1, 3))
    with pytest.warns(UserWarning, match=r"`trace_axes`=\(-1,\) traces output axis 0(.|\n)*"
                                         r"pass `trace_axes`=\(\)") as record:
        traced = scalar_kernel_fn(kind)(x, None, "ntk")
    assert len(trace_warnings(record)) == 1
    assert traced.shape == ()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        full = scalar_kernel_fn(kind, trace_axes=())(x, None, "ntk")
        diagonal = scalar_kernel_fn(kind, trace_axes=(), diagonal_axes=(0,))(x, None, "ntk")
    assert trace_warnings(record) == []
    assert full.shape == (N1, N1) and diagonal.shape == (N1,)
    np.testing.assert_allclose(diagonal, np.diag(full), rtol=1e-5)
    np.testing.assert_allclose(traced, np.trace(full) / N1, rtol=1e-5)


def test_scalar_output_matches_reference():
    (init, apply_fn), _ = scalar_model("plain")
    x1, x2 = _x(1, (N1, 3)), _x(2, (N2, 3))
    key = jax.random.PRNGKey(8)
    got = mcntk.monte_carlo_kernel_fn(init, apply_fn, key, N_SAMPLES, trace_axes=())(x1, x2)
    expected = monte_carlo(init, apply_fn, key, N_SAMPLES, x1, x2, (), rng=False)
    assert_close(got.ntk, expected["ntk"], rtol=2e-4)
    assert_close(got.nngp, expected["nngp"], rtol=2e-4)
    with pytest.warns(UserWarning, match="trace_axes"):
        traced = mcntk.monte_carlo_kernel_fn(init, apply_fn, key, N_SAMPLES)(x1, x1, "ntk")
    expected = monte_carlo(init, apply_fn, key, N_SAMPLES, x1, x1, rng=False)["ntk"]
    assert_close(traced, expected, rtol=2e-4)


@pytest.mark.parametrize("kind", SCALAR_MODELS)
def test_scalar_output_under_batch_size_suggests_trace_axes(kind):
    x = _x(1, (N1, 3))
    with pytest.warns(UserWarning, match="trace_axes"), \
            pytest.raises(ValueError, match=r"`trace_axes`=\(-1,\) traces output axis 0"
                                            r"(.|\n)*pass `trace_axes`=\(\)") as info:
        scalar_kernel_fn(kind, batch_size=2)(x, None, "ntk")
    assert "`batch_size`=0" not in str(info.value)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        blocked = scalar_kernel_fn(kind, batch_size=4, trace_axes=())(x, None, "ntk")
    assert trace_warnings(record) == []
    assert_close(blocked, scalar_kernel_fn(kind, trace_axes=())(x, None, "ntk"), rtol=1e-6)


def test_scalar_output_with_other_x2_under_batch_size_suggests_trace_axes():
    with pytest.raises(ValueError, match=r"pass `trace_axes`=\(\)"):
        scalar_kernel_fn("plain", batch_size=2)(_x(1, (N1, 3)), _x(2, (N2, 3)), "ntk")


@pytest.mark.parametrize("fn", ["empirical_kernel_fn", "empirical_ntk_fn",
                                "empirical_nngp_fn"])
def test_empirical_functions_warn_for_scalar_outputs(fn):
    (init, apply_fn), _ = scalar_model("plain")
    x = _x(1, (N1, 3))
    params = init(jax.random.PRNGKey(0), x.shape)[1]
    call = lambda f: f(x, None, "ntk", params) if fn == "empirical_kernel_fn" else f(x, None,
                                                                                     params)
    with pytest.warns(UserWarning, match=r"`trace_axes`=\(-1,\)(.|\n)*`trace_axes`=\(\)"):
        assert call(getattr(mcntk, fn)(apply_fn)).shape == ()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert call(getattr(mcntk, fn)(apply_fn, trace_axes=())).shape == (N1, N1)
    assert trace_warnings(record) == []


def test_trace_warning_points_at_the_callers_line():
    kernel_fn = scalar_kernel_fn("plain")
    with pytest.warns(UserWarning, match="trace_axes") as record:
        kernel_fn(_x(1, (N1, 3)), None, "ntk")
    assert [w.filename for w in trace_warnings(record)] == [__file__]


# --- x1 and x2 that do not match, vmap_axes that do not fit -----------------------------


def dense_apply(params, x):
    return jnp.tanh(x @ params["w"]) @ params["v"]


@pytest.mark.parametrize("options", [{}, {"vmap_axes": 0}, {"batch_size": 2}],
                         ids=["plain", "vmap_axes", "batch_size"])
def test_x1_and_x2_with_other_example_shapes(options):
    kf = mcntk.monte_carlo_kernel_fn(init_fn, dense_apply, jax.random.PRNGKey(0), 1, **options)
    with pytest.raises(ValueError, match=r"`x1` \(shape \(6, 3\)\)(.|\n)*`x2` \(shape \(4, 5\)\)"):
        kf(_x(1, (N1, 3)), _x(2, (N2, 5)), "ntk")


def test_empirical_x1_and_x2_with_other_example_shapes():
    params = init_fn(jax.random.PRNGKey(0), (N1, 3))[1]
    with pytest.raises(ValueError, match=r"`x1`(.|\n)*\(6, 3\)(.|\n)*`x2`(.|\n)*\(4, 5\)"):
        mcntk.empirical_ntk_fn(dense_apply)(_x(1, (N1, 3)), _x(2, (N2, 5)), params)


def label_scaled_apply(params, x, label=None):
    out = dense_apply(params, x)
    return out if label is None else out * label[:, None]


BAD_VMAP_AXES = [  # (vmap_axes, keyword arguments, what the error shows)
    # in range, but not the examples' axes: once the raw dot_general or squeeze error
    (1, {}, r"axis holding the 3 examples; got output shape \(6, 2\)"),
    ((0, 1, {}), {}, r"out_axes=1 must give every output leaf an axis holding the 6 examples"),
    # out of range, or not the inputs' structure
    (2, {}, r"in_axes.* axis 2 is out of range .*\(6, 3\)"),
    ((0, 2, {}), {}, r"out_axes axis 2 is out of range .*\(6, 2\)"),
    (({"a": 0}, 0, {}), {}, r"\{'a': 0\} is not a prefix"),
    ((0, 0, {"label": 1}), {"label": jnp.ones(N1)},
     r"kwargs_axes\['label'\] axis 1 is out of range .*\(6,\)"),
    ((0, 0, {"scale": 0}), {"label": jnp.ones(N1)}, r"kwargs_axes names keyword\(s\) \['scale'\]"),
]


@pytest.mark.parametrize("vmap_axes,kwargs,match", BAD_VMAP_AXES,
                         ids=["in_axes_not_examples", "out_axes_not_examples", "in_axes_rank",
                              "out_axes_rank", "in_axes_tree", "kwargs_axes_rank",
                              "kwargs_axes_name"])
@pytest.mark.parametrize("fn", ["monte_carlo", "empirical"])
def test_vmap_axes_that_do_not_fit(fn, vmap_axes, kwargs, match):
    x1, x2 = _x(1, (N1, 3)), _x(2, (N2, 3))
    if fn == "monte_carlo":
        kf = mcntk.monte_carlo_kernel_fn(init_fn, label_scaled_apply, jax.random.PRNGKey(0), 1,
                                         vmap_axes=vmap_axes)
        call = lambda: kf(x1, x2, "ntk", **kwargs)
    else:
        params = init_fn(jax.random.PRNGKey(0), x1.shape)[1]
        call = lambda: mcntk.empirical_ntk_fn(label_scaled_apply, vmap_axes=vmap_axes)(
            x1, x2, params, **kwargs)
    with pytest.raises(ValueError, match=r"`vmap_axes`(.|\n)*" + match):
        call()


def test_kwargs_axes_with_the_wrong_number_of_rows():
    kf = mcntk.monte_carlo_kernel_fn(init_fn, label_scaled_apply, jax.random.PRNGKey(0), 1,
                                     vmap_axes=(0, 0, {"label": 0}))
    with pytest.raises(ValueError, match=r"`label`(.|\n)*\(5,\)(.|\n)*6 examples"):
        kf(_x(1, (N1, 3)), None, "ntk", label=jnp.ones(5))


def test_undeclared_per_example_kwarg_under_vmap_axes_is_named():
    kf = mcntk.monte_carlo_kernel_fn(init_fn, label_scaled_apply, jax.random.PRNGKey(0), 1,
                                     vmap_axes=0)
    with pytest.raises(ValueError, match=r"`label`(.|\n)*kwargs_axes"):
        kf(_x(1, (N1, 3)), None, "ntk", label=jnp.ones(N1))


def test_reference_kernels_take_per_side_kwargs():
    """The oracle itself: ``kernels`` with kw1/kw2 is f(x1; kw1) . f(x2; kw2)."""
    params = init_fn(jax.random.PRNGKey(0), (N1, 3))[1]
    x1, m1, m2 = _x(1, (N1, 3)), _mask(3, N1), _mask(4, N1)
    k = kernels(masked_apply, params, x1, None, (), (), dict(mask=m1, train=False),
                dict(mask=m2, train=False))["nngp"]
    f1 = masked_apply(params, x1, m1, train=False)
    f2 = masked_apply(params, x1, m2, train=False)
    np.testing.assert_allclose(k, np.einsum("ia,jb->ijab", f1, f2), rtol=1e-5, atol=1e-6)


def test_static_flags_of_equal_value_and_other_type_are_not_confused():
    """``flag=True`` then ``flag=1`` on one kernel function: equal as Python values,
    but the model may branch on the type; the second call must not reuse the first's
    shapes or program (found by review)."""
    def init_fn(key, shape, flag=False):
        return (shape[0], 3), {"w": jax.random.normal(key, (shape[-1], 3))}

    def apply_fn(params, x, flag=False):
        y = x @ params["w"]
        return y[:, :2] if flag is True else 3.0 * y

    x = _x(1, (4, 5))
    fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2,
                                     trace_axes=())
    first = fn(x, None, "nngp", flag=True)
    second = fn(x, None, "nngp", flag=1)
    fresh = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2,
                                        trace_axes=())(x, None, "nngp", flag=1)
    assert first.shape == (4, 4, 2, 2) and second.shape == (4, 4, 3, 3)
    np.testing.assert_array_equal(np.asarray(second), np.asarray(fresh))


# --- declared vmap_axes checked on values ----------------------------------------------


def _centered_apply(params, x, centre=True):
    """Examples interact when ``centre``: the batch mean is subtracted (like BatchNorm in
    training mode); a single example then maps to zeros."""
    h = jnp.tanh(x @ params["w"])
    if centre:
        h = h - h.mean(axis=0, keepdims=True)
    return h @ params["v"]


@pytest.mark.parametrize("batch_size", [0, 3])
def test_declared_vmap_axes_of_interacting_examples_are_refused(batch_size):
    kf = mcntk.monte_carlo_kernel_fn(init_fn, _centered_apply, jax.random.PRNGKey(0), 1,
                                     vmap_axes=0, batch_size=batch_size)
    with pytest.raises(ValueError, match=r"`vmap_axes`=\(in_axes=0(.|\n)*interact"):
        kf(_x(1, (N1, 3)), None, "ntk")
    kf(_x(1, (N1, 3)), None, "ntk", centre=False)  # independent: accepted
    params = init_fn(jax.random.PRNGKey(0), (N1, 3))[1]
    empirical = mcntk.empirical_kernel_fn(_centered_apply, vmap_axes=0)
    with pytest.raises(ValueError, match=r"`vmap_axes`(.|\n)*interact"):
        empirical(_x(1, (N1, 3)), None, "ntk", params)
    empirical(_x(1, (N1, 3)), None, "ntk", params, centre=False)


def test_declared_vmap_axes_of_flax_batchnorm_in_training_are_refused():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
            return nn.Dense(2)(nn.relu(h))

    model = adapters.as_model(Net(), mutable=["batch_stats"])
    kf = mcntk.monte_carlo_kernel_fn(*model, jax.random.PRNGKey(0), 2, vmap_axes=0)
    x = _x(1, (N1, 3))
    with pytest.raises(ValueError, match=r"vmap_axes(.|\n)*BatchNorm"):
        kf(x, None, ("nngp", "ntk"), train=True)
    assert_close(kf(x, None, "ntk", train=False),
                 mcntk.monte_carlo_kernel_fn(*model, jax.random.PRNGKey(0), 2)(
                     x, None, "ntk", train=False), rtol=1e-5)


def test_undeclared_kwarg_hint_leaves_out_the_rng_mcntk_passes():
    def apply_fn(params, x, label, rng=None):
        return label_scaled_apply(params, x, label)

    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1, vmap_axes=0)
    with pytest.raises(ValueError, match=r"`label`") as info:
        kf(_x(1, (N1, 3)), None, "ntk", label=jnp.ones(N1))
    assert "`rng`" not in str(info.value)
