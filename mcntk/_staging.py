"""One block's kernels in two stages: the work that depends on x1's block only, done
once per block row, and the rest, done per block.

A block ``(i, j)`` of the grid evaluates ``fn(early, late)`` where ``early`` holds
the parameters, f(x1)'s key and x1's block ``i``, and ``late`` f(x2)'s key and x2's
block ``j``. Across a block row, ``early`` is the same, so everything the function
computes from ``early`` alone (x1's Jacobian, x1's structured factors, x1's forward
pass) is the same too. :func:`split` finds that part on the function's jaxpr: an
equation is *late* if it reads a value computed from ``late``, else *early*; the
early values that late equations read are the *residuals*, computed by
:attr:`Stages.early` and handed to :attr:`Stages.late`. No NTK implementation knows
about it: it is a property of the program.

Cheap early equations that only feed late ones (broadcasts, reshapes, transposes,
conversions, iotas) move to the late stage, so that a residual is never a large
array that a layout change would have made for free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
from jax.extend import core as jcore

from mcntk._types import PyTree
from mcntk.ntk import _program

# recomputed in the late stage rather than kept as residuals
_CHEAP = {"broadcast_in_dim", "reshape", "transpose", "convert_element_type", "squeeze",
          "expand_dims", "iota", "copy", "copy_p"}


class Stages(NamedTuple):
    """``fn(early, late) == late(early, late_args, early(early_args))``.

    Attributes:
      early: ``early(early_args) -> residuals`` (a list of arrays).
      late: ``late(early_args, late_args, residuals) -> fn's result``.
      residuals: the residuals' shapes and dtypes.
    """

    early: Callable[[PyTree], list]
    late: Callable[[PyTree, PyTree, list], PyTree]
    residuals: list


def split(fn: Callable[[PyTree, PyTree], PyTree], early_args: PyTree,
          late_args: PyTree) -> Stages | None:
    """The two stages of ``fn`` (arguments may be abstract), or None when the early
    stage would do nothing worth keeping (no early equation other than cheap
    layout changes) or the program has side effects."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(early_args, late_args)
    jaxpr = closed.jaxpr
    if jaxpr.effects:
        return None
    n_early = len(jax.tree.leaves(early_args))
    is_late = _program.reached(jaxpr, jaxpr.invars[n_early:])[1]
    reads = lambda v, found: not isinstance(v, jcore.Literal) and v in found
    # cheap early equations read only by late ones (or by nobody early) go late
    early_readers: set = set()
    for k in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[k]
        if (not is_late[k] and eqn.primitive.name in _CHEAP
                and not any(reads(v, early_readers) for v in eqn.outvars)):
            is_late[k] = True
        if not is_late[k]:
            early_readers.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    early_eqns = [e for e, late in zip(jaxpr.eqns, is_late) if not late]
    late_eqns = [e for e, late in zip(jaxpr.eqns, is_late) if late]
    if all(e.primitive.name in _CHEAP for e in early_eqns):
        return None
    produced = {v for e in early_eqns for v in e.outvars}
    residuals, seen = [], set()
    for v in [v for e in late_eqns for v in e.invars] + list(jaxpr.outvars):
        if reads(v, produced) and v not in seen:
            seen.add(v)
            residuals.append(v)
    if not residuals:
        return None
    info = lambda name: jcore.DebugInfo("mcntk staging", name, None, None)
    first = jcore.ClosedJaxpr(jcore.Jaxpr(
        jaxpr.constvars, jaxpr.invars[:n_early], residuals, early_eqns, jcore.no_effects,
        info("early")), closed.consts)
    second = jcore.ClosedJaxpr(jcore.Jaxpr(
        jaxpr.constvars, list(jaxpr.invars) + residuals, jaxpr.outvars, late_eqns,
        jcore.no_effects, info("late")), closed.consts)
    treedef = jax.tree.structure(out_shape)

    def early(early_args):
        return list(jcore.jaxpr_as_fun(first)(*jax.tree.leaves(early_args)))

    def late(early_args, late_args, res):
        flat = jax.tree.leaves(early_args) + jax.tree.leaves(late_args) + list(res)
        return jax.tree.unflatten(treedef, jcore.jaxpr_as_fun(second)(*flat))

    shapes = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in residuals]
    return Stages(early, late, shapes)
