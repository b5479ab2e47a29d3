"""What an NTK implementation is given: the two sides of the kernel and the axes rule."""

from __future__ import annotations

import math
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


class Options(NamedTuple):
    """How an NTK implementation should lay out its computation (explicit, never global).

    Attributes:
      loop_free: emit loop-free programs (no ``fori_loop``/``lax.map`` chunking), so
        that XLA's cost analysis, which cannot see trip counts, counts all the work.
        AUTO sets it while it costs candidates.
      platform: the platform of the devices that run the kernel (``'cpu'``,
        ``'gpu'``, ``'tpu'``); None means ``jax.default_backend()``.
      separate_sides: compute what depends on x1 apart from what depends on x2 (no
        joint batch of both sides' examples), so that x1's part can serve several
        blocks of a grid row (:mod:`mcntk._staging`).
    """

    loop_free: bool = False
    platform: str | None = None
    separate_sides: bool = False

    def on_cpu(self) -> bool:
        return (self.platform or jax.default_backend()) == "cpu"


DEFAULT_OPTIONS = Options()

# On CPU, XLA multiplies a wide (F x C) @ (C x F) product much faster in slices of
# the contracted axis than in one piece; elsewhere one product is best.
_CPU_CHUNK = 4096


def gram(a: jax.Array, b: jax.Array, options: Options = DEFAULT_OPTIONS) -> jax.Array:
    """``einsum('dfc,dgc->dfg', a, b)`` at full precision, sliced along ``c`` on CPU."""
    dot = lambda u, v: jnp.einsum("dfc,dgc->dfg", u, v, precision=jax.lax.Precision.HIGHEST)
    size = a.shape[-1]
    if options.loop_free or not options.on_cpu() or size <= 4 * _CPU_CHUNK:
        return dot(a, b)
    steps = size // _CPU_CHUNK

    def body(i, acc):
        start = i * _CPU_CHUNK
        sa = jax.lax.dynamic_slice_in_dim(a, start, _CPU_CHUNK, axis=2)
        sb = jax.lax.dynamic_slice_in_dim(b, start, _CPU_CHUNK, axis=2)
        return acc + dot(sa, sb)

    dtype = jnp.result_type(a, b)
    acc = jax.lax.fori_loop(0, steps, body,
                            jnp.zeros((a.shape[0], a.shape[1], b.shape[1]), dtype))
    if steps * _CPU_CHUNK < size:
        acc = acc + dot(a[..., steps * _CPU_CHUNK:], b[..., steps * _CPU_CHUNK:])
    return acc


def contract_outputs(rule: AxesRule, a: jax.Array, b: jax.Array, extra_dims: int = 0,
                     options: Options = DEFAULT_OPTIONS) -> jax.Array:
    """Sum over traced (and ``extra_dims`` trailing) axes of ``a * b``, as a mean over the
    traced axes, laid out by the axes rule."""
    nd = rule.ndim
    diag = list(rule.diagonal)
    free = [i for i in range(nd) if i not in rule.trace and i not in rule.diagonal]
    summed = list(rule.trace) + list(range(nd, nd + extra_dims))
    perm = diag + free + summed

    def as_3d(x):
        x = jnp.transpose(x, perm) if perm != sorted(perm) else x
        d = math.prod(x.shape[: len(diag)])
        f = math.prod(x.shape[len(diag): len(diag) + len(free)])
        return x.reshape(d, f, -1)

    g = gram(as_3d(a), as_3d(b), options)
    shape_a, shape_b = jnp.shape(a), jnp.shape(b)
    g = g.reshape([shape_a[i] for i in diag] + [shape_a[i] for i in free]
                  + [shape_b[i] for i in free])
    # kernel axis order: per output axis, diagonal -> once, free -> (x1, x2)
    order = []
    for i in range(nd):
        if i in rule.diagonal:
            order.append(diag.index(i))
        elif i not in rule.trace:
            k = free.index(i)
            order.extend([len(diag) + k, len(diag) + len(free) + k])
    if order != list(range(len(order))):
        g = jnp.transpose(g, order)
    return g / rule.trace_size(shape_a)


def nngp(axes: Axes, fx1: PyTree, fx2: PyTree, options: Options = DEFAULT_OPTIONS) -> PyTree:
    """The empirical NNGP of one sample: one kernel per output leaf."""
    rules = axes.rules(fx1, fx2)
    l1, treedef = jax.tree.flatten(fx1)
    l2 = jax.tree.leaves(fx2)
    kernels = [contract_outputs(r, a, b, 0, options) for r, a, b in zip(rules, l1, l2)]
    return jax.tree.unflatten(treedef, kernels)


NtkFn = Callable[[Side, "Side | None", PyTree, Axes, Options], tuple[PyTree, PyTree, PyTree]]
"""``(side1, side2_or_None, params, axes, options) -> (f(x1), f(x2), ntk)``; side2 None
means x2 = x1."""


def zeros_except(tree: PyTree, index: int, leaf: Any) -> PyTree:
    """``tree`` of zeros, with leaf number ``index`` replaced by ``leaf``."""
    leaves, treedef = jax.tree.flatten(tree)
    out = [leaf if i == index else jnp.zeros(jnp.shape(v), jnp.result_type(v))
           for i, v in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)
