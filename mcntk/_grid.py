"""The block plan of a kernel grid: which x1 x x2 blocks to compute, how to cut the
inputs into blocks and how to assemble the blocks. Knows nothing of which kernel
it computes, nor of devices.

Every leaf of a side is cut along its own batch axis (see :mod:`mcntk._inputs`);
sizes that do not divide the block size are padded by repeating the last example,
and the padding is cropped from the result. In a kernel leaf, the examples sit on
the axes that the output's batch axis contributes under the axes rule
(:class:`Layout`): a pair ``(n1, n2)``, or one axis when that output axis is diagonal.
Blocks of a grid are stacked along a new leading axis, so that blocks computed by
the same program form one array.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcntk import _inputs
from mcntk._axes import AxesRule
from mcntk._types import PyTree


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"`batch_size` must be a non-negative int, got {batch_size!r}.")
    if batch_size < 0:
        raise ValueError(f"`batch_size` must be a positive int or 0 (no batching), "
                         f"got {batch_size}.")
    return int(batch_size)


class Layout(NamedTuple):
    """Where the examples are in one kernel leaf.

    Attributes:
      axis: the kernel axis of x1's examples; x2's follow at ``axis + 1`` unless
        ``diagonal``.
      diagonal: the batch axis is a diagonal axis (one axis of paired examples).
      swap: the permutation of kernel axes that turns K(x1, x2) into K(x2, x1).
    """

    axis: int
    diagonal: bool
    swap: tuple[int, ...]


def layout(rule: AxesRule, out_axis: int) -> Layout:
    """The :class:`Layout` of a kernel whose output holds its examples on ``out_axis``."""
    pos = sum(0 if i in rule.trace else 1 if i in rule.diagonal else 2
              for i in range(out_axis))
    return Layout(pos, out_axis in rule.diagonal, rule.swap_perm())


class GridPlan:
    """Blocks ``(i, j)`` of a kernel over ``n1`` x ``n2`` examples.

    Args:
      n1, n2: numbers of examples of the two sides.
      batch_size: block size; 0 means one block.
      symmetric: x2 is None: diagonal blocks ``(i, i)`` are computed from ``f(x1)``
        alone.
      mirror: block ``(j, i)`` is the transpose of ``(i, j)`` (symmetric and
        deterministic): only blocks with ``i <= j`` are computed.
      diagonal: the examples' axis is diagonal: only blocks ``(i, i)`` exist.
    """

    def __init__(self, n1: int, n2: int, batch_size: int, symmetric: bool, mirror: bool,
                 diagonal: bool):
        if diagonal and n1 != n2:
            raise ValueError(
                f"`diagonal_axes` contains the axis that holds the examples, so x1 and x2 "
                f"need the same number of examples; got {n1} and {n2}.")
        self.n1, self.n2 = n1, n2
        self.symmetric, self.mirror, self.diagonal = symmetric, mirror and symmetric, diagonal
        self.b1 = n1 if batch_size == 0 else min(batch_size, n1)
        self.b2 = n2 if batch_size == 0 else min(batch_size, n2)
        if symmetric or diagonal:
            self.b1 = self.b2 = max(self.b1, self.b2)
        self.k1 = math.ceil(n1 / self.b1)
        self.k2 = math.ceil(n2 / self.b2)

    @property
    def single(self) -> bool:
        return self.k1 == 1 and self.k2 == 1

    def pairs(self) -> list[tuple[int, int]]:
        """Blocks to compute, row by row."""
        if self.diagonal:
            return [(i, i) for i in range(self.k1)]
        return [(i, j) for i in range(self.k1)
                for j in range(i if self.mirror else 0, self.k2)]

    def groups(self) -> dict[bool, list[tuple[int, int]]]:
        """The blocks by program: ``True`` for blocks computed from ``f(x1)`` alone
        (diagonal blocks of a symmetric call), ``False`` for the others."""
        out: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        for i, j in self.pairs():
            out[self.symmetric and i == j].append((i, j))
        return {k: v for k, v in out.items() if v}

    def split(self, side: _inputs.Side, first: bool) -> Blocks:
        """Cuts every batched leaf of ``side`` into blocks stacked on a new axis 0."""
        b, k = (self.b1, self.k1) if first else (self.b2, self.k2)
        leaves, axes = side.leaves_and_axes()
        if self.single:  # one block: the side as it is
            return Blocks(side, leaves, [False] * len(leaves))
        out = [leaf if a is None else _cut(leaf, a, b, k) for leaf, a in zip(leaves, axes)]
        return Blocks(side, out, [a is not None for a in axes])

    def assemble(self, xp: Any, stacked: Any, where: Layout) -> Any:
        """One kernel leaf from its blocks, ``stacked`` in :meth:`pairs` order."""
        if self.diagonal:
            grid = stacked  # (k, *block)
            grid = xp.moveaxis(grid, 0, where.axis)
            shape = list(grid.shape)
            merged = shape[: where.axis] + [shape[where.axis] * shape[where.axis + 1]]
            full = grid.reshape(merged + shape[where.axis + 2:])
            return _crop(xp, full, {where.axis: self.n1})
        index = np.zeros((self.k1, self.k2), np.int32)
        lower = np.zeros((self.k1, self.k2), bool)
        for p, (i, j) in enumerate(self.pairs()):
            index[i, j] = p
            if self.mirror and i != j:
                index[j, i] = p
                lower[j, i] = True
        grid = stacked[index]  # (k1, k2, *block)
        if lower.any():
            swapped = xp.transpose(stacked, (0, *(1 + a for a in where.swap)))[index]
            mask = lower.reshape(lower.shape + (1,) * (grid.ndim - 2))
            grid = xp.where(mask, swapped, grid)
        a = where.axis
        # (k1, k2, ..., b1, b2, ...) -> (..., k1, b1, k2, b2, ...)
        grid = xp.moveaxis(grid, (0, 1), (a, a + 2))
        shape = list(grid.shape)
        full = grid.reshape(shape[:a] + [shape[a] * shape[a + 1], shape[a + 2] * shape[a + 3]]
                            + shape[a + 4:])
        return _crop(xp, full, {a: self.n1, a + 1: self.n2})


class Blocks(NamedTuple):
    """A side cut into blocks: batched leaves have a leading block axis."""

    side: _inputs.Side
    leaves: list
    batched: list[bool]

    def block(self, i: Any) -> _inputs.Side:
        """Block ``i`` (may be traced) as a side of its own."""
        return self.rebuild(self.block_leaves(i))

    def block_leaves(self, i: Any) -> list:
        """The leaves of block ``i`` (may be traced)."""
        return [jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False) if b else v
                for v, b in zip(self.leaves, self.batched)]

    def first_leaves(self) -> list:
        """The leaves of one block, abstract where they are cut."""
        return [jax.ShapeDtypeStruct(jnp.shape(v)[1:], jnp.result_type(v)) if b
                else v for v, b in zip(self.leaves, self.batched)]

    def first(self) -> _inputs.Side:
        """The shapes of one block (abstract)."""
        return self.rebuild(self.first_leaves())

    def rebuild(self, leaves: list) -> _inputs.Side:
        nx = len(self.side.x_axes)
        x = jax.tree.unflatten(jax.tree.structure(self.side.x), leaves[:nx])
        return self.side._replace(x=x, dyn=list(leaves[nx:]))


def _cut(leaf: Any, axis: int, b: int, k: int) -> Any:
    n = jnp.shape(leaf)[axis]
    if n != b * k:
        idx = jnp.minimum(jnp.arange(b * k), n - 1)
        leaf = jnp.take(leaf, idx, axis=axis)
    shape = jnp.shape(leaf)
    blocks = jnp.reshape(leaf, shape[:axis] + (k, b) + shape[axis + 1:])
    return jnp.moveaxis(blocks, axis, 0)


def _crop(xp: Any, full: Any, sizes: dict[int, int]) -> Any:
    index = tuple(slice(0, sizes[i]) if i in sizes else slice(None) for i in range(full.ndim))
    return full[index] if any(full.shape[i] != n for i, n in sizes.items()) else full


def stack_blocks(blocks: list[PyTree]) -> PyTree:
    """Blocks (pytrees of arrays) stacked leaf by leaf on a new axis 0."""
    return jax.tree.map(lambda *v: jnp.stack(v), *blocks)
