"""``NtkImplementation.AUTO``: pick the implementation XLA's cost model rates cheapest.

Each candidate one-sample kernel function is lowered (traced, not compiled) for the
given argument shapes and the FLOP counts of the lowered programs are compared. The
answer is cached per signature, so the price is paid once per input shape.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax

from mcntk._types import NtkImplementation
from mcntk.ntk import IMPLEMENTATIONS
from mcntk.ntk._sides import loop_free

_CACHE: dict[Hashable, NtkImplementation] = {}
_CACHE_LIMIT = 512


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(jax.numpy.shape(a), jax.numpy.result_type(a))
        if hasattr(a, "shape") or isinstance(a, (int, float, complex)) else a, tree)


def signature(*trees: Any) -> Hashable:
    """A hashable description of the shapes and dtypes of ``trees``."""
    leaves, treedef = jax.tree.flatten(trees)
    return treedef, tuple((jax.numpy.shape(x), str(jax.numpy.result_type(x))) for x in leaves)


def flops(fn: Callable, *args: Any) -> float:
    """FLOPs of ``fn(*args)`` according to XLA's cost analysis of the lowered program."""
    try:
        with loop_free():
            cost = jax.jit(fn).lower(*_abstract(args)).cost_analysis()
    except Exception:  # a backend without a cost model: treat as unknown
        return float("inf")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return float("inf") if value is None or value < 0 else float(value)


def choose(make_fn: Callable[[NtkImplementation], Callable], args: tuple,
           key: Hashable | None) -> NtkImplementation:
    """The cheapest implementation for ``make_fn(impl)(*args)``; cached under ``key``."""
    if key is not None and key in _CACHE:
        return _CACHE[key]
    costs = {impl: flops(make_fn(impl), *args) for impl in IMPLEMENTATIONS}
    best = min(costs, key=lambda i: (costs[i], int(i)))
    if key is not None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[key] = best
    return best
