"""NTK by Jacobian contraction: build ``J(x1)`` and ``J(x2)`` and contract them."""

from __future__ import annotations

import jax

from mcntk._types import PyTree
from mcntk.ntk._sides import Axes, Options, Side, contract_outputs


def _with_output(fn):
    def f(p):
        y = fn(p)
        return y, y

    return f


def jacobian(side: Side, params: PyTree) -> tuple[PyTree, PyTree]:
    """``(f(x), J)`` where ``J`` has, per output leaf, a params pytree with leaves of
    shape ``output_leaf.shape + param.shape``. One forward pass gives both."""
    pe = side.per_example
    if pe is None:
        jac, out = jax.jacrev(_with_output(side.fn), has_aux=True)(params)
        return out, jac

    def one(x_i, kw_i):
        return jax.jacrev(_with_output(lambda p: pe.fn(p, x_i, kw_i)), has_aux=True)(params)

    jac, out = pe.vmap(one, side.x, out_axes=(pe.out_axes, pe.out_axes))
    return out, jac


def ntk(side1: Side, side2: Side | None, params: PyTree, axes: Axes, options: Options):
    fx1, j1 = jacobian(side1, params)
    fx2, j2 = (fx1, j1) if side2 is None else jacobian(side2, params)
    rules = axes.rules(fx1, fx2)
    out1, treedef = jax.tree.flatten(fx1)
    jac1 = treedef.flatten_up_to(j1)
    jac2 = treedef.flatten_up_to(j2)
    kernels = []
    for rule, y1, y2, p1, p2 in zip(rules, out1, jax.tree.leaves(fx2), jac1, jac2):
        terms = [contract_outputs(rule, a, b, a.ndim - rule.ndim, options)
                 for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2))]
        kernels.append(sum(terms[1:], terms[0]) if terms else jax.numpy.zeros(
            rule.kernel_shape(y1.shape, y2.shape), y1.dtype))
    return fx1, fx2, jax.tree.unflatten(treedef, kernels)
