"""The sampler: the key schedule and a compiled loop over parameter samples.

Sample ``s`` (1-based) of a run started from ``key`` uses::

    key, split = jax.random.split(key)              # advanced once per sample
    init_key, dropout_key = jax.random.split(split)
    params = init_fn(init_key, input_shape)[1]

and ``dropout_key`` is the ``rng`` of ``f(x1)`` (``f(x2)`` follows the rule of
:mod:`mcntk._apply`). This is neural-tangents' schedule, so the same key gives the
same estimate. The loop over samples is a ``lax.fori_loop`` with a traced trip
count inside one ``jax.jit``: any number of samples reuses one compilation, and a
run can stop and continue from the returned key. ``SAMPLES_PER_STEP > 1`` vmaps
that many samples per loop step (more parallelism, more memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mcntk._apply import second_key
from mcntk._types import PyTree

SAMPLES_PER_STEP = 1

# (params, key1, key2, x1, x2, dyn_kwargs) -> pytree of one-sample kernels
OneSample = Callable[[PyTree, Any, Any, PyTree, PyTree, Any], PyTree]


def materialized_params(init: Callable, init_key: Any, dyn: Any, live: Any) -> PyTree:
    """``init(init_key, dyn)`` (the params), computed behind a conditional.

    ``live`` is a traced bool that is always true. Without the conditional, XLA may
    fuse the element-wise tail of parameter sampling (e.g. the inverse error
    function of a normal draw) into the huge Jacobian fusions downstream and
    recompute it for every Jacobian entry: 2-3x slower on CPU. A conditional's
    result is materialised once.
    """
    draw = lambda: init(init_key, dyn)
    shapes = jax.eval_shape(draw)
    return jax.lax.cond(live, draw,
                        lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def make_runner(init: Callable, one_sample: OneSample) -> Runner:
    """A jitted ``run(acc, key, n, x1, x2, same, dyn) -> (acc + sum of n samples, key)``.

    ``x2`` may be None (then ``f(x1)`` serves both sides). ``same`` says whether the
    x2 side uses the same dropout key as x1.
    """
    per_step = SAMPLES_PER_STEP

    def from_split(split, x1, x2, same, dyn, live):
        init_key, dropout_key = jax.random.split(split)
        params = materialized_params(init, init_key, dyn, live)
        k2 = dropout_key if x2 is None else second_key(dropout_key, same)
        return one_sample(params, dropout_key, k2, x1, x2, dyn)

    def one(key, x1, x2, same, dyn, live):
        key, split = jax.random.split(key)
        return key, from_split(split, x1, x2, same, dyn, live)

    def add(acc, k):
        return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, k)

    def run(acc, key, n, x1, x2, same, dyn):
        def single(i, carry):
            acc, key = carry
            key, k = one(key, x1, x2, same, dyn, i < n)
            return add(acc, k), key

        if per_step > 1:
            def step(i, carry):
                acc, key = carry

                def split(k, _):
                    k, s = jax.random.split(k)
                    return k, s

                key_out, splits = jax.lax.scan(split, key, length=per_step)

                ks = jax.vmap(lambda s: from_split(s, x1, x2, same, dyn, i < n))(splits)
                return add(acc, jax.tree.map(lambda v: v.sum(0), ks)), key_out

            acc, key = jax.lax.fori_loop(0, n // per_step, step, (acc, key))
            n = n % per_step
        return jax.lax.fori_loop(0, n, single, (acc, key))

    def kernel_shapes(key, x1, x2, same, dyn):
        return jax.eval_shape(lambda *a: one(*a, True)[1], key, x1, x2, same, dyn)

    return Runner(jax.jit(run), kernel_shapes)


def accumulator_dtype(dtype: Any) -> Any:
    """Sums of many samples are kept in at least float32 (bfloat16 sums stall)."""
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


class Runner:
    """``run(acc, key, n, x1, x2, same, dyn) -> (acc, key)``, plus the one-sample kernel
    shapes (traced once per runner; a runner serves one signature of its arguments)."""

    def __init__(self, run: Callable, kernel_shapes: Callable):
        self.run = run
        self._kernel_shapes = kernel_shapes
        self._shapes: PyTree = None

    def shapes(self, key, x1, x2, same, dyn) -> PyTree:
        if self._shapes is None:
            self._shapes = self._kernel_shapes(key, x1, x2, same, dyn)
        return self._shapes

    def zeros(self, key, x1, x2, same, dyn) -> PyTree:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, accumulator_dtype(s.dtype)),
                            self.shapes(key, x1, x2, same, dyn))
