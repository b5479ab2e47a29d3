"""Accumulation of one-sample kernels: a small set of pure functions on ``Moments``.

``init`` makes empty moments, ``update`` adds one sample, ``merge`` combines the
moments of disjoint sets of samples (other devices, other slots), ``finalize``
gives the mean and the standard error of the mean. Like an optax transformation,
the state is an explicit value, so it can be sharded, checkpointed and resumed.

The mean is ``total / count``: the plain sum of the samples, kept in at least
float32, divided once, so it does not depend on whether standard errors are
tracked. Standard errors use Welford's running mean and sum of squared deviations,
merged with Chan et al.'s pairwise formula, which is exact for any split of the
samples and stable over 10^5 samples.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mcntk._types import PyTree


def accumulator_dtype(dtype: Any) -> Any:
    """Sums of many samples are kept in at least float32 (bfloat16 sums stall)."""
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


class Moments(NamedTuple):
    """Running moments of a pytree of kernels; every field may carry leading axes.

    Attributes:
      count: samples added (int32).
      total: the sum of the samples.
      mean: Welford's running mean, or None when standard errors are not tracked.
      m2: the sum of squared deviations from the mean, or None likewise.
    """

    count: Any
    total: PyTree
    mean: PyTree | None
    m2: PyTree | None


def shapes_of(shapes: PyTree, stderr: bool, lead: tuple[int, ...] = ()) -> Moments:
    """The ShapeDtypeStructs of :func:`init`'s result (without tracing it)."""
    like = lambda: jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        lead + tuple(s.shape), accumulator_dtype(s.dtype)), shapes)
    count = jax.ShapeDtypeStruct(lead, jnp.int32)
    return Moments(count, like(), like() if stderr else None, like() if stderr else None)


def init(shapes: PyTree, stderr: bool, lead: tuple[int, ...] = ()) -> Moments:
    """Empty moments for kernels of ``shapes`` (ShapeDtypeStructs), with leading axes."""
    zeros = lambda: jax.tree.map(
        lambda s: jnp.zeros(lead + tuple(s.shape), accumulator_dtype(s.dtype)), shapes)
    return Moments(jnp.zeros(lead, jnp.int32), zeros(), zeros() if stderr else None,
                   zeros() if stderr else None)


def update(m: Moments, sample: PyTree, ok: Any) -> Moments:
    """``m`` with ``sample`` added where ``ok`` (a traced bool) is true."""
    add = lambda a, b: jnp.where(ok, a + b.astype(a.dtype), a)
    count = m.count + ok.astype(jnp.int32)
    total = jax.tree.map(add, m.total, sample)
    if m.mean is None:
        return Moments(count, total, None, None)
    n = jnp.maximum(count, 1)

    def welford(mean, m2, x):
        x = x.astype(mean.dtype)
        delta = x - mean
        new_mean = mean + delta / n.astype(mean.dtype)
        new_m2 = m2 + delta * (x - new_mean)
        return jnp.where(ok, new_mean, mean), jnp.where(ok, new_m2, m2)

    pairs = jax.tree.map(welford, m.mean, m.m2, sample)
    outer = jax.tree.structure(m.mean)
    mean, m2 = jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
    return Moments(count, total, mean, m2)


def merge(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two disjoint sets of samples."""
    count = a.count + b.count
    total = jax.tree.map(jnp.add, a.total, b.total)
    if a.mean is None:
        return Moments(count, total, None, None)

    def chan(ma, m2a, mb, m2b):
        na, nb = a.count.astype(ma.dtype), b.count.astype(ma.dtype)
        n = jnp.maximum(na + nb, 1)
        na, nb, n = (_expand(v, ma) for v in (na, nb, n))
        delta = mb - ma
        return ma + delta * nb / n, m2a + m2b + delta * delta * na * nb / n

    pairs = jax.tree.map(chan, a.mean, a.m2, b.mean, b.m2)
    outer = jax.tree.structure(a.mean)
    mean, m2 = jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
    return Moments(count, total, mean, m2)


def _expand(v: Any, like: Any) -> Any:
    return jnp.reshape(v, jnp.shape(v) + (1,) * (jnp.ndim(like) - jnp.ndim(v)))


def merge_axis(m: Moments, axis: int = 0) -> Moments:
    """Merges the moments along a leading ``axis`` (e.g. the slots of sample-sharded
    devices). Sums of ``total`` keep the order of a plain sum over that axis."""
    size = jnp.shape(m.count)[axis]
    take = lambda i: jax.tree.map(lambda v: jnp.take(v, i, axis=axis), m)
    if m.mean is None:
        return Moments(jnp.sum(m.count, axis), jax.tree.map(lambda v: jnp.sum(v, axis), m.total),
                       None, None)
    out = take(0)
    for i in range(1, size):
        out = merge(out, take(i))
    return out._replace(total=jax.tree.map(lambda v: jnp.sum(v, axis), m.total))


def mean(m: Moments, dtypes: PyTree) -> PyTree:
    """The plain estimate ``total / count`` in the kernels' own dtypes."""
    return jax.tree.map(lambda t, d: (t / _expand(m.count, t).astype(t.dtype)).astype(d.dtype),
                        m.total, dtypes)


def stderr(m: Moments, dtypes: PyTree) -> PyTree:
    """``sqrt(unbiased sample variance / count)`` per entry (NaN below two samples)."""
    def one(m2, d):
        n = _expand(m.count, m2).astype(m2.dtype)
        var = m2 / jnp.where(n > 1, n - 1, jnp.nan)
        return jnp.sqrt(jnp.maximum(var, 0) / n).astype(d.dtype)

    return jax.tree.map(one, m.m2, dtypes)
