"""The axes rule: how ``trace_axes`` and ``diagonal_axes`` shape a kernel.

For one output leaf with ``ndim`` axes, output ``f(x1)`` of shape ``s1`` and
``f(x2)`` of shape ``s2``, every output axis ``i`` in order contributes to the
kernel:

* nothing, if ``i`` is in ``trace_axes``: the axis is summed over (and the kernel
  is divided by the product of the traced sizes, so it is a mean);
* one axis of size ``s1[i]``, if ``i`` is in ``diagonal_axes``: only
  ``x1``-``x2`` pairs at the same index are kept (``s1[i]`` must equal ``s2[i]``);
* two adjacent axes ``(s1[i], s2[i])`` otherwise.

E.g. an output of shape ``(N, H, W, C)`` with the default ``trace_axes=(-1,)``
gives a kernel of shape ``(N1, N2, H, H, W, W)``. Negative axes count from the
end of the output. An axis may not be both traced and diagonal.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Any

_LETTERS = string.ascii_letters


def check_axes_arg(axes: Any, name: str) -> tuple[int, ...]:
    """Validates the type of ``trace_axes``/``diagonal_axes`` before ndim is known."""
    if isinstance(axes, bool):
        raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.")
    if isinstance(axes, int):
        return (axes,)
    if isinstance(axes, Sequence) and not isinstance(axes, str):
        for a in axes:
            if isinstance(a, bool) or not isinstance(a, int):
                raise TypeError(f"`{name}` must contain only ints, got {axes!r}.")
        normalized = tuple(int(a) for a in axes)
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"`{name}` lists an axis twice: {axes!r}.")
        return normalized
    raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.")


def check_disjoint_static(trace_axes: tuple[int, ...], diagonal_axes: tuple[int, ...]) -> None:
    """Rejects an axis listed (with the same sign) in both arguments."""
    both = sorted(set(trace_axes) & set(diagonal_axes))
    if both:
        raise ValueError(
            f"axes {both} are in both `trace_axes`={trace_axes} and "
            f"`diagonal_axes`={diagonal_axes}; an axis is either traced or diagonal."
        )


def canonicalize(axes: tuple[int, ...], ndim: int, name: str) -> tuple[int, ...]:
    """Maps axes into ``range(ndim)``; raises if out of range or repeated."""
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}`={axes} has axis {a}, out of range for an output with {ndim} "
                f"dimension(s) (valid: {-ndim}..{ndim - 1})."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axes} names the same output axis twice (ndim={ndim}).")
    return tuple(sorted(out))


class AxesRule:
    """The canonical trace/diagonal axes of one output leaf of known ``ndim``."""

    def __init__(self, trace_axes: tuple[int, ...], diagonal_axes: tuple[int, ...], ndim: int):
        self.ndim = ndim
        self.trace = canonicalize(trace_axes, ndim, "trace_axes")
        self.diagonal = canonicalize(diagonal_axes, ndim, "diagonal_axes")
        both = sorted(set(self.trace) & set(self.diagonal))
        if both:
            raise ValueError(
                f"output axes {both} are both traced (`trace_axes`={trace_axes}) and diagonal "
                f"(`diagonal_axes`={diagonal_axes}) for an output with {ndim} dimension(s)."
            )

    def check_shapes(self, shape1: tuple[int, ...], shape2: tuple[int, ...]) -> None:
        """Traced and diagonal axes must have equal sizes in both outputs."""
        if len(shape1) != len(shape2):
            raise ValueError(
                f"f(x1) has shape {shape1} and f(x2) has shape {shape2}: outputs must have "
                "the same number of dimensions."
            )
        for i in self.trace + self.diagonal:
            if shape1[i] != shape2[i]:
                kind = "traced" if i in self.trace else "diagonal"
                raise ValueError(
                    f"output axis {i} is {kind} but has size {shape1[i]} for x1 and "
                    f"{shape2[i]} for x2 (outputs {shape1} and {shape2}); sizes must match."
                )

    def kernel_shape(self, shape1: tuple[int, ...], shape2: tuple[int, ...]) -> tuple[int, ...]:
        out: list[int] = []
        for i in range(self.ndim):
            if i in self.trace:
                continue
            if i in self.diagonal:
                out.append(shape1[i])
            else:
                out.extend((shape1[i], shape2[i]))
        return tuple(out)

    def trace_size(self, shape1: tuple[int, ...]) -> int:
        return math.prod(shape1[i] for i in self.trace)

    def _letters(self) -> tuple[list[str], list[str], list[str]]:
        """Subscripts of the x1 side, the x2 side and the kernel."""
        a = list(_LETTERS[: self.ndim])
        b = list(_LETTERS[self.ndim : 2 * self.ndim])
        out: list[str] = []
        for i in range(self.ndim):
            if i in self.trace or i in self.diagonal:
                b[i] = a[i]
            if i in self.trace:
                continue
            out.extend([a[i]] if i in self.diagonal else [a[i], b[i]])
        return a, b, out

    def full_spec(self) -> str:
        """einsum for ``T -> K`` where T has the x2 output axes then the x1 output axes."""
        a, b, out = self._letters()
        return f"{''.join(b)}{''.join(a)}->{''.join(out)}"

    def swap_perm(self) -> tuple[int, ...]:
        """Permutation that turns K(x1, x2) into K(x2, x1) (swaps every axis pair)."""
        perm: list[int] = []
        pos = 0
        for i in range(self.ndim):
            if i in self.trace:
                continue
            if i in self.diagonal:
                perm.append(pos)
                pos += 1
            else:
                perm.extend([pos + 1, pos])
                pos += 2
        return tuple(perm)
