"""NTK by vector products: ``J(x1) (J(x2)^T v)`` for every basis vector ``v``.

No Jacobian is stored: each column of the kernel is one VJP through ``f(x2)``
followed by one JVP through ``f(x1)``, vectorised over the basis with ``vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcntk._types import PyTree
from mcntk.ntk._sides import Axes, Side, costing, zeros_except

_MAX_IN_FLIGHT = 1024


def _basis(shape, dtype):
    size = 1
    for s in shape:
        size *= s
    return jnp.eye(size, dtype=dtype).reshape((size, *shape))


def _transposed_columns(side2: Side, params: PyTree, fx2: PyTree, vjp2, index: int):
    """``J(x2)^T e`` for every basis vector ``e`` of output leaf ``index``, stacked over
    the elements of that output leaf (leading axes: its shape)."""
    leaf = jax.tree.leaves(fx2)[index]
    pe = side2.per_example
    if pe is None:
        cols = jax.vmap(lambda e: vjp2(zeros_except(fx2, index, e))[0])(
            _basis(leaf.shape, leaf.dtype))
        return jax.tree.map(lambda c: c.reshape(leaf.shape + c.shape[1:]), cols)

    axis = jax.tree.leaves(pe.out_axes)[index]

    def one(x_i, kw_i):
        y_i, vjp_i = jax.vjp(lambda p: pe.fn(p, x_i, kw_i), params)
        single = jax.tree.leaves(y_i)[index]
        cols = jax.vmap(lambda e: vjp_i(zeros_except(y_i, index, e))[0])(
            _basis(single.shape, single.dtype))
        return jax.tree.map(lambda c: c.reshape(single.shape + c.shape[1:]), cols)

    return pe.vmap(one, side2.x, out_axes=axis)


def ntk(side1: Side, side2: Side | None, params: PyTree, axes: Axes):
    fx1, jvp1 = jax.linearize(side1.fn, params)
    if side2 is None:
        fx2 = fx1
        side2 = side1
        transpose = jax.linear_transpose(jvp1, params)
        vjp2 = transpose
    else:
        fx2, vjp2 = jax.vjp(side2.fn, params)
    if side2.per_example is not None:
        vjp2 = None  # per-example VJPs are built inside _transposed_columns
    rules = axes.rules(fx1, fx2)
    leaves1, treedef = jax.tree.flatten(fx1)
    leaves2 = jax.tree.leaves(fx2)
    kernels = []
    for index, (rule, y1, y2) in enumerate(zip(rules, leaves1, leaves2)):
        cols = _transposed_columns(side2, params, fx2, vjp2, index)
        flat = jax.tree.map(lambda c, d=y2.ndim: c.reshape((-1,) + c.shape[d:]), cols)
        column = lambda t, i=index: jax.tree.leaves(jvp1(t))[i]
        if costing() or y2.size <= _MAX_IN_FLIGHT:
            full = jax.vmap(column)(flat)
        else:  # bound the memory of the tangents in flight
            full = jax.lax.map(column, flat, batch_size=_MAX_IN_FLIGHT)
        full = full.reshape(y2.shape + y1.shape)
        kernels.append(jnp.einsum(rule.full_spec(), full) / rule.trace_size(y1.shape))
    return fx1, fx2, jax.tree.unflatten(treedef, kernels)
