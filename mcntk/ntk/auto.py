"""``NtkImplementation.AUTO``: pick the implementation XLA's cost model rates cheapest.

Each candidate one-sample kernel function is lowered (traced, not compiled) for the
given argument shapes, in its loop-free form, and the costs of the lowered programs
are compared. The answer is cached by the caller (the kernel function that owns
the cache), per signature, so the price is paid once per input shape.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, NamedTuple

import jax

from mcntk._types import NtkImplementation
from mcntk.ntk import IMPLEMENTATIONS
from mcntk.ntk._sides import Options

CACHE_LIMIT = 512


class Choice(NamedTuple):
    """What AUTO chose for one signature, and the cost of every candidate."""

    implementation: NtkImplementation
    costs: dict[NtkImplementation, float]

    def __str__(self) -> str:
        listed = ", ".join(f"{i.name}: {c:.3g}" for i, c in sorted(self.costs.items()))
        return f"{self.implementation.name} (estimated cost {listed})"


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
        cost = jax.jit(fn).lower(*_abstract(args)).cost_analysis()
    except Exception:  # a backend without a cost model: treat as unknown
        return float("inf")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return float("inf") if value is None or value < 0 else float(value)


def choose(make_fn: Callable[[NtkImplementation, Options], Callable], args: tuple,
           cache: MutableMapping[Hashable, Choice] | None = None,
           key: Hashable | None = None) -> Choice:
    """The cheapest implementation for ``make_fn(impl, options)(*args)``.

    ``cache`` (owned by the caller) memoises the choice under ``key``.
    """
    if cache is not None and key is not None and key in cache:
        return cache[key]
    costing = Options(loop_free=True)
    costs = {impl: flops(make_fn(impl, costing), *args) for impl in IMPLEMENTATIONS}
    best = min(costs, key=lambda i: (costs[i], int(i)))
    choice = Choice(best, costs)
    if cache is not None and key is not None:
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[key] = choice
    return choice
