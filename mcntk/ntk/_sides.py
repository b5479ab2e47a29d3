"""What an NTK implementation is given: the two sides of the kernel and the axes rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mcntk._apply import PerExample
from mcntk._axes import AxesRule
from mcntk._types import PyTree


class Side(NamedTuple):
    """One input of the kernel, ready to evaluate.

    Attributes:
      fn: ``params -> f(x)`` on the whole batch.
      x: the input pytree.
      per_example: the one-example view of ``fn`` when ``vmap_axes`` is given.
    """

    fn: Callable[[PyTree], PyTree]
    x: PyTree
    per_example: PerExample | None


class Axes(NamedTuple):
    """``trace_axes`` and ``diagonal_axes`` as given by the user (validated types)."""

    trace: tuple[int, ...]
    diagonal: tuple[int, ...]

    def rules(self, fx1: PyTree, fx2: PyTree) -> list[AxesRule]:
        """One rule per output leaf, after checking the two outputs are compatible."""
        l1, t1 = jax.tree.flatten(fx1)
        l2, t2 = jax.tree.flatten(fx2)
        if t1 != t2:
            raise ValueError(f"f(x1) and f(x2) have different structures: {t1} vs {t2}.")
        rules = []
        for a, b in zip(l1, l2):
            rule = AxesRule(self.trace, self.diagonal, jnp.ndim(a))
            rule.check_shapes(jnp.shape(a), jnp.shape(b))
            rules.append(rule)
        return rules


def contract_outputs(rule: AxesRule, a: jax.Array, b: jax.Array, extra_dims: int = 0) -> jax.Array:
    """``sum`` over traced (and ``extra_dims`` trailing) axes of ``a * b``, as a mean."""
    spec = rule.pair_spec(extra_dims)
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST) / rule.trace_size(
        jnp.shape(a))


def nngp(axes: Axes, fx1: PyTree, fx2: PyTree) -> PyTree:
    """The empirical NNGP of one sample: one kernel per output leaf."""
    rules = axes.rules(fx1, fx2)
    l1, treedef = jax.tree.flatten(fx1)
    l2 = jax.tree.leaves(fx2)
    kernels = [contract_outputs(r, a, b) for r, a, b in zip(rules, l1, l2)]
    return jax.tree.unflatten(treedef, kernels)


NtkFn = Callable[[Side, "Side | None", PyTree, Axes], tuple[PyTree, PyTree, PyTree]]
"""``(side1, side2_or_None, params, axes) -> (f(x1), f(x2), ntk)``; side2 None means x2 = x1."""


def zeros_except(tree: PyTree, index: int, leaf: Any) -> PyTree:
    """``tree`` of zeros, with leaf number ``index`` replaced by ``leaf``."""
    leaves, treedef = jax.tree.flatten(tree)
    out = [leaf if i == index else jnp.zeros(jnp.shape(v), jnp.result_type(v))
           for i, v in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)
