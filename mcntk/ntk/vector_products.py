"""NTK by vector products: ``J(x1) (J(x2)^T v)`` for every basis vector ``v``.

Each column of the kernel is one VJP through ``f(x2)`` followed by one JVP through
``f(x1)``, vectorised over the basis with ``vmap``. Neither Jacobian is stored:
when there are many basis vectors they are processed in chunks, so only a bounded
number of parameter-sized tangents is alive at once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mcntk._types import PyTree
from mcntk.ntk._sides import Axes, Options, Side, zeros_except

_MAX_IN_FLIGHT = 1024  # parameter-sized tangents alive at once (outside cost analysis)


def _basis(shape, dtype):
    size = math.prod(shape)
    return jnp.eye(size, dtype=dtype).reshape((size, *shape))


def _chunked(count: int, per_item: int, options: Options) -> int | None:
    """Items per ``lax.map`` step, or None to vmap all ``count`` items at once."""
    if options.loop_free or count * per_item <= _MAX_IN_FLIGHT:
        return None
    return max(1, _MAX_IN_FLIGHT // per_item)


def _map(fn, xs, batch_size):
    return jax.vmap(fn)(xs) if batch_size is None else jax.lax.map(fn, xs, batch_size=batch_size)


def _columns(jvp1, side2: Side, params: PyTree, fx2: PyTree, vjp2, index: int,
             options: Options):
    """``K[b..., a...] = (J(x1) J(x2)^T)`` for output leaf ``index``: x2's axes first."""
    leaf2 = jax.tree.leaves(fx2)[index]
    pe = side2.per_example
    if pe is None:
        def column(e):
            tangent = vjp2(zeros_except(fx2, index, e))[0]
            return jax.tree.leaves(jvp1(tangent))[index]

        cols = _map(column, _basis(leaf2.shape, leaf2.dtype), _chunked(leaf2.size, 1, options))
        return cols.reshape(leaf2.shape + cols.shape[1:])

    def one(x_i, kw_i):  # every column of one x2 example
        y_i, vjp_i = jax.vjp(lambda p: pe.fn(p, x_i, kw_i), params)
        single = jax.tree.leaves(y_i)[index]

        def column(e):
            return jax.tree.leaves(jvp1(vjp_i(zeros_except(y_i, index, e))[0]))[index]

        cols = jax.vmap(column)(_basis(single.shape, single.dtype))
        return cols.reshape(single.shape + cols.shape[1:])

    axis = jax.tree.leaves(pe.out_axes)[index]
    per_example = max(1, leaf2.size // max(1, leaf2.shape[axis]))
    return pe.map(one, side2.x, axis, _chunked(leaf2.shape[axis], per_example, options))


def _jvp(side: Side, params: PyTree):
    """``(f(x), t -> J(x) t)``; per example when the side has a per-example view, so that
    both sides of the kernel see the model the same way (a dropout mask per example)."""
    pe = side.per_example
    if pe is None:
        return jax.linearize(side.fn, params)
    fx = pe.vmap(lambda x_i, kw_i: pe.fn(params, x_i, kw_i), side.x, pe.out_axes)

    def jvp(tangent):
        one = lambda x_i, kw_i: jax.jvp(lambda p: pe.fn(p, x_i, kw_i), (params,), (tangent,))[1]
        return pe.vmap(one, side.x, pe.out_axes)

    return fx, jvp


def ntk(side1: Side, side2: Side | None, params: PyTree, axes: Axes, options: Options):
    fx1, jvp1 = _jvp(side1, params)
    if side2 is None:
        fx2, side2 = fx1, side1
        vjp2 = None if side1.per_example is not None else jax.linear_transpose(jvp1, params)
    elif side2.per_example is not None:
        fx2 = _jvp(side2, params)[0]
        vjp2 = None  # per-example VJPs are taken column by column
    else:
        fx2, vjp2 = jax.vjp(side2.fn, params)
    rules = axes.rules(fx1, fx2)
    leaves1, treedef = jax.tree.flatten(fx1)
    kernels = []
    for index, (rule, y1) in enumerate(zip(rules, leaves1)):
        full = _columns(jvp1, side2, params, fx2, vjp2, index, options)
        kernels.append(jnp.einsum(rule.full_spec(), full) / rule.trace_size(y1.shape))
    return fx1, fx2, jax.tree.unflatten(treedef, kernels)
