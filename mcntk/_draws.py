"""Parameter draws on CPU: the same bits as JAX's, in one pass over memory.

Every sample draws a fresh set of parameters, ``init_fn(init_key, ...)``. For a
model of millions of parameters this draw is a large part of a sample's time on CPU
(W3 of benchmarks/run.py: a third to a half), and most of it is the threefry hash:
JAX compiles the hash there as a loop of five steps (short to compile), each a pass
over arrays of the size of the draw. :func:`unrolled` returns an ``init`` that
computes exactly the same values with the hash written out in full, which XLA fuses
into one pass: W3's 8.5M parameters in 0.019-0.020 s, where JAX's own compilation took
0.025-0.070 s in several runs (``python benchmarks/draws.py``, benchmarks/RESULTS.md).

How: ``init`` is traced (``jax.make_jaxpr``) and evaluated equation by equation;
``jit`` calls that draw (such as ``jax.random.normal``) stay ``jit`` calls, evaluated in
turn. Each ``random_bits`` of a threefry key is replaced by JAX's own bit generation for
that key (``jax.extend.random.threefry_prng_impl.random_bits``, so the counters, splits
and the ``jax_threefry_partitionable`` choice are JAX's), traced in turn, with its
``threefry2x32`` hash evaluated by :func:`threefry2x32` below. Other key types, and
draws inside control flow or custom-derivative functions, run as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives
from jax.extend.random import threefry_prng_impl

from mcntk.ntk import _program

# Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror, Shaw, "Parallel random numbers:
# as easy as 1, 2, 3", SC 2011): the rotation constants of rounds 0-3 and 4-7, and
# the key-schedule parity constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def threefry2x32(k0: Any, k1: Any, x0: Any, x1: Any) -> list:
    """The Threefry-2x32-20 hash of the counter words ``(x0, x1)`` under the key
    ``(k0, k1)`` (``uint32`` arrays that broadcast), as JAX's ``threefry2x32``
    primitive computes it, written out round by round."""
    schedule = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + schedule[0], x1 + schedule[1]
    for group in range(5):  # 5 groups of 4 rounds, a key injection after each
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = jax.lax.shift_left(x1, np.uint32(r)) | jax.lax.shift_right_logical(
                x1, np.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + schedule[(group + 1) % 3]
        x1 = x1 + schedule[(group + 2) % 3] + np.uint32(group + 1)
    return [x0, x1]


def _random_bits(keys: Any, *, bit_width: int, shape: tuple) -> Any:
    """The ``random_bits`` primitive for ``keys`` with the unrolled hash (threefry
    keys), or as JAX evaluates it (other keys)."""
    if jax.random.key_impl(keys) != threefry_prng_impl.name:
        return primitives.random_bits_p.bind(keys, bit_width=bit_width, shape=shape)

    def bits(data):
        return threefry_prng_impl.random_bits(data, bit_width=bit_width, shape=shape)

    for _ in range(keys.ndim):
        bits = jax.vmap(bits)
    data = jax.random.key_data(keys)
    program = _program.trace(bits, data)
    return program.evaluate([data], rules={"threefry2x32": threefry2x32})[0]


def _draws_in(jaxpr: jcore.Jaxpr) -> bool:
    """Whether ``jaxpr`` or a ``jit`` call in it draws random bits."""
    return any(eqn.primitive is primitives.random_bits_p
               or (eqn.primitive is primitives.jit_p and _draws_in(eqn.params["jaxpr"].jaxpr))
               for eqn in jaxpr.eqns)


def _evaluate(closed: jcore.ClosedJaxpr, args: list) -> list:
    """``closed`` applied to ``args``, equation by equation, with ``random_bits``
    replaced by :func:`_random_bits`. A ``jit`` call that draws stays a ``jit`` call
    (the same ``inline``) of its evaluation: inlined, its arguments could become
    constants that XLA folds with other rounding (e.g. in ``erf`` or ``lgamma``)."""
    env: dict[Any, Any] = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, args))
    read = lambda atom: atom.val if isinstance(atom, jcore.Literal) else env[atom]
    for eqn in closed.jaxpr.eqns:
        values = [read(a) for a in eqn.invars]
        if eqn.primitive is primitives.random_bits_p:
            outs = [_random_bits(*values, **eqn.params)]
        elif eqn.primitive is primitives.jit_p and _draws_in(eqn.params["jaxpr"].jaxpr):
            inner = eqn.params["jaxpr"]
            call = jax.jit(lambda *a, inner=inner: _evaluate(inner, list(a)),
                           inline=eqn.params.get("inline", False))
            outs = call(*values)
        else:
            outs = _program.apply(eqn, values)
        for var, value in zip(eqn.outvars, outs):
            if not isinstance(var, jcore.DropVar):
                env[var] = value
    return [read(a) for a in closed.jaxpr.outvars]


def unrolled(init: Callable[..., Any]) -> Callable[..., Any]:
    """``init`` (a function of arrays, traced under ``jit``) computing the same values,
    with the threefry hash of its random draws unrolled. For CPU programs: elsewhere
    JAX already compiles the hash unrolled (or as a kernel)."""
    def fn(*args):
        # traced on the arguments themselves: their weak types are kept
        closed, out_shape = jax.make_jaxpr(init, return_shape=True)(*args)
        outs = _evaluate(closed, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
    return fn
