"""``NtkImplementation.AUTO``: pick the implementation with the lowest estimated cost.

Each candidate one-sample kernel function is lowered (traced, not compiled) for the
given argument shapes, in its loop-free form, and XLA's cost analysis of the lowered
program gives its FLOPs and the bytes its operations read and write. The estimate
is a roofline-style sum, in FLOP units::

    cost = flops + BYTE_COST * bytes_accessed

FLOPs alone mislead: a Jacobian contraction often has fewer FLOPs than its
alternatives but materialises Jacobians of outputs x parameters entries, and its
time is then spent moving them (e.g. the MLP 32-512-512-10 of issue 8: JC 2.5e10
FLOPs and 5.9e9 bytes in 1.4 s; vector products 4.6e10 FLOPs and 3.5e9 bytes in
1.0 s; structured derivatives 9e8 FLOPs and 6e7 bytes in 0.02 s).

The answer is cached by the caller (the kernel function that owns the cache), per
signature, so the price is paid once per input shape. A candidate that fails to
lower is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, NamedTuple

import jax

from mcntk._types import NtkImplementation
from mcntk.ntk import IMPLEMENTATIONS
from mcntk.ntk._sides import Options

CACHE_LIMIT = 512

BYTE_COST = 12.0
"""FLOPs that one byte of memory traffic costs as much time as.

Measured on a 2-core CPU with mcntk's three implementations on a dozen models
(MLPs, CNNs, fully-convolutional nets; 1e4 to 1e11 FLOPs): time fits
``flops / 50 GFLOP/s + bytes / 4-6 GB/s``, where bytes are those of the lowered
(not yet fused) program. Accelerators have a similar ratio of peak FLOP rate to
memory bandwidth (e.g. ~10-15 for an H100/H200 in float32)."""


class Cost(NamedTuple):
    """XLA's estimate for one lowered program."""

    flops: float
    bytes: float

    @property
    def total(self) -> float:
        return self.flops + BYTE_COST * self.bytes


UNKNOWN = Cost(float("inf"), float("inf"))


class Choice(NamedTuple):
    """What AUTO chose for one signature, and the estimated cost of every candidate
    (``Cost.total``, in FLOP units; ``details`` has FLOPs and bytes)."""

    implementation: NtkImplementation
    costs: dict[NtkImplementation, float]
    details: dict[NtkImplementation, Cost] = {}

    def __str__(self) -> str:
        def show(impl):
            d = self.details.get(impl)
            extra = f" ({d.flops:.3g} FLOPs, {d.bytes:.3g} bytes)" if d else ""
            return f"{impl.name} {self.costs[impl]:.3g}{extra}"

        listed = "; ".join(show(i) for i in sorted(self.costs))
        return (f"{self.implementation.name}: lowest estimated cost, FLOPs + "
                f"{BYTE_COST:g} x bytes accessed ({listed})")


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(jax.numpy.shape(a), jax.numpy.result_type(a))
        if hasattr(a, "shape") or isinstance(a, (int, float, complex)) else a, tree)


def signature(*trees: Any) -> Hashable:
    """A hashable description of the shapes and dtypes of ``trees``."""
    leaves, treedef = jax.tree.flatten(trees)
    return treedef, tuple((jax.numpy.shape(x), str(jax.numpy.result_type(x))) for x in leaves)


def cost(fn: Callable, *args: Any) -> Cost:
    """FLOPs and bytes accessed of ``fn(*args)`` by XLA's cost analysis of the lowered
    program (:data:`UNKNOWN` if it cannot be lowered or the backend has no cost model)."""
    try:
        analysis = jax.jit(fn).lower(*_abstract(args)).cost_analysis()
    except Exception:  # noqa: BLE001 -- a candidate that cannot be costed is skipped
        return UNKNOWN
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    flops, moved = analysis.get("flops"), analysis.get("bytes accessed")
    if flops is None or flops < 0:
        return UNKNOWN
    return Cost(float(flops), float(moved) if moved is not None and moved >= 0 else 0.0)


def choose(make_fn: Callable[[NtkImplementation, Options], Callable], args: tuple,
           cache: MutableMapping[Hashable, Choice] | None = None,
           key: Hashable | None = None) -> Choice:
    """The cheapest implementation for ``make_fn(impl, options)(*args)``.

    ``cache`` (owned by the caller) memoises the choice under ``key``.
    """
    if cache is not None and key is not None and key in cache:
        return cache[key]
    costing = Options(loop_free=True)
    details = {impl: cost(make_fn(impl, costing), *args) for impl in IMPLEMENTATIONS}
    costs = {impl: d.total for impl, d in details.items()}
    best = min(costs, key=lambda i: (costs[i], int(i)))
    choice = Choice(best, costs, details)
    if cache is not None and key is not None:
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[key] = choice
    return choice
