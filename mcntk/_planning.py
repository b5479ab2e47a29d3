"""From a prepared call to the grid plan: the model traced abstractly at the call's
shapes (once per call signature), the batch axis of each output leaf, the checks
that blocks of ``batch_size`` examples can be cut, and the :class:`_grid.GridPlan`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mcntk import _apply, _grid, _inputs
from mcntk._axes import AxesRule
from mcntk._types import PyTree
from mcntk.empirical import KernelSpec
from mcntk.ntk import _program, auto


class Planner:
    """Plans the calls of one kernel function; owns the cache of abstract evaluations."""

    def __init__(self, init_fn: Callable, spec: KernelSpec, key: Any, rng: bool):
        self.init_fn, self.spec, self.key, self.rng = init_fn, spec, key, rng
        self._shapes: dict[Any, tuple] = {}  # abstract evaluations per call signature
        self._checked: set = set()  # call signatures whose declared vmap_axes were checked

    def init(self, side1: _inputs.Side) -> Callable:
        """``init(key, dyn1) -> params`` for inputs like x1 (with x1's keyword arrays)."""
        def init(key, dyn):
            return _apply.call_init(self.init_fn, key, side1.x, side1.rebuild(dyn))
        return init

    def apply_for_shapes(self, params, x, **kwargs):
        if self.rng:
            kwargs = {**kwargs, "rng": self.key}
        return self.spec.apply_fn(params, x, **kwargs)

    def abstract(self, call: _inputs.Call) -> tuple:
        """``(params, f(x1), f(x2), batch axes of f(x1)'s leaves, whether f reads its
        rng)``, all abstract: the model traced at the call's shapes, once per call
        signature (then cached)."""
        key = self._signature(call)
        if call.static is not None and key in self._shapes:
            return self._shapes[key]
        side1 = call.side1
        params_struct = jax.eval_shape(self.init(side1), self.key, side1.dyn)
        out, out2 = _inputs.output_shapes(self.apply_for_shapes, params_struct, side1,
                                          call.side2)
        vmap = self.spec.vmap_axes
        batch_axes = _inputs.output_batch_axes(self.apply_for_shapes, params_struct, side1,
                                               None if vmap is None else vmap.out_axes)
        found = (params_struct, out, out2, batch_axes,
                 self.rng and _reads_rng(self.spec.apply_fn, params_struct, side1, self.key))
        if call.static is not None:
            if len(self._shapes) >= auto.CACHE_LIMIT:
                self._shapes.clear()
            self._shapes[key] = found
        return found

    @staticmethod
    def _signature(call: _inputs.Call) -> tuple:
        sides = [call.side1] + ([] if call.symmetric else [call.side2])
        return (auto.signature([(s.x, s.dyn) for s in sides]),
                tuple((tuple(map(str, s.x_axes)), tuple(map(str, s.dyn_axes)), tuple(s.names))
                      for s in sides), call.static)

    def check_vmap_axes(self, call: _inputs.Call, blocks1: _grid.Blocks) -> None:
        """Declared ``vmap_axes`` checked on values (:meth:`KernelSpec.check_declared_axes`)
        once per call signature: on x1's first block, with the first sample's parameters.
        Skipped for a model whose outputs read its rng (its draws differ per call)."""
        key = self._signature(call)
        if self.spec.vmap_axes is None or (call.static is not None and key in self._checked):
            return
        if self.rng and self.abstract(call)[4]:
            return
        first = blocks1.block(0)
        kwargs = first.rebuild(first.dyn)
        params = self.init(call.side1)(self.key, call.side1.dyn)
        self.spec.check_declared_axes(params, first.x,
                                      {**kwargs, "rng": self.key} if self.rng else kwargs)
        if call.static is not None:
            if len(self._checked) >= auto.CACHE_LIMIT:
                self._checked.clear()
            self._checked.add(key)

    def plan(self, call: _inputs.Call, batch_size: int
              ) -> tuple[_grid.GridPlan, list, Any, PyTree]:
        """The grid plan for blocks of ``batch_size``, the layout of each output leaf's
        kernel, the output treedef and the abstract parameters."""
        side1 = call.side1
        n1 = side1.size
        n2 = n1 if call.symmetric else call.side2.size
        split = bool(batch_size) and n1 is not None and n2 is not None and (
            batch_size < max(n1, n2))
        if split:  # before the model sees them: keyword arguments must be cut per block
            self._check_kwargs_splittable(call, batch_size)
        params_struct, out, out2, batch_axes, reads_rng = self.abstract(call)
        # blocks (i, j) and (j, i) see different dropout keys, so (j, i) is the
        # transpose of (i, j) only when the model's outputs do not depend on its rng
        mirror = not reads_rng
        leaves, treedef = jax.tree.flatten(out)
        trace, diagonal_axes = self.spec.axes
        traced = False
        if batch_axes is not None:
            plain = [AxesRule(trace, diagonal_axes, len(o.shape)) for o in leaves]
            traced = _inputs.warn_if_traced_examples(plain, batch_axes, trace, stacklevel=5)
        try:
            rules = self.spec.axes.rules(out, out2)
        except ValueError as e:
            if not traced:
                raise
            raise ValueError(f"{e} `trace_axes`={trace} traces the axis that holds the "
                             f"examples; to get one entry per pair of examples, pass "
                             f"`trace_axes`=().") from e
        if not split:
            plan = _grid.GridPlan(n1 or 1, n2 or 1, 0, call.symmetric, mirror, False)
            return plan, [None] * len(leaves), treedef, params_struct
        self._check_splittable([o.shape for o in leaves], rules, batch_axes, batch_size)
        layouts = [_grid.layout(r, a) for r, a in zip(rules, batch_axes)]
        diagonal = {w.diagonal for w in layouts}
        if len(diagonal) != 1:
            raise ValueError(
                f"`batch_size`={batch_size} needs the axis holding the examples to be "
                f"diagonal in every output leaf or in none; `diagonal_axes`="
                f"{self.spec.axes.diagonal} makes it diagonal in some output leaves only "
                f"(output shapes {[o.shape for o in leaves]}).")
        plan = _grid.GridPlan(n1, n2, batch_size, call.symmetric, mirror, diagonal.pop())
        return plan, layouts, treedef, params_struct

    def _check_splittable(self, shapes, rules, batch_axes, b: int) -> None:
        if batch_axes is None or None in batch_axes:
            raise ValueError(
                f"`batch_size`={b} cuts the examples into blocks, so it needs to know which "
                f"output axis holds the examples, and could not tell for output shapes "
                f"{shapes} (the output does not change with the number of examples in the way "
                f"expected). Declare it with `vmap_axes`=(in_axes, out_axes, kwargs_axes), "
                f"or use `batch_size`=0.")
        for rule, a in zip(rules, batch_axes):
            if a in rule.trace:
                raise ValueError(
                    f"`trace_axes`={self.spec.axes.trace} traces output axis {a}, the axis "
                    f"that holds the examples (output shapes {shapes}), so the kernel has no "
                    f"example axes to cut into `batch_size`={b} blocks. To get one entry per "
                    f"pair of examples, pass `trace_axes`=().")

    def _check_kwargs_splittable(self, call, b: int) -> None:
        """Every array keyword argument needs a known batch axis with one row per example."""
        for side, name in ((call.side1, "x1"), (call.side2, "x2")):
            if side is None:
                continue
            for kw, a, v in zip(side.names, side.dyn_axes, side.dyn):
                if a == _inputs.UNKNOWN:
                    raise ValueError(
                        f"keyword argument `{kw}` (an array of shape {jnp.shape(v)}) has no "
                        f"known batch axis, so `batch_size`={b} cannot give each block its "
                        f"rows. Pass it as a 2-tuple ({kw}_for_x1, {kw}_for_x2) (rows on axis "
                        f"0), declare its axis in `vmap_axes`=(in_axes, out_axes, {{'{kw}': "
                        f"axis}}), or, if it is the same for every example, bind it into "
                        f"apply_fn (functools.partial).")
                if a is not None and jnp.shape(v)[a] != side.size:
                    raise ValueError(
                        f"keyword argument `{kw}` has {jnp.shape(v)[a]} rows on its batch axis "
                        f"{a} (shape {jnp.shape(v)}), but `{name}` has {side.size} examples; "
                        f"`batch_size`={b} needs one row per example.")


def _reads_rng(apply_fn: Callable, params: PyTree, side: _inputs.Side, key: Any) -> bool:
    """Whether ``apply_fn(params, x, rng=key, **kwargs)``'s outputs depend on ``key``.

    Decided on the jaxpr by following the values computed from the key: an
    operation that reads one makes all its results depend on it (sub-programs
    included, so the answer errs towards "depends"). A model that accepts an
    ``rng`` and draws nothing (no dropout, or dropout switched off by a Python
    flag) does not depend on it."""
    def fn(p, x, dyn, k):
        return apply_fn(p, x, **side.rebuild(dyn), rng=k)

    jaxpr = jax.make_jaxpr(fn)(params, side.x, side.dyn, key).jaxpr
    keys = jaxpr.invars[len(jaxpr.invars) - len(jax.tree.leaves(key)):]  # the last ones
    return any(_program.depends(jaxpr, keys, jaxpr.outvars))
