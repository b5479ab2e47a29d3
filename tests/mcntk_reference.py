"""A brute-force reference for the tests: explicit Jacobians of the flattened
parameters, an outer product over all output entries, then the axes rule applied
one axis at a time with NumPy. Written without any of mcntk's code."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def apply_axes_rule(full, ndim, trace_axes, diagonal_axes):
    """``full`` has the x1 output axes then the x2 output axes; returns the kernel."""
    trace = sorted({a % ndim for a in trace_axes})
    diag = sorted({a % ndim for a in diagonal_axes})
    # interleave: a0 b0 a1 b1 ...
    order = [k for i in range(ndim) for k in (i, ndim + i)]
    t = np.transpose(full, order)
    # walk axes from the last so earlier positions stay valid
    divisor = 1
    for i in reversed(range(ndim)):
        pos = 2 * i
        if i in trace:
            divisor *= t.shape[pos]
            t = np.trace(t, axis1=pos, axis2=pos + 1)
        elif i in diag:
            t = np.moveaxis(np.diagonal(t, axis1=pos, axis2=pos + 1), -1, pos)
    return t / divisor


def kernels(apply_fn, params, x1, x2, trace_axes=(-1,), diagonal_axes=(), kw1=None, kw2=None):
    """``{'nngp': ..., 'ntk': ...}`` for one set of parameters, per output leaf."""
    kw1 = kw1 or {}
    kw2 = kw1 if kw2 is None else kw2
    x2 = x1 if x2 is None else x2
    flat, unravel = ravel_pytree(params)
    f1 = lambda w: apply_fn(unravel(w), x1, **kw1)
    f2 = lambda w: apply_fn(unravel(w), x2, **kw2)
    out1, out2 = f1(flat), f2(flat)
    j1, j2 = jax.jacobian(f1)(flat), jax.jacobian(f2)(flat)
    nngp, ntk = [], []
    for o1, o2, a, b in zip(jax.tree.leaves(out1), jax.tree.leaves(out2),
                            jax.tree.leaves(j1), jax.tree.leaves(j2)):
        o1, o2, a, b = (np.asarray(v, np.float64) for v in (o1, o2, a, b))
        nd = o1.ndim
        nngp.append(apply_axes_rule(np.multiply.outer(o1, o2), nd, trace_axes, diagonal_axes))
        full = np.tensordot(a, b, axes=([a.ndim - 1], [b.ndim - 1]))
        ntk.append(apply_axes_rule(full, nd, trace_axes, diagonal_axes))
    treedef = jax.tree.structure(out1)
    return {"nngp": jax.tree.unflatten(treedef, nngp), "ntk": jax.tree.unflatten(treedef, ntk)}


def monte_carlo(init_fn, apply_fn, key, n, x1, x2=None, trace_axes=(-1,), diagonal_axes=(),
                kwargs=None, rng=True, kwargs2=None):
    """neural-tangents' key schedule written out, averaging :func:`kernels`.

    ``kwargs`` go to ``f(x1)``, and to ``f(x2)`` unless ``kwargs2`` is given."""
    kwargs = kwargs or {}
    kwargs2 = kwargs if kwargs2 is None else kwargs2
    total = None
    same = x2 is None or (
        jax.tree.structure(x1) == jax.tree.structure(x2)
        and all(np.shape(a) == np.shape(b) and np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(x1), jax.tree.leaves(x2))))
    for _ in range(n):
        key, split = jax.random.split(key)
        init_key, dropout_key = jax.random.split(split)
        params = init_fn(init_key, jax.tree.map(jnp.shape, x1))[1]
        kw1, kw2 = dict(kwargs), dict(kwargs2)
        if rng:
            kw1["rng"] = dropout_key
            kw2["rng"] = dropout_key if same else jax.random.fold_in(dropout_key, 1)
        k = kernels(apply_fn, params, x1, x2, trace_axes, diagonal_axes, kw1, kw2)
        total = k if total is None else jax.tree.map(np.add, total, k)
    return jax.tree.map(lambda v: v / n, total)


def lenient(fn):
    """``fn`` run with NumPy-style rank promotion: stax layers rely on it, while the
    test suite runs with ``jax_numpy_rank_promotion='raise'`` to keep mcntk strict."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.numpy_rank_promotion("allow"):
            return fn(*args, **kwargs)

    return wrapped


def stax_serial(*layers):
    """``stax.serial(*layers)`` with a :func:`lenient` apply function."""
    from jax.example_libraries import stax

    init_fn, apply_fn = stax.serial(*layers)
    return init_fn, lenient(apply_fn)


def depthwise_network():
    """``(init_fn, apply_fn)``: a depthwise convolution (``feature_group_count`` = the
    input's channels, NHWC), tanh and a dense readout to 2 outputs."""
    def init_fn(key, shape):
        k1, k2 = jax.random.split(key)
        w = jax.random.normal(k1, (3, 3, 1, shape[-1]))
        v = jax.random.normal(k2, (shape[1] * shape[2] * shape[-1], 2)) / 6
        return (shape[0], 2), (w, v)

    def apply_fn(params, x, **kwargs):
        w, v = params
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=x.shape[-1],
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(y).reshape(x.shape[0], -1) @ v
    return init_fn, apply_fn
