"""Calling ``apply_fn``: the rng rule, x1/x2 keyword splitting and per-example calls.

Keyword arguments given to a kernel function go to ``apply_fn`` as follows:

* ``rng``: the key for ``f(x1)``; ``f(x2)`` gets the same key when ``x2`` is
  ``None`` or equal to ``x1``, else ``jax.random.fold_in(rng, 1)``. Monte Carlo
  estimators supply ``rng`` themselves (one dropout key per sample) when
  ``apply_fn`` takes an ``rng`` argument or ``**kwargs``.
* a 2-tuple ``(v1, v2)``: ``v1`` goes with ``x1`` and ``v2`` with ``x2``;
* anything else goes to both calls.

``vmap_axes`` (``in_axes``, ``out_axes``, ``kwargs_axes``) declares that the model
maps examples independently along those axes, so Jacobians can be computed one
example at a time: an int means the same axis for inputs and outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcntk._types import PyTree


def accepts_rng(apply_fn: Callable[..., Any]) -> bool:
    """Whether ``apply_fn`` has a parameter named ``rng`` or takes ``**kwargs``."""
    fn = apply_fn
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return True
        if p.name == "rng" and p.kind is not inspect.Parameter.POSITIONAL_ONLY:
            return True
    return False


INPUT_SPECS_ATTRIBUTE = "accepts_input_specs"
"""An ``init`` function with this attribute set to True (adapters' inits have it) is
called as ``init(key, input_specs, **kwargs)``: ``input_specs`` holds a
``jax.ShapeDtypeStruct`` per input leaf (x1's shape and dtype) and ``kwargs`` are the
kernel call's keyword arguments for x1 (flags such as ``train=False``). Other inits
are called as ``init(key, input_shape)`` with shape tuples (stax's convention)."""


def call_init(init_fn: Callable, key: Any, x1: PyTree, kwargs1: dict[str, Any]) -> PyTree:
    """The params that ``init_fn`` draws from ``key`` for inputs like ``x1``."""
    if getattr(init_fn, INPUT_SPECS_ATTRIBUTE, False):
        specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                             x1)
        kwargs = {k: v for k, v in kwargs1.items() if k != "rng"}
        return init_fn(key, specs, **kwargs)[1]
    return init_fn(key, jax.tree.map(lambda a: tuple(jnp.shape(a)), x1))[1]


def same_inputs(x1: PyTree, x2: PyTree) -> Any:
    """``x2`` equals ``x1``: a Python bool when decidable statically, else a traced bool."""
    if x2 is None or x1 is x2:
        return True
    l1, t1 = jax.tree.flatten(x1)
    l2, t2 = jax.tree.flatten(x2)
    if t1 != t2 or any(jnp.shape(a) != jnp.shape(b) for a, b in zip(l1, l2)):
        return False
    eq = [jnp.all(jnp.asarray(a) == jnp.asarray(b)) for a, b in zip(l1, l2)]
    result = jnp.all(jnp.stack(eq)) if eq else jnp.array(True)
    return result if _is_tracer(result) else bool(result)


def _is_tracer(x: Any) -> bool:
    try:
        bool(x)
    except jax.errors.ConcretizationTypeError:
        return True
    return False


def second_key(key: Any, same: Any) -> Any:
    """The rng key for ``f(x2)``: ``key`` when inputs are the same, else ``fold_in(key, 1)``."""
    if same is True:
        return key
    if same is False:
        return jax.random.fold_in(key, 1)
    return jax.lax.cond(same, lambda: key, lambda: jax.random.fold_in(key, 1))


def prepare(x1: PyTree, x2: PyTree | None, kwargs: dict[str, Any]):
    """``(x2, kwargs1, kwargs2)`` for a kernel call, by the rules of this module.

    ``x2`` comes back as None when ``f(x2)`` is ``f(x1)`` (x2 is None or equals x1, and
    no keyword is split per side): ``f(x1)`` and its derivatives then serve both sides.
    With x2 None and a 2-tuple keyword, x2 is x1 with its own keyword value.
    """
    pairs = has_pair_kwargs(kwargs)
    if x2 is None and pairs:
        x2 = x1
    same = same_inputs(x1, x2)
    if same is True and not pairs:
        x2 = None
    kw1, kw2 = split_kwargs(kwargs, same)
    return x2, kw1, kw2


def has_pair_kwargs(kwargs: dict[str, Any]) -> bool:
    """Whether a keyword argument is a 2-tuple ``(for x1, for x2)``."""
    return any(isinstance(v, tuple) and len(v) == 2 for k, v in kwargs.items() if k != "rng")


def split_kwargs(kwargs: dict[str, Any], same: Any = True) -> tuple[dict, dict]:
    """Splits kernel-function keyword arguments into those of ``f(x1)`` and ``f(x2)``."""
    kw1: dict[str, Any] = {}
    kw2: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k == "rng" and v is not None:
            kw1[k], kw2[k] = v, second_key(v, same)
        elif isinstance(v, tuple) and len(v) == 2:
            kw1[k], kw2[k] = v
        else:
            kw1[k] = kw2[k] = v
    return kw1, kw2


class VmapAxes(NamedTuple):
    """Canonical ``vmap_axes``: batch axis of inputs, outputs and each keyword."""

    in_axes: Any
    out_axes: Any
    kwargs_axes: dict[str, Any]


def canonicalize_vmap_axes(vmap_axes: Any) -> VmapAxes | None:
    """Validates ``vmap_axes``: None, an int, ``(in_axes, out_axes, kwargs_axes)``, or
    another pytree of axes used for both inputs and outputs."""
    if vmap_axes is None:
        return None
    if isinstance(vmap_axes, bool):
        raise TypeError(f"`vmap_axes` must be None, an int or a 3-tuple, got {vmap_axes!r}.")
    if isinstance(vmap_axes, int):
        return VmapAxes(vmap_axes, vmap_axes, {})
    if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
        in_axes, out_axes, kwargs_axes = vmap_axes
        kwargs_axes = {} if kwargs_axes is None else kwargs_axes
        if not isinstance(kwargs_axes, dict):
            raise TypeError(
                "`vmap_axes`=(in_axes, out_axes, kwargs_axes) needs kwargs_axes to be a dict "
                f"from keyword name to axis, got {kwargs_axes!r}."
            )
        for name, axes in (("in_axes", in_axes), ("out_axes", out_axes)):
            if axes is None:
                raise ValueError(f"`vmap_axes` {name} must not be None, got {vmap_axes!r}.")
        return VmapAxes(in_axes, out_axes, dict(kwargs_axes))
    if isinstance(vmap_axes, (dict, list, tuple)):  # a pytree of axes for inputs and outputs
        return VmapAxes(vmap_axes, vmap_axes, {})
    raise TypeError(
        "`vmap_axes` must be None, an int, a pytree of axes, or a tuple (in_axes, out_axes, "
        f"kwargs_axes), got {vmap_axes!r}."
    )


def _broadcast(prefix: Any, tree: PyTree) -> list[Any]:
    """Leaves of the axes ``prefix`` (None leaves included) broadcast to the leaves of
    ``tree``, like ``jax.vmap``'s ``in_axes``."""
    if prefix is None or isinstance(prefix, int):
        return [prefix] * len(jax.tree.leaves(tree))
    is_axis = lambda a: a is None
    try:
        subtrees = jax.tree.structure(prefix, is_leaf=is_axis).flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"`vmap_axes` {prefix!r} is not a prefix of the structure of "
                         f"{jax.tree.structure(tree)}.") from e
    out: list[Any] = []
    for a, sub in zip(jax.tree.leaves(prefix, is_leaf=is_axis), subtrees):
        out.extend([a] * len(jax.tree.leaves(sub)))
    return out


def _leaf_axes(prefix: Any, tree: PyTree, what: str) -> list[Any]:
    """Each leaf's non-negative batch axis (or None), in ``jax.tree.leaves(tree)`` order."""
    out = []
    for leaf, a in zip(jax.tree.leaves(tree), _broadcast(prefix, tree)):
        if a is None:
            out.append(None)
            continue
        nd = jnp.ndim(leaf)
        if isinstance(a, bool) or not isinstance(a, int) or not -nd <= a < nd:
            raise ValueError(f"`vmap_axes` {what} axis {a!r} is out of range for an array of "
                             f"shape {jnp.shape(leaf)}.")
        out.append(a % nd)
    return out


def _canonical_leaf_axes(prefix: Any, tree: PyTree, what: str) -> PyTree:
    """A pytree like ``tree`` holding each leaf's non-negative axis (or None)."""
    return jax.tree.unflatten(jax.tree.structure(tree), _leaf_axes(prefix, tree, what))


class PerExample(NamedTuple):
    """``apply_fn`` seen one example at a time (from ``vmap_axes``)."""

    fn: Callable[[PyTree, PyTree, list], PyTree]  # (params, x_i, array_kwargs_i) -> output_i
    x_axes: PyTree
    kw_leaves: list[Any]  # the array leaves of the keyword arguments
    kw_axes: list[Any]  # their batch axes (None: shared by all examples)
    out_axes: PyTree  # non-negative batch axis of each output leaf (full output)

    def vmap(self, fn: Callable, x: PyTree, out_axes: Any) -> Any:
        """``vmap(fn)(x, kw_leaves)`` over the examples."""
        return jax.vmap(fn, in_axes=(self.x_axes, self.kw_axes), out_axes=out_axes)(
            x, self.kw_leaves)

    def map(self, fn: Callable, x: PyTree, out_axis: int, batch_size: int | None) -> Any:
        """Like :meth:`vmap` with one output axis, ``batch_size`` examples at a time
        (all at once when None)."""
        if batch_size is None:
            return self.vmap(fn, x, out_axis)
        x_leaves, x_def = jax.tree.flatten(x)
        x_axes = jax.tree.leaves(self.x_axes, is_leaf=lambda a: a is None)
        leaves = x_leaves + list(self.kw_leaves)
        axes = x_axes + list(self.kw_axes)
        mapped = [jnp.moveaxis(v, a, 0) for v, a in zip(leaves, axes) if a is not None]

        def step(example):
            it = iter(example)
            full = [v if a is None else next(it) for v, a in zip(leaves, axes)]
            return fn(jax.tree.unflatten(x_def, full[: len(x_leaves)]), full[len(x_leaves):])

        out = jax.lax.map(step, mapped, batch_size=batch_size)
        return jax.tree.map(lambda o: jnp.moveaxis(o, 0, out_axis), out)


def per_example(apply_fn: Callable, axes: VmapAxes, params: PyTree, x: PyTree,
                kwargs: dict[str, Any]) -> PerExample:
    """Builds the single-example function for inputs ``x`` and keyword args ``kwargs``."""
    unknown = sorted(set(axes.kwargs_axes) - set(kwargs))
    if unknown:
        raise ValueError(f"`vmap_axes` kwargs_axes names keyword(s) {unknown} that were not "
                         f"passed; passed: {sorted(kwargs)}.")
    x_axes = _canonical_leaf_axes(axes.in_axes, x, "in_axes")
    dyn, rebuild, _ = partition_static(kwargs)
    # per-leaf axes in the order jax.tree.leaves(kwargs) lists the leaves (sorted keys)
    flat_axes = [a for k in sorted(kwargs)
                 for a in _leaf_axes(axes.kwargs_axes.get(k), kwargs[k], f"kwargs_axes[{k!r}]")]
    all_leaves = jax.tree.leaves(kwargs)
    dyn_ids = [i for i, v in enumerate(all_leaves) if _is_dynamic(v)]
    dyn_axes = [flat_axes[i] for i in dyn_ids]
    for i, a in enumerate(flat_axes):
        if a is not None and i not in dyn_ids:
            raise ValueError(f"`vmap_axes` maps a keyword argument leaf that is not an array "
                             f"({all_leaves[i]!r}); only array arguments can be batched.")

    def expand(tree, tree_axes):
        return jax.tree.map(lambda v, a: v if a is None else jnp.expand_dims(v, a), tree,
                            tree_axes, is_leaf=lambda v: v is None)

    # trace only array keywords: Python scalars stay static (models branch on them)
    out_struct = jax.eval_shape(lambda p, xx, d: apply_fn(p, xx, **rebuild(d)), params, x, dyn)
    out_axes = _canonical_leaf_axes(axes.out_axes, out_struct, "out_axes")
    if None in _leaf_axes(axes.out_axes, out_struct, "out_axes"):
        raise ValueError(f"`vmap_axes` out_axes={axes.out_axes!r} must give every output leaf a "
                         "batch axis.")

    def fn(p, x_i, dyn_i):
        dyn_full = [v if a is None else jnp.expand_dims(v, a) for v, a in zip(dyn_i, dyn_axes)]
        out = apply_fn(p, expand(x_i, x_axes), **rebuild(dyn_full))
        return jax.tree.map(lambda o, a: jnp.squeeze(o, a), out, out_axes)

    pe = PerExample(fn, x_axes, dyn, dyn_axes, out_axes)
    _check_per_example(pe, axes, params, x, kwargs, flat_axes)
    return pe


def _check_per_example(pe: PerExample, axes: VmapAxes, params: PyTree, x: PyTree,
                       kwargs: dict[str, Any], flat_axes: list) -> None:
    """Diagnoses ``vmap_axes`` that do not fit the call, instead of the model's raw error."""
    x_leaves = jax.tree.leaves(x)
    x_axes = jax.tree.leaves(pe.x_axes, is_leaf=lambda a: a is None)
    sizes = {jnp.shape(v)[a] for v, a in zip(x_leaves, x_axes) if a is not None}
    names = [k for k in sorted(kwargs) for _ in jax.tree.leaves(kwargs[k])]
    leaves = jax.tree.leaves(kwargs)
    if len(sizes) == 1:
        n = sizes.pop()
        for k, v, a in zip(names, leaves, flat_axes):
            if a is not None and jnp.shape(v)[a] != n:
                raise ValueError(
                    f"`vmap_axes` kwargs_axes gives keyword argument `{k}` (shape "
                    f"{jnp.shape(v)}) batch axis {a}, which has {jnp.shape(v)[a]} entries, but "
                    f"the inputs hold {n} examples.")
    try:
        jax.eval_shape(lambda p, xx: pe.vmap(lambda x_i, d_i: pe.fn(p, x_i, d_i), xx,
                                             pe.out_axes), params, x)
    except Exception as e:
        undeclared = sorted({k for k, v, a in zip(names, leaves, flat_axes)
                             if a is None and k not in axes.kwargs_axes and k != "rng"
                             and _is_dynamic(v) and jnp.ndim(v)})  # mcntk passes rng
        listed = ", ".join(f"`{k}`" for k in undeclared)
        hint = (f" Keyword argument(s) {listed} are not in kwargs_axes, so every "
                f"example's call gets them whole: declare their batch axis (None if they are "
                f"the same for every example)." if undeclared else "")
        raise ValueError(
            f"`vmap_axes`=(in_axes={axes.in_axes!r}, out_axes={axes.out_axes!r}, "
            f"kwargs_axes={axes.kwargs_axes!r}) does not fit the model: calling it one example "
            f"at a time failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
            f"{hint}") from e


def _is_dynamic(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray)) or hasattr(leaf, "__jax_array__")


def partition_static(tree: PyTree) -> tuple[list[Any], Callable[[list[Any]], PyTree], tuple]:
    """Splits a pytree into array leaves (traced) and everything else (kept static).

    Python scalars stay static so that models may branch on them (``train=True``).
    Returns the array leaves, a function rebuilding the tree from new array leaves,
    and a hashable-when-possible description of the static part.
    """
    leaves, treedef = jax.tree.flatten(tree)
    dynamic_pos = [i for i, v in enumerate(leaves) if _is_dynamic(v)]
    # with its type: True == 1 == 1.0 as values, but a model may branch on the type
    static = tuple((i, type(v), v) for i, v in enumerate(leaves) if i not in set(dynamic_pos))

    def rebuild(dyn: list[Any]) -> PyTree:
        out = list(leaves)
        for i, v in zip(dynamic_pos, dyn):
            out[i] = v
        return jax.tree.unflatten(treedef, out)

    return [leaves[i] for i in dynamic_pos], rebuild, (treedef, tuple(dynamic_pos), static)


def split_trainable(params: PyTree) -> tuple[list[Any], Callable[[list[Any]], PyTree]]:
    """The floating-point leaves of ``params``, and a function putting
    new values for them back among the other leaves, which stay constant."""
    leaves, treedef = jax.tree.flatten(params)
    dtypes = [jnp.result_type(v) for v in leaves]
    complex_leaves = [str(d) for d in dtypes if jnp.issubdtype(d, jnp.complexfloating)]
    if complex_leaves:
        raise TypeError(f"`params` has complex leaves ({', '.join(complex_leaves)}); the NTK of "
                        "complex parameters is not defined here: split them into real and "
                        "imaginary parts.")
    keep = [jnp.issubdtype(d, jnp.floating) for d in dtypes]
    trainable = [v for v, k in zip(leaves, keep) if k]

    def merge(values: list[Any]) -> PyTree:
        it = iter(values)
        return jax.tree.unflatten(treedef, [next(it) if k else v for v, k in zip(leaves, keep)])

    return trainable, merge
