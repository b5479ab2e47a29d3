"""The block plan of a kernel grid: which x1 x x2 blocks to compute and how to
assemble them. Knows nothing of which kernel it computes, nor of devices.

Inputs are split along axis 0 of every input leaf (the batch axis); each output
leaf's kernel has its batch axes first: ``(n1, n2, ...)``, or ``(n, ...)`` when
output axis 0 is diagonal. Sizes that do not divide the batch are padded by
repeating the last example, and the padding is cropped from the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcntk._types import PyTree


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"`batch_size` must be a non-negative int, got {batch_size!r}.")
    if batch_size < 0:
        raise ValueError(f"`batch_size` must be a positive int or 0 (no batching), "
                         f"got {batch_size}.")
    return int(batch_size)


def batch_length(x: PyTree, name: str) -> int:
    """The common size of axis 0 of the leaves of ``x``."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(x)}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"`{name}` must have leaves with the same leading (batch) dimension to be split "
            f"into batches; got leading sizes {sorted(s for s in sizes if s is not None)} "
            f"(scalar leaves: {None in sizes})."
        )
    return sizes.pop()


class GridPlan:
    """Blocks ``(i, j)`` of a kernel over ``n1`` x ``n2`` examples.

    Args:
      n1, n2: numbers of examples in x1 and x2 (``n2 = n1`` when x2 is None).
      batch_size: block size; 0 means one block.
      symmetric: x2 is None, so block ``(j, i)`` is the transpose of ``(i, j)``.
      diagonal: output axis 0 is a diagonal axis: only blocks ``(i, i)`` exist.
    """

    def __init__(self, n1: int, n2: int, batch_size: int, symmetric: bool, diagonal: bool):
        if diagonal and n1 != n2:
            raise ValueError(
                f"`diagonal_axes` contains the batch axis 0, so x1 and x2 need the same number "
                f"of examples; got {n1} and {n2}."
            )
        self.n1, self.n2 = n1, n2
        self.symmetric, self.diagonal = symmetric, diagonal
        self.b1 = n1 if batch_size == 0 else min(batch_size, n1)
        self.b2 = n2 if batch_size == 0 else min(batch_size, n2)
        if symmetric or diagonal:
            self.b1 = self.b2 = max(self.b1, self.b2)
        self.k1 = math.ceil(n1 / self.b1)
        self.k2 = math.ceil(n2 / self.b2)

    @property
    def single(self) -> bool:
        return self.k1 == 1 and self.k2 == 1

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Blocks to compute, row by row."""
        for i in range(self.k1):
            if self.diagonal:
                yield i, i
                continue
            for j in range(i if self.symmetric else 0, self.k2):
                yield i, j

    @staticmethod
    def _pad(x: PyTree, total: int) -> PyTree:
        def pad(a):
            n = a.shape[0]
            if n == total:
                return a
            idx = jnp.minimum(jnp.arange(total), n - 1)
            return jnp.take(a, idx, axis=0)
        return jax.tree.map(pad, x)

    def split(self, x: PyTree, first: bool) -> list[PyTree]:
        """The blocks of x1 (``first``) or x2, padded to whole blocks."""
        b, k = (self.b1, self.k1) if first else (self.b2, self.k2)
        padded = self._pad(x, b * k)
        return [jax.tree.map(lambda a, i=i: a[i * b:(i + 1) * b], padded) for i in range(k)]

    def assemble(self, blocks: dict[tuple[int, int], Any], swap_perm: list[tuple[int, ...]],
                 on_device: bool) -> PyTree:
        """One kernel pytree from the blocks (each a pytree of kernel leaves)."""
        xp = jnp if on_device else np
        if self.single:
            return blocks[0, 0]
        first = blocks[0, 0]
        leaves_by_block = {ij: jax.tree.leaves(t) for ij, t in blocks.items()}
        treedef = jax.tree.structure(first)
        out = []
        for leaf_i, perm in enumerate(swap_perm):
            def get(i, j, leaf_i=leaf_i, perm=perm):
                if (i, j) in leaves_by_block:
                    return leaves_by_block[i, j][leaf_i]
                return xp.transpose(leaves_by_block[j, i][leaf_i], perm)
            if self.diagonal:
                full = xp.concatenate([get(i, i) for i in range(self.k1)], axis=0)[: self.n1]
            else:
                rows = [xp.concatenate([get(i, j) for j in range(self.k2)], axis=1)
                        for i in range(self.k1)]
                full = xp.concatenate(rows, axis=0)[: self.n1, : self.n2]
            out.append(full)
        return jax.tree.unflatten(treedef, out)
