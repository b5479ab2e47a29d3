"""The inputs of one Monte Carlo kernel call, checked, split into the two sides of
the kernel, with the batch axis of every input leaf and keyword argument.

A *side* is what one call of ``apply_fn`` receives: an input pytree and the array
leaves of its keyword arguments (Python values are static and identical for every
block). Every leaf of a side has a batch axis, the axis that holds the examples:

* input leaves: ``vmap_axes``' ``in_axes`` when given, else axis 0;
* keyword arguments declared in ``vmap_axes``' ``kwargs_axes``: the declared axis
  (``None``: the same for every example);
* a 2-tuple ``(v1, v2)`` of arrays (v1 goes with x1, v2 with x2): axis 0, as in
  neural-tangents;
* any other array of rank >= 1: unknown. The grid refuses to split it (a block
  would otherwise see the whole array or the wrong rows).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcntk import _apply
from mcntk._types import PyTree

UNKNOWN = "unknown"
"""The batch axis of a keyword argument leaf that nothing declares."""


def check_inputs(x: Any, name: str) -> PyTree:
    """``x`` as a pytree of JAX arrays; Python scalars or None leaves are rejected."""
    if x is None:
        raise TypeError(f"`{name}` must be an array or a pytree of arrays, got None.")
    leaves = jax.tree.leaves(x)
    bad = [v for v in leaves if not hasattr(v, "shape") or not hasattr(v, "dtype")]
    if not leaves or bad:
        raise TypeError(f"`{name}` must be an array or a pytree of arrays, got "
                        f"{type(x).__name__} with leaves {bad[:3] if bad else leaves!r}; "
                        f"wrap a list of numbers in jnp.asarray.")
    return jax.tree.map(jnp.asarray, x)


class Side(NamedTuple):
    """One side of the kernel: an input and the array leaves of its keyword arguments.

    Attributes:
      x: the input pytree.
      dyn: the array leaves of the keyword arguments (``jax.tree.leaves`` order).
      rebuild: ``rebuild(dyn) -> kwargs`` puts (possibly sliced) array leaves back
        among the static values.
      x_axes: the batch axis of each leaf of ``x`` (a list; None: shared).
      dyn_axes: the batch axis of each leaf of ``dyn`` (None: shared; UNKNOWN).
      names: the keyword name of each leaf of ``dyn`` (for error messages).
      size: the number of examples (None when the leaves disagree).
    """

    x: PyTree
    dyn: list
    rebuild: Callable[[list], dict]
    x_axes: list
    dyn_axes: list
    names: list
    size: int | None

    def leaves_and_axes(self) -> tuple[list, list]:
        return jax.tree.leaves(self.x) + list(self.dyn), list(self.x_axes) + list(self.dyn_axes)


class Call(NamedTuple):
    """A prepared kernel call: two sides; ``side2`` is None when ``f(x2)`` is ``f(x1)``."""

    side1: Side
    side2: Side | None
    static: Any  # hashable (when possible) description of the static keyword values

    @property
    def symmetric(self) -> bool:
        return self.side2 is None


def _input_axes(x: PyTree, vmap_axes: _apply.VmapAxes | None, name: str) -> list:
    if vmap_axes is None:
        return [0 if jnp.ndim(a) else None for a in jax.tree.leaves(x)]
    return _apply._leaf_axes(vmap_axes.in_axes, x, f"in_axes (for `{name}`)")


def _size(leaves: list, axes: list) -> int | None:
    sizes = {jnp.shape(v)[a] for v, a in zip(leaves, axes) if isinstance(a, int)}
    return sizes.pop() if len(sizes) == 1 else None


def _side(x: PyTree, kwargs: dict, pairs: set, vmap_axes: _apply.VmapAxes | None,
          name: str) -> Side:
    dyn, rebuild, static = _apply.partition_static(kwargs)
    declared = {} if vmap_axes is None else vmap_axes.kwargs_axes
    names, axes = [], []
    for k in sorted(kwargs):
        value = kwargs[k]
        leaves = jax.tree.leaves(value)
        if k in declared:
            leaf_axes = _apply._leaf_axes(declared[k], value, f"kwargs_axes[{k!r}]")
        elif k in pairs:
            leaf_axes = [0 if jnp.ndim(v) else None for v in leaves]
        else:
            leaf_axes = [UNKNOWN if jnp.ndim(v) else None for v in leaves]
        for v, a in zip(leaves, leaf_axes):
            if _apply._is_dynamic(v):
                names.append(k)
                axes.append(a)
    x_axes = _input_axes(x, vmap_axes, name)
    size = _size(jax.tree.leaves(x), x_axes)
    for k, v, a in zip(names, dyn, axes):
        if k in declared and isinstance(a, int) and size is not None and v.shape[a] != size:
            raise ValueError(
                f"`vmap_axes` kwargs_axes gives keyword argument `{k}` (shape {v.shape}) batch "
                f"axis {a}, which has {v.shape[a]} entries, but `{name}` holds {size} examples.")
    return Side(x, dyn, rebuild, x_axes, axes, names, size)


def check_kwargs_axes_names(vmap_axes: _apply.VmapAxes | None, kwargs: dict) -> None:
    """Every keyword named in ``vmap_axes``' kwargs_axes must be passed."""
    if vmap_axes is None:
        return
    unknown = sorted(set(vmap_axes.kwargs_axes) - set(kwargs))
    if unknown:
        raise ValueError(f"`vmap_axes` kwargs_axes names keyword(s) {unknown} that were "
                         f"not passed to kernel_fn; passed: {sorted(kwargs)}.")


def check_examples(side: Side, name: str) -> None:
    """A side must hold at least one example."""
    if side.size == 0:
        shapes = [jnp.shape(v) for v in jax.tree.leaves(side.x)]
        raise ValueError(f"`{name}` has no examples: its leaves have 0 entries on their "
                         f"batch axis (leaf shapes {shapes}). A kernel needs at least one "
                         f"example on each side.")


def check_batchable(side: Side, name: str) -> None:
    """Every input leaf that is cut into blocks must hold the same number of examples."""
    shapes = [jnp.shape(v) for v in jax.tree.leaves(side.x)]
    sizes = {s[a] for s, a in zip(shapes, side.x_axes) if a is not None}
    missing = [s for s, a in zip(shapes, side.x_axes) if a is None]
    if len(sizes) != 1 or (missing and side.x_axes.count(None) == len(side.x_axes)):
        raise ValueError(
            f"`{name}` must have leaves with the same number of examples on their batch axis "
            f"(axis 0, or `vmap_axes` in_axes) to be cut into `batch_size` blocks; got leaf "
            f"shapes {shapes}.")


def describe_shapes(x: PyTree) -> Any:
    """The shapes of ``x`` for an error message (one shape for a single array)."""
    shapes = jax.tree.map(jnp.shape, x)
    return shapes


def output_shapes(apply_fn: Callable, params: PyTree, side1: Side, side2: Side | None) -> tuple:
    """``(f(x1), f(x2))`` computed abstractly; a failure on x2 alone is reported as a
    mismatch of x1 and x2 (naming both shapes), not as the model's raw error."""
    call = lambda s: (lambda p, x, d: apply_fn(p, x, **s.rebuild(d)))
    out1 = jax.eval_shape(call(side1), params, side1.x, side1.dyn)
    if side2 is None:
        return out1, out1
    try:
        out2 = jax.eval_shape(call(side2), params, side2.x, side2.dyn)
    except Exception as e:
        raise ValueError(
            f"apply_fn accepts `x1` (shape {describe_shapes(side1.x)}) but fails on `x2` "
            f"(shape {describe_shapes(side2.x)}): x1 and x2 must hold examples the model "
            f"accepts alike ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    t1, t2 = jax.tree.structure(out1), jax.tree.structure(out2)
    ranks1 = [len(o.shape) for o in jax.tree.leaves(out1)]
    ranks2 = [len(o.shape) for o in jax.tree.leaves(out2)]
    if t1 != t2 or ranks1 != ranks2:
        raise ValueError(
            f"f(x1) and f(x2) differ in structure or rank (x1 shape "
            f"{describe_shapes(side1.x)}, x2 shape {describe_shapes(side2.x)}; outputs "
            f"{jax.tree.map(lambda o: o.shape, out1)} and "
            f"{jax.tree.map(lambda o: o.shape, out2)}).")
    return out1, out2


def prepare(x1: Any, x2: Any, kwargs: dict[str, Any],
            vmap_axes: _apply.VmapAxes | None) -> Call:
    """Checks ``x1``, ``x2`` and keyword arguments and splits them into two sides.

    ``x2`` None (or equal to ``x1``, with no 2-tuple keyword) gives a symmetric call:
    ``f(x1)`` serves both sides.
    """
    x1 = check_inputs(x1, "x1")
    x2 = None if x2 is None else check_inputs(x2, "x2")
    if "rng" in kwargs:
        raise ValueError("`rng` is supplied per sample from `key` by the Monte Carlo "
                         "estimator; do not pass it to kernel_fn.")
    check_kwargs_axes_names(vmap_axes, kwargs)
    x2, kw1, kw2 = _apply.prepare(x1, x2, kwargs)
    pairs = {k for k, v in kwargs.items() if isinstance(v, tuple) and len(v) == 2}
    side1 = _side(x1, kw1, pairs, vmap_axes, "x1")
    side2 = None if x2 is None else _side(x2, kw2, pairs, vmap_axes, "x2")
    check_examples(side1, "x1")
    if side2 is not None:
        check_examples(side2, "x2")
    s1 = _apply.partition_static(kw1)[2]
    s2 = s1 if side2 is None else _apply.partition_static(kw2)[2]
    static = (s1, s2) if _hashable((s1, s2)) else None
    return Call(side1, side2, static)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def grown(side: Side, extra: int) -> Side | None:
    """Abstract ``side`` with ``extra`` more examples (None if a leaf's axis is unknown)."""
    leaves, axes = side.leaves_and_axes()
    if any(a == UNKNOWN for a in axes):
        return None

    def grow(v, a):
        shape = list(jnp.shape(v))
        if a is not None:
            shape[a] += extra
        return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(v))

    out = [grow(v, a) for v, a in zip(leaves, axes)]
    nx = len(side.x_axes)
    x = jax.tree.unflatten(jax.tree.structure(side.x), out[:nx])
    return side._replace(x=x, dyn=out[nx:])


def output_batch_axes(apply_fn: Callable, params: PyTree, side: Side,
                      out_axes: Any) -> list[int | None] | None:
    """The axis of each output leaf that holds the examples, or None if unknown.

    Declared ``out_axes`` (from ``vmap_axes``) are used as given. Otherwise the output
    shapes for ``n`` and ``n + 1`` examples are compared (abstractly): the one axis
    that grows is the batch axis. Never inferred from a coincidence of sizes.
    """
    call = lambda p, x, d: apply_fn(p, x, **side.rebuild(d))
    if out_axes is not None:
        out = jax.eval_shape(call, params, side.x, side.dyn)
        axes = _apply._leaf_axes(out_axes, out, "out_axes")
        for o, a in zip(jax.tree.leaves(out), axes):
            if a is None or (side.size is not None and o.shape[a] != side.size):
                raise ValueError(f"`vmap_axes` out_axes={out_axes!r} must give every output "
                                 f"leaf an axis holding the {side.size} examples; got output "
                                 f"shape {o.shape} with axis {a}.")
        return axes
    bigger = grown(side, 1)
    if bigger is None or side.size is None:
        return None
    try:
        small = jax.tree.leaves(jax.eval_shape(call, params, side.x, side.dyn))
        large = jax.tree.leaves(jax.eval_shape(call, params, bigger.x, bigger.dyn))
    except Exception:  # the model does not accept another batch size: unknown
        return None
    axes: list[int | None] = []
    for a, b in zip(small, large):
        if len(a.shape) != len(b.shape):
            return None
        grew = [i for i, (u, v) in enumerate(zip(a.shape, b.shape)) if u != v]
        if not grew:
            axes.append(None)  # the leaf does not depend on the examples
        elif len(grew) == 1 and b.shape[grew[0]] == a.shape[grew[0]] + 1:
            axes.append(grew[0])
        else:
            return None
    return axes


def warn_if_traced_examples(rules: list, batch_axes: list, trace_axes: Any,
                            stacklevel: int = 4) -> bool:
    """A ``UserWarning`` when a traced output axis is the one that holds the examples;
    returns whether it warned."""
    traced = [a for r, a in zip(rules, batch_axes) if a is not None and a in r.trace]
    if traced:
        warnings.warn(
            f"`trace_axes`={trace_axes} traces output axis {traced[0]}, which holds the "
            f"examples: the kernel is the mean of K(x1_i, x2_i) over matching examples i (a "
            f"trace) instead of having one entry per pair of examples. This is "
            f"neural-tangents' meaning; for a per-example kernel of a model with one output "
            f"per example, pass `trace_axes`=().", UserWarning, stacklevel=stacklevel)
    return bool(traced)


def numpy_equal(a: PyTree, b: PyTree) -> bool:
    """Whether two concrete pytrees are equal (structure, shapes and values)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.shape(u) == np.shape(v) and np.array_equal(u, v)
                            for u, v in zip(la, lb))
