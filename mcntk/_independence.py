"""Whether a model treats its examples independently, decided from its jaxpr.

With ``vmap_axes=None`` mcntk asks whether ``f(params, x)`` computes the output of
example ``i`` from example ``i`` alone, exactly as a call with that one example
would. If it does, the NTK is computed from per-example derivatives, as if the user
had passed ``vmap_axes`` (docs/axes.md); if it cannot prove it, nothing changes.

The program analysed is the model's forward-mode derivative in its float parameters
(``jax.jvp``): it holds the model and the derivative the NTK is made of, with custom_jvp
rules inlined, so a rule that mixes the examples is seen. It is traced twice with
``jax.make_jaxpr``: with the call's ``n`` examples (program A) and with one example
(program B, what a per-example call evaluates). The two programs are walked in lockstep;
they must be the same program (the same primitives, reading the twin values, with the
same parameters, literals and constants), and every value of A gets a *state*:

* ``None``: it does not depend on the examples and is the same in A and B;
* an axis ``k``: it holds the examples on axis ``k`` (``n`` entries in A, one in B),
  and its slice ``i`` in A equals its value in B given example ``i`` alone.

Inputs start with their batch axes (axis 0 of every input leaf and of every 2-tuple
keyword array; parameters, tangents, 0-d arrays and ``rng`` are shared), and each
primitive has a rule that proves its results' states from its operands' (elementwise
operations, broadcasts, reshapes that keep the batch axis whole, transposes,
``dot_general`` and convolutions with the examples free or as their batch dimension,
reductions, slices, pads, concatenations, sorts and scans along other axes, gathers per
example, ``jit``/``remat`` calls, ``cond``/``scan``/``while`` by recursion). A primitive
without a rule, one that mixes the examples (a mean or an attention over them), a
constant that differs between A and B (``x / x.shape[0]``), a program that changes with
the number of examples, a ``custom_vjp`` on the parameters' path (its backward rule
cannot be read), or any random draw in the program (dropout masks are drawn
per call, so per-example calls would draw others) makes the answer "not independent".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore

from mcntk import _apply, _inputs
from mcntk._types import PyTree

_P = jcore.primitives
# calls whose sub-jaxpr is analysed in place of the call
_CALLS = {p: key for p, key in ((getattr(_P, "jit_p", None), "jaxpr"),
                                (getattr(_P, "closed_call_p", None), "call_jaxpr"),
                                (getattr(_P, "call_p", None), "call_jaxpr"),
                                (getattr(_P, "remat_p", None), "jaxpr"),
                                (getattr(_P, "custom_jvp_call_p", None), "call_jaxpr"),
                                (getattr(_P, "custom_vjp_call_p", None), "call_jaxpr"))
          if p is not None}
# primitives on keys only (no bits drawn): splitting a shared key is harmless
_KEY_OPS = {"random_seed", "random_wrap", "random_unwrap", "random_split", "random_fold_in",
            "random_clone"}
_DRAWS = {"random_bits", "random_gamma", "threefry2x32", "rng_bit_generator", "rng_uniform"}


class Decision(NamedTuple):
    """What the analysis decided for one call signature.

    Attributes:
      vmap_axes: the per-example axes used for the NTK (a canonical ``vmap_axes``),
        or None when the examples were not proven independent.
      reason: why, in words.
    """

    vmap_axes: _apply.VmapAxes | None
    reason: str

    @property
    def independent(self) -> bool:
        return self.vmap_axes is not None

    def __str__(self) -> str:
        if self.vmap_axes is None:
            return f"not vectorised: {self.reason}"
        a = self.vmap_axes
        return (f"examples independent, NTK per example with vmap_axes=(in_axes={a.in_axes!r}, "
                f"out_axes={a.out_axes!r}, kwargs_axes={a.kwargs_axes!r})")


class _Dependent(Exception):
    """The analysis could not prove independence (the message says why)."""


def decide(apply_fn, params: PyTree, sides: Sequence[_inputs.Side], rng: Any = None) -> Decision:
    """The :class:`Decision` for ``apply_fn(params, side.x, **side kwargs)`` on every side
    (``rng``, if given, is passed as the shared keyword ``rng``)."""
    try:
        found = [_side_axes(apply_fn, params, s, rng) for s in sides]
    except _Dependent as e:
        return Decision(None, str(e))
    except Exception as e:  # noqa: BLE001 -- a program the analysis does not know: not proven
        return Decision(None, f"the analysis of the model's program failed "
                              f"({type(e).__name__}: {e}); its examples are not proven apart")
    x_axes, kw_axes, out_axes, out_tree = found[0]
    x_trees = {jax.tree.structure(s.x) for s in sides}
    # one vmap_axes serves both sides: every input leaf, keyword and output must hold
    # its examples on the same axis (or none) in x1 and in x2
    if len(x_trees) > 1 or any((list(x), k, o, t) != (list(x_axes), kw_axes, out_axes, out_tree)
                               for x, k, o, t in found[1:]):
        return Decision(None, "x1 and x2 put their examples on different axes")
    in_axes = 0 if all(a == 0 for a in x_axes) else jax.tree.unflatten(
        jax.tree.structure(sides[0].x), x_axes)
    out = (out_axes[0] if len(set(out_axes)) == 1
           else jax.tree.unflatten(out_tree, out_axes))
    return Decision(_apply.VmapAxes(in_axes, out, kw_axes),
                    "every output entry depends on its own example only")


def _side_axes(apply_fn, params, side: _inputs.Side, rng):
    """``(x axes, kwargs axes, output axes, output treedef)`` of one side, or raises."""
    kw_axes: dict[str, Any] = {}
    for name, a in zip(side.names, side.dyn_axes):
        if name == "rng":
            a = None
        elif a == _inputs.UNKNOWN:
            raise _Dependent(f"keyword argument `{name}` is an array with no known batch axis "
                             f"(pass it as a 2-tuple, or declare `vmap_axes`)")
        if kw_axes.setdefault(name, a) != a:
            raise _Dependent(f"keyword argument `{name}` has leaves with and without examples")
    x_leaves = jax.tree.leaves(side.x)
    x_axes = list(side.x_axes)
    axes = x_axes + [kw_axes[k] for k in side.names]
    leaves = x_leaves + list(side.dyn)
    sizes = {np.shape(v)[a] for v, a in zip(leaves, axes) if a is not None}
    if len(sizes) != 1:
        raise _Dependent("the inputs do not hold one number of examples on axis 0")
    n = max(sizes.pop(), 2)  # one example: analyse two (the program is the same)
    x_def = jax.tree.structure(side.x)

    def fn(p, t, ls, key):
        # the program analysed is the JVP in the float parameters: it holds the model and
        # its derivative as JAX computes it (custom_jvp rules inlined), which is what the
        # NTK is made of; a custom_vjp on the parameters' path cannot be traced this way
        kwargs = side.rebuild(list(ls[len(x_leaves):]))
        if key is not None:
            kwargs = {**kwargs, "rng": key}
        x = jax.tree.unflatten(x_def, ls[:len(x_leaves)])
        trainable, merge = _apply.split_trainable(p)
        out, tangent = jax.jvp(lambda q: apply_fn(merge(q), x, **kwargs), (trainable,), (t,))
        tangents = [v for v in jax.tree.leaves(tangent) if v.dtype != jax.dtypes.float0]
        return out, tangents

    def spec(v, a, size):
        shape = list(np.shape(v))
        if a is not None:
            shape[a] = size
        return jax.ShapeDtypeStruct(tuple(shape), jax.numpy.result_type(v))

    abstract = lambda t: jax.tree.map(lambda v: spec(v, None, 0), t)
    p, key = abstract(params), None if rng is None else abstract(rng)
    t = [v for v in jax.tree.leaves(p) if jax.numpy.issubdtype(v.dtype, jax.numpy.floating)]
    traced = []
    for size in (n, 1):
        try:
            traced.append(jax.make_jaxpr(fn, return_shape=True)(
                p, t, [spec(v, a, size) for v, a in zip(leaves, axes)], key))
        except Exception as e:  # noqa: BLE001 -- e.g. a custom_vjp, or a model refusing one
            raise _Dependent(f"the model and its forward-mode derivative cannot be traced "
                             f"with {size} example(s) ({type(e).__name__})") from None
    (ja, (shape, _)), (jb, _) = traced
    states = ([None] * (len(jax.tree.leaves(p)) + len(t)) + axes
              + [None] * len(jax.tree.leaves(key)))
    found = _Walk(n).closed(ja, jb, states)
    n_out = len(jax.tree.leaves(shape))
    out, tangents = found[:n_out], found[n_out:]
    if any(s is None for s in out):
        raise _Dependent("an output does not hold the examples")
    floats = [s for s, o in zip(out, jax.tree.leaves(shape))
              if jax.numpy.issubdtype(o.dtype, jax.numpy.inexact)]
    if tangents != floats:
        raise _Dependent("the derivative of an output holds the examples elsewhere")
    return x_axes, kw_axes, out, jax.tree.structure(shape)


def _equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        if hasattr(a, "shape") and hasattr(b, "shape"):
            if np.shape(a) != np.shape(b) or a.dtype != b.dtype:
                return False
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- values that cannot be compared differ
        return False


class _Walk:
    """Lockstep walk of programs A (``n`` examples) and B (one example)."""

    def __init__(self, n: int):
        self.n = n

    def closed(self, ca, cb, states):
        return self.jaxpr(ca.jaxpr, cb.jaxpr, ca.consts, cb.consts, states)

    def sub(self, a, b, states):
        if isinstance(a, jcore.ClosedJaxpr):
            return self.closed(a, b, states)
        return self.jaxpr(a, b, (), (), states)

    def check(self, va, vb, state, what: str = "a value") -> None:
        sa, sb = getattr(va, "shape", None), getattr(vb, "shape", None)
        if sa is None or sb is None:
            ok = state is None and str(va) == str(vb)
        elif len(sa) != len(sb) or va.dtype != vb.dtype:
            ok = False
        elif state is None:
            ok = tuple(sa) == tuple(sb)
        else:
            ok = sa[state] == self.n and sb[state] == 1 and all(
                u == v for i, (u, v) in enumerate(zip(sa, sb)) if i != state)
        if not ok:
            raise _Dependent(f"{what} changes with the number of examples in a way mcntk "
                             f"cannot follow")

    def jaxpr(self, ja, jb, consts_a, consts_b, states):
        if (len(ja.eqns), len(ja.invars), len(ja.constvars)) != (
                len(jb.eqns), len(jb.invars), len(jb.constvars)):
            raise _Dependent("the model's program changes with the number of examples")
        # A's variable -> (its state, B's variable it stands for): an operation of A
        # must read the values that its twin in B reads, not just values of the same kind
        env: dict[Any, Any] = {}
        for va, vb, ca, cb in zip(ja.constvars, jb.constvars, consts_a, consts_b):
            if not _equal(ca, cb):
                raise _Dependent("a constant of the model changes with the number of examples")
            env[va] = (None, vb)
        for va, vb, s in zip(ja.invars, jb.invars, states):
            self.check(va.aval, vb.aval, s, "an input")
            env[va] = (s, vb)
        for ea, eb, live in zip(ja.eqns, jb.eqns, _live(ja)):
            if not live:  # results nobody reads (e.g. per-example keys a model ignores)
                self.same_kind(ea, eb)
                continue
            ins = [self.read(env, a, b) for a, b in zip(ea.invars, eb.invars)]
            outs = self.eqn(ea, eb, ins)
            for va, vb, s in zip(ea.outvars, eb.outvars, outs):
                self.check(va.aval, vb.aval, s, f"the result of `{ea.primitive.name}`")
                env[va] = (s, vb)
        return [self.read(env, a, b) for a, b in zip(ja.outvars, jb.outvars)]

    @staticmethod
    def read(env, a, b):
        if isinstance(a, jcore.Literal) or isinstance(b, jcore.Literal):
            if not (isinstance(a, jcore.Literal) and isinstance(b, jcore.Literal)
                    and _equal(np.asarray(a.val), np.asarray(b.val))):
                raise _Dependent("a constant of the model changes with the number of examples")
            return None
        state, twin = env.get(a, (None, None))
        if twin is not b:
            raise _Dependent("the model's program changes with the number of examples (an "
                             "operation reads other values)")
        return state

    @staticmethod
    def same_kind(ea, eb) -> str:
        name = ea.primitive.name
        if (name != eb.primitive.name or len(ea.outvars) != len(eb.outvars)
                or len(ea.invars) != len(eb.invars)):
            raise _Dependent("the model's program changes with the number of examples")
        if name == "custom_lin":
            raise _Dependent("a `custom_vjp` function is on the parameters' path: mcntk cannot "
                             "check how its backward rule treats the examples")
        if name in _DRAWS or (name.startswith("random_") and name not in _KEY_OPS):
            raise _Dependent(f"it draws random numbers (`{name}`), e.g. dropout: per-example "
                             f"calls would draw other ones")
        return name

    def eqn(self, ea, eb, ins):
        name = self.same_kind(ea, eb)
        key = _CALLS.get(ea.primitive)
        if key is not None:
            return self.sub(ea.params[key], eb.params[key], ins)
        if all(s is None for s in ins):
            if all(self.same_param(ea.params[k], eb.params.get(k)) for k in ea.params):
                return [None] * len(ea.outvars)
            return _from_constant(self, ea, eb)
        rule = _RULES.get(name)
        if rule is None:
            raise _Dependent(f"`{name}` is applied to values that hold the examples, and mcntk "
                             f"cannot tell whether it keeps them apart")
        for k, v in ea.params.items():
            if k not in _SHAPE_KEYS.get(name, ()) and not self.same_param(v, eb.params.get(k)):
                raise _Dependent(f"`{name}` changes with the number of examples")
        return rule(self, ea, eb, ins)

    def same_param(self, a, b) -> bool:
        if isinstance(a, (jcore.ClosedJaxpr, jcore.Jaxpr)):
            try:
                return all(s is None for s in self.sub(a, b, [None] * len(_invars(a))))
            except _Dependent:
                return False
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            return all(self.same_param(u, v) for u, v in zip(a, b))
        return _equal(a, b)


def _live(jaxpr) -> list[bool]:
    """Per equation, whether a result reaches the outputs (or it has effects)."""
    live = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    flags = []
    for eqn in reversed(jaxpr.eqns):
        used = bool(eqn.effects) or any(v in live for v in eqn.outvars
                                        if not isinstance(v, jcore.DropVar))
        if used:
            live.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
        flags.append(used)
    return flags[::-1]


def _invars(j):
    return (j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j).invars


def _from_constant(w: _Walk, ea, eb):
    """A broadcast of a shared value, or an iota, to a shape with the examples' axis:
    the same along that axis, so each example's slice is what one example gets."""
    if len(ea.outvars) != 1 or len(eb.outvars) != 1:  # e.g. a callback: effects, no value
        raise _Dependent(f"`{ea.primitive.name}` changes with the number of examples")
    sa, sb = ea.outvars[0].aval.shape, eb.outvars[0].aval.shape
    diff = [i for i, (u, v) in enumerate(zip(sa, sb)) if u != v]
    name = ea.primitive.name
    if (name in ("broadcast_in_dim", "iota") and len(diff) == 1 and len(ea.invars) <= 1
            and sa[diff[0]] == w.n and sb[diff[0]] == 1
            and ea.params.get("dimension") != diff[0]
            and all(w.same_param(v, eb.params[k]) for k, v in ea.params.items()
                    if k != "shape")):
        return [diff[0]]
    raise _Dependent(f"`{name}` changes with the number of examples")


def _one_axis(ins) -> int:
    axes = {s for s in ins if s is not None}
    if len(axes) != 1:
        raise _Dependent("an operation combines values that hold the examples on different axes")
    return axes.pop()


def _not_along(name, k, axes):
    if k in axes:
        raise _Dependent(f"`{name}` works along the examples' axis (it mixes the examples)")


def _elementwise(w, e, eb, ins):
    return [_one_axis(ins)] * len(e.outvars)


def _identity(w, e, eb, ins):
    return list(ins)


def _reduce(w, e, eb, ins):
    k, axes = ins[0], tuple(e.params["axes"])
    _not_along(e.primitive.name, k, axes)
    return [k - sum(a < k for a in axes)]


def _squeeze(w, e, eb, ins):
    k, axes = ins[0], tuple(e.params["dimensions"])
    _not_along("squeeze", k, axes)
    return [k - sum(a < k for a in axes)]


def _along(param):
    def rule(w, e, eb, ins):
        k = _one_axis(ins)
        _not_along(e.primitive.name, k, (e.params[param],))
        return [k] * len(e.outvars)
    return rule


def _stack(w, e, eb, ins):
    k, axis = _one_axis(ins), e.params["axis"]
    if any(s is None for s in ins):
        raise _Dependent("`stack` of values with and without the examples")
    return [k if k < axis else k + 1]


def _transpose(w, e, eb, ins):
    return [tuple(e.params["permutation"]).index(ins[0])]


def _broadcast_in_dim(w, e, eb, ins):
    if len(ins) != 1:
        raise _Dependent("a broadcast to a dynamic shape")
    return [e.params["broadcast_dimensions"][ins[0]]]


def _reshape(w, e, eb, ins):
    k = ins[0]
    before, after = e.invars[0].aval.shape, e.outvars[0].aval.shape
    if e.params.get("dimensions") is not None:
        raise _Dependent("a reshape with a transposition")
    lead = math.prod(before[:k])
    for j in range(len(after)):
        if math.prod(after[:j]) == lead and after[j] == w.n:
            return [j]
    raise _Dependent("a reshape merges the examples' axis with another axis")


def _rev(w, e, eb, ins):
    _not_along("rev", ins[0], tuple(e.params["dimensions"]))
    return [ins[0]]


def _pad(w, e, eb, ins):
    k = ins[0]
    if ins[1] is not None or tuple(e.params["padding_config"][k]) != (0, 0, 0):
        raise _Dependent("`pad` pads the examples' axis")
    return [k]


def _slice(w, e, eb, ins):
    k, strides = ins[0], e.params["strides"]
    if e.params["start_indices"][k] != 0 or (strides is not None and strides[k] != 1):
        raise _Dependent("`slice` selects some of the examples")
    return [k]


def _dynamic_slice(w, e, eb, ins):
    if any(s is not None for s in ins[1:]):
        raise _Dependent("`dynamic_slice` at positions that depend on the examples")
    return [ins[0]]


def _dynamic_update_slice(w, e, eb, ins):
    if ins[0] is None or ins[0] != ins[1] or any(s is not None for s in ins[2:]):
        raise _Dependent("`dynamic_update_slice` writes across the examples")
    return [ins[0]]


def _concatenate(w, e, eb, ins):
    k = _one_axis(ins)
    if e.params["dimension"] == k or any(s is None for s in ins):
        raise _Dependent("`concatenate` along the examples' axis")
    return [k]


def _dot_general(w, e, eb, ins):
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    kl, kr = ins
    nl, nr = len(e.invars[0].aval.shape), len(e.invars[1].aval.shape)
    lfree = [d for d in range(nl) if d not in lc and d not in lb]
    rfree = [d for d in range(nr) if d not in rc and d not in rb]
    if kl is not None and kr is not None:
        if kl in lb and tuple(rb)[tuple(lb).index(kl)] == kr:
            return [tuple(lb).index(kl)]
    elif kl is not None and kl in lfree:
        return [len(lb) + lfree.index(kl)]
    elif kr is not None and kr in rfree:
        return [len(lb) + len(lfree) + rfree.index(kr)]
    raise _Dependent("`dot_general` contracts or pairs the examples with each other")


def _conv(w, e, eb, ins):
    dn = e.params["dimension_numbers"]
    if (ins[1] is not None or ins[0] != dn.lhs_spec[0]
            or e.params["batch_group_count"] != 1):
        raise _Dependent("a convolution across the examples")
    return [dn.out_spec[0]]


def _reduce_window(w, e, eb, ins):
    k, p = _one_axis(ins), e.params
    if (p["window_dimensions"][k] != 1 or p["window_strides"][k] != 1
            or tuple(p["padding"][k]) != (0, 0) or p["base_dilation"][k] != 1
            or p["window_dilation"][k] != 1):
        raise _Dependent("a pooling window spans several examples")
    return [k]


def _top_k(w, e, eb, ins):
    k = ins[0]
    _not_along("top_k", k, (e.params.get("axis", len(e.invars[0].aval.shape) - 1),))
    return [k, k]


def _gather(w, e, eb, ins):
    ko, ki = ins
    dn, p = e.params["dimension_numbers"], e.params
    out_rank = len(e.outvars[0].aval.shape)
    offset = [int(d) for d in dn.offset_dims]
    batch_positions = [d for d in range(out_rank) if d not in offset]
    index_rank = len(e.invars[1].aval.shape)
    if ki is not None and ki == index_rank - 1:
        raise _Dependent("`gather` indices hold the examples on their index axis")
    sizes, sizes_b = tuple(p["slice_sizes"]), tuple(eb.params["slice_sizes"])
    batching = [int(d) for d in dn.operand_batching_dims]
    if ki is None and ko not in dn.collapsed_slice_dims and ko not in dn.start_index_map \
            and ko not in batching and sizes[ko] == w.n and sizes_b[ko] == 1 \
            and sizes[:ko] + sizes[ko + 1:] == sizes_b[:ko] + sizes_b[ko + 1:]:
        # the same positions taken from every example's slice
        kept = [d for d in range(len(e.invars[0].aval.shape))
                if d not in dn.collapsed_slice_dims and d not in batching]
        return [offset[kept.index(ko)]]
    if sizes != sizes_b:
        raise _Dependent("`gather` takes slices across the examples")
    if ko is None:  # a shared table looked up per example (an embedding)
        return [batch_positions[ki]]
    if ko in batching and int(dn.start_indices_batching_dims[batching.index(ko)]) == ki:
        return [batch_positions[ki]]
    raise _Dependent("`gather` takes values across the examples")


def _cond(w, e, eb, ins):
    if ins[0] is not None:
        raise _Dependent("`cond` chooses a branch from the examples")
    outs = [w.sub(a, b, ins[1:]) for a, b in zip(e.params["branches"], eb.params["branches"])]
    if any(o != outs[0] for o in outs):
        raise _Dependent("the branches of a `cond` lay out the examples differently")
    return outs[0]


def _scan(w, e, eb, ins):
    p = e.params
    nc, ncar = p["num_consts"], p["num_carry"]
    xs = ins[nc + ncar:]
    if 0 in xs:
        raise _Dependent("`scan` runs over the examples")
    body_in = ins[:nc + ncar] + [None if s is None else s - 1 for s in xs]
    outs = w.sub(p["jaxpr"], eb.params["jaxpr"], body_in)
    if outs[:ncar] != ins[nc:nc + ncar]:
        raise _Dependent("a `scan` carry changes where it holds the examples")
    return outs[:ncar] + [None if s is None else s + 1 for s in outs[ncar:]]


def _while(w, e, eb, ins):
    p = e.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cn + bn:]
    if w.sub(p["cond_jaxpr"], eb.params["cond_jaxpr"], ins[:cn] + carry) != [None]:
        raise _Dependent("a `while` loop stops depending on the examples")
    if w.sub(p["body_jaxpr"], eb.params["body_jaxpr"], ins[cn:cn + bn] + carry) != carry:
        raise _Dependent("a `while` carry changes where it holds the examples")
    return carry


_ELEMENTWISE = (
    "abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e "
    "bitcast_convert_type cbrt ceil clamp clz complex conj convert_element_type copy copy_p "
    "cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma igammac imag "
    "integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not "
    "or polygamma population_count pow real reduce_precision rem round rsqrt select_n "
    "shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square "
    "stop_gradient sub tan tanh xor zeta").split()
_RULES = {
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _reduce for name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                                  "reduce_and", "reduce_or", "reduce_xor", "argmax",
                                  "argmin")},
    **{name: _along("axis") for name in ("cumsum", "cumprod", "cummax", "cummin",
                                         "cumlogsumexp", "split")},
    **{name: _reduce_window for name in ("reduce_window_sum", "reduce_window_max",
                                         "reduce_window_min", "select_and_gather_add")},
    "optimization_barrier": _identity, "device_put": _identity,
    "sharding_constraint": _identity, "stack": _stack, "squeeze": _squeeze, "transpose": _transpose,
    "broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape, "rev": _rev, "pad": _pad,
    "slice": _slice, "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice, "concatenate": _concatenate,
    "sort": _along("dimension"), "top_k": _top_k, "dot_general": _dot_general,
    "conv_general_dilated": _conv, "gather": _gather,
    "cond": _cond, "scan": _scan, "while": _while,
}
# parameters that hold the shapes of results, checked through the results' states
_SHAPE_KEYS = {"broadcast_in_dim": ("shape",), "reshape": ("new_sizes",),
               "slice": ("limit_indices",), "dynamic_slice": ("slice_sizes",),
               "gather": ("slice_sizes",),
               "cond": ("branches",), "scan": ("jaxpr",),
               "while": ("cond_jaxpr", "body_jaxpr")}
