"""Kernels of one network with given parameters (one Monte Carlo sample).

These are the building blocks neural-tangents users know. ``f`` is an
``apply_fn(params, x, **kwargs)``. The meaning of ``trace_axes``,
``diagonal_axes`` and of keyword arguments (``rng``, 2-tuples) is explained once,
in :mod:`mcntk._axes` and :mod:`mcntk._apply` (and in docs/axes.md).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcntk import _apply, _axes, _independence, _inputs, ntk
from mcntk._types import (
    NtkImplementation,
    PyTree,
    canonicalize_get,
    pack_result,
    unpack_implementation,
)
from mcntk.ntk import _program, auto


def _reads_rng(apply_fn: Callable, params: PyTree, x: PyTree, kwargs: dict) -> bool:
    """Whether ``apply_fn(params, x, **kwargs)`` depends on ``kwargs['rng']`` (a model
    without dropout or other draws ignores it)."""
    rest = {k: v for k, v in kwargs.items() if k != "rng"}
    program = _program.trace(lambda key: apply_fn(params, x, rng=key, **rest), kwargs["rng"])
    return any(program.read_inputs())


def _either_reads_rng(apply_fn: Callable, params: PyTree, x1: PyTree, x2: PyTree | None,
                      kw1: dict, kw2: dict) -> bool:
    """Whether f(x1) or f(x2) (x2 None: x1 with ``kw2``) depends on its ``rng``: each
    side's keyword arguments (a flag given as a pair) and shapes may differ."""
    sides = [(x1, kw1)]
    if x2 is not None or kw2 is not kw1:
        sides.append((x1 if x2 is None else x2, kw2))
    return any("rng" in kw and _reads_rng(apply_fn, params, x, kw) for x, kw in sides)


class KernelSpec:
    """Everything about a kernel that does not depend on the inputs (validated once)."""

    def __init__(self, apply_fn: Callable, trace_axes: Any = (-1,), diagonal_axes: Any = (),
                 vmap_axes: Any = None,
                 implementation: Any = NtkImplementation.AUTO, detect_vmap_axes: bool = True):
        if not callable(apply_fn):
            raise TypeError(f"`apply_fn` must be callable, got {apply_fn!r}.")
        if not isinstance(detect_vmap_axes, bool):
            raise TypeError(f"`detect_vmap_axes` must be a bool, got {detect_vmap_axes!r}.")
        trace = _axes.check_axes_arg(trace_axes, "trace_axes")
        diagonal = _axes.check_axes_arg(diagonal_axes, "diagonal_axes")
        _axes.check_disjoint_static(trace, diagonal)
        self.apply_fn = apply_fn
        self.axes = ntk.Axes(trace, diagonal)
        self.vmap_axes = _apply.canonicalize_vmap_axes(vmap_axes)
        self.implementation = unpack_implementation(implementation)
        ntk.check_available(self.implementation)
        self.auto_choices: dict[Hashable, auto.Choice] = {}  # AUTO's choice per signature
        self.detect_vmap_axes = detect_vmap_axes
        # per call signature: whether the examples are independent (vmap_axes=None)
        self.independence: dict[Hashable, _independence.Decision] = {}
        self._checked: set = set()  # signatures checked for a traced example axis

    def side(self, apply_fn: Callable, params: PyTree, x: PyTree, kwargs: dict,
             vmap_axes: _apply.VmapAxes | None) -> ntk.Side:
        fn = lambda p: apply_fn(p, x, **kwargs)
        pe = None
        if vmap_axes is not None:
            pe = _apply.per_example(apply_fn, vmap_axes, params, x, kwargs)
        return ntk.Side(fn, x, pe)

    def per_example_axes(self, key: Hashable | None, params: PyTree,
                         sides: list[_inputs.Side], rng: Any = None) -> _apply.VmapAxes | None:
        """The ``vmap_axes`` of the NTK's per-example derivatives: those declared, else
        those :mod:`mcntk._independence` proves for these sides (remembered in
        ``self.independence`` under ``key``), else None."""
        if self.vmap_axes is not None or not self.detect_vmap_axes:
            return self.vmap_axes
        decision = self.independence.get(key) if key is not None else None
        if decision is None:
            decision = _independence.decide(self.apply_fn, params, sides, rng)
            if key is not None:
                if len(self.independence) >= auto.CACHE_LIMIT:
                    self.independence.clear()
                self.independence[key] = decision
        return decision.vmap_axes

    def check_declared_axes(self, params: PyTree, x: PyTree, kwargs: dict) -> None:
        """Declared ``vmap_axes`` promise that example ``i``'s output is the model's output
        for example ``i`` alone. Checked on values (a batch call and per-example calls;
        the caller skips models that draw random numbers, whose draws differ per call):
        a ``ValueError`` naming ``vmap_axes`` if they differ, e.g. BatchNorm in training
        mode, instead of an NTK of another model than the NNGP's."""
        trainable, merge = _apply.split_trainable(params)
        apply_fn = lambda p, x, **kw: self.apply_fn(merge(p), x, **kw)
        try:
            pe = _apply.per_example(apply_fn, self.vmap_axes, trainable, x, kwargs)
        except ValueError:  # axes that do not fit: the kernel's own checks say how
            return
        counts = {jnp.shape(v)[a] for v, a in zip(
            jax.tree.leaves(x), jax.tree.leaves(pe.x_axes, is_leaf=lambda a: a is None))
            if a is not None}
        if counts and max(counts) < 2:
            return
        whole = apply_fn(trainable, x, **kwargs)
        each = pe.vmap(lambda x_i, kw_i: pe.fn(trainable, x_i, kw_i), x, pe.out_axes)
        worst, tolerance = 0.0, 1e-3  # far above rounding: batched and per-example
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(each)):  # products differ
            if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
                tolerance = max(tolerance, 64 * float(jnp.finfo(jnp.result_type(a)).eps))
            try:
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            except jax.errors.TracerArrayConversionError:  # under a trace: no values
                return
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
        if not worst <= tolerance:
            a = self.vmap_axes
            raise ValueError(
                f"`vmap_axes`=(in_axes={a.in_axes!r}, out_axes={a.out_axes!r}, kwargs_axes="
                f"{a.kwargs_axes!r}) declares that the model treats its examples "
                f"independently, but its outputs for the examples one at a time differ from "
                f"its outputs for the batch (by {worst:.3g} relative to the largest output): "
                f"the examples interact (e.g. BatchNorm in training mode, a mean over the "
                f"batch). Pass `vmap_axes`=None for this model.")

    def kernels(self, names: tuple[str, ...], params: PyTree, x1: PyTree, x2: PyTree | None,
                kw1: dict, kw2: dict, implementation: NtkImplementation | None = None,
                options: ntk.Options = ntk.DEFAULT_OPTIONS,
                vmap_axes: _apply.VmapAxes | None = None) -> dict[str, PyTree]:
        """The kernels ``names`` of one parameter sample; ``x2=None`` reuses ``f(x1)``.

        Traceable. ``implementation`` must be concrete (AUTO resolved by the caller).
        ``vmap_axes`` (from :meth:`per_example_axes`) replaces the declared ones.
        """
        want_ntk = "ntk" in names
        axes = (self.vmap_axes if vmap_axes is None else vmap_axes) if want_ntk else None
        # only floating-point leaves are parameters; integer leaves (counters, ids)
        # are held fixed, like a framework's non-trainable state
        trainable, merge = _apply.split_trainable(params)
        apply_fn = lambda p, x, **kw: self.apply_fn(merge(p), x, **kw)
        side1 = self.side(apply_fn, trainable, x1, kw1, axes)
        side2 = None if x2 is None else self.side(apply_fn, trainable, x2, kw2, axes)
        params = trainable
        out: dict[str, PyTree] = {}
        if want_ntk:
            impl = implementation or self.implementation
            fx1, fx2, out["ntk"] = ntk.get(impl)(side1, side2, params, self.axes, options)
        else:
            fx1 = side1.fn(params)
            fx2 = fx1 if side2 is None else side2.fn(params)
        if "nngp" in names:
            if (side1.per_example is not None and self.vmap_axes is not None
                    and _either_reads_rng(apply_fn, params, x1, x2, kw1, kw2)):
                # random streams are drawn per call: the NNGP sees the whole batch's draws,
                # as neural-tangents' does, whatever the NTK's per-example calls saw
                # (detected per-example axes come with a proof that nothing is drawn)
                fx1 = side1.fn(params)
                fx2 = fx1 if side2 is None else side2.fn(params)
            out["nngp"] = ntk.nngp(self.axes, fx1, fx2, options)
        return out

    def resolve(self, names: tuple[str, ...],
                make_fn: Callable[[NtkImplementation, ntk.Options], Callable],
                args: tuple, key: Hashable | None) -> NtkImplementation:
        """The concrete implementation to use for these argument shapes (AUTO's choice
        is remembered in ``self.auto_choices`` under ``key``)."""
        if self.implementation != NtkImplementation.AUTO or "ntk" not in names:
            return (self.implementation if self.implementation != NtkImplementation.AUTO
                    else NtkImplementation.JACOBIAN_CONTRACTION)
        return auto.choose(make_fn, args, self.auto_choices, key).implementation

    def _check_call(self, params: PyTree, x1: PyTree, x2: PyTree | None, kw1: dict,
                    kw2: dict) -> None:
        """Once per signature: x2 must suit the model as x1 does (else an error naming both
        shapes), and a traced output axis holding the examples gives a warning."""
        strip = lambda kw: {k: v for k, v in kw.items() if k != "rng"}
        _inputs.check_kwargs_axes_names(self.vmap_axes, strip(kw1))
        sides = [_inputs._side(x, strip(kw), set(), self.vmap_axes, name)
                 for x, kw, name in ((x1, kw1, "x1"), (x2, kw2, "x2")) if x is not None]
        for side, name in zip(sides, ("x1", "x2")):
            _inputs.check_examples(side, name)
        key = (auto.signature(params, [(s.x, s.dyn) for s in sides]),
               _apply.partition_static((strip(kw1), strip(kw2)))[2])
        try:
            if key in self._checked:
                return
            self._checked.add(key)
        except TypeError:  # unhashable static values: check every time
            pass
        # a model that reads rng draws other masks per example: nothing to compare
        if self.vmap_axes is not None and (
                "rng" not in kw1 or not _reads_rng(self.apply_fn, params, x1, kw1)):
            self.check_declared_axes(params, x1, kw1)
        rng = {"rng": kw1["rng"]} if "rng" in kw1 else {}
        apply_fn = lambda p, x, **kw: self.apply_fn(p, x, **kw, **rng)
        out = _inputs.output_shapes(apply_fn, params, sides[0],
                                    sides[1] if len(sides) > 1 else None)[0]
        rules = [_axes.AxesRule(self.axes.trace, self.axes.diagonal, len(o.shape))
                 for o in jax.tree.leaves(out)]
        axes = _inputs.output_batch_axes(apply_fn, params, sides[0],
                                         None if self.vmap_axes is None else
                                         self.vmap_axes.out_axes)
        if axes is not None:
            _inputs.warn_if_traced_examples(rules, axes, self.axes.trace, stacklevel=5)

    def __call__(self, names, params, x1, x2, kwargs):
        """Kernels with ``kwargs`` split by the x1/x2 rule, AUTO resolved by cost."""
        x2, kw1, kw2 = _apply.prepare(x1, x2, kwargs)
        dyn, rebuild, static = _apply.partition_static((kw1, kw2))
        self._check_call(params, x1, x2, kw1, kw2)

        args = (params, x1, x2, dyn)
        key = (names, auto.signature(*args), static)
        try:
            hash(key)
        except TypeError:
            key = None
        vmap = None
        if "ntk" in names:
            pairs = {k for k, v in kwargs.items()
                     if k != "rng" and isinstance(v, tuple) and len(v) == 2}
            sides = [_inputs._side(x, kw, pairs, None, name) for x, kw, name in
                     ((x1, kw1, "x1"), (x2, kw2, "x2")) if x is not None]
            vmap = self.per_example_axes(key and (*key[1:], frozenset(pairs)), params, sides)

        def make_fn(impl, options=ntk.DEFAULT_OPTIONS):
            def fn(p, a, b, d):
                k1, k2 = rebuild(d)
                return self.kernels(names, p, a, b, k1, k2, impl, options, vmap)
            return fn

        impl = self.resolve(names, make_fn, args, key)
        return make_fn(impl)(*args)


def empirical_kernel_fn(f: Callable, trace_axes: Any = (-1,), diagonal_axes: Any = (),
                        vmap_axes: Any = None,
                        implementation: Any = NtkImplementation.AUTO, *,
                        detect_vmap_axes: bool = True) -> Callable:
    """Returns ``kernel_fn(x1, x2=None, get=None, params=None, **apply_fn_kwargs)``.

    The returned function computes the NNGP ``f(x1) f(x2)^T`` and/or the NTK
    ``J(x1) J(x2)^T`` of ``f`` at ``params``, with the axes rule of
    ``trace_axes``/``diagonal_axes``. ``get`` is ``None`` (an ``EmpiricalKernel``),
    ``'nngp'``/``'ntk'`` (an array) or a tuple of names (a namedtuple).

    With ``vmap_axes=None`` and ``detect_vmap_axes=True``, the NTK uses per-example
    derivatives when the model provably treats its examples independently
    (docs/axes.md); ``kernel_fn.independence`` holds each call signature's decision.

    Example:
      >>> import jax, mcntk
      >>> from jax.example_libraries import stax
      >>> init_fn, apply_fn = stax.serial(stax.Dense(8), stax.Relu, stax.Dense(2))
      >>> _, params = init_fn(jax.random.PRNGKey(0), (3, 4))
      >>> x = jax.numpy.ones((3, 4))
      >>> kernel_fn = mcntk.empirical_kernel_fn(apply_fn)
      >>> kernel_fn(x, None, 'ntk', params).shape
      (3, 3)
    """
    spec = KernelSpec(f, trace_axes, diagonal_axes, vmap_axes, implementation,
                      detect_vmap_axes)

    def kernel_fn(x1, x2=None, get=None, params=None, **apply_fn_kwargs):
        names, single = canonicalize_get(get)
        if params is None:
            raise TypeError("`params` must be given to an empirical kernel function.")
        values = spec(names, params, x1, x2, apply_fn_kwargs)
        treedef = jax.tree.structure(values[names[0]])
        return pack_result(values, names, single, "EmpiricalKernel", treedef,
                           asked_none=get is None)

    kernel_fn.independence = spec.independence
    return kernel_fn


def empirical_nngp_fn(f: Callable, trace_axes: Any = (-1,), diagonal_axes: Any = ()) -> Callable:
    """Returns ``nngp_fn(x1, x2, params, **apply_fn_kwargs)``: the NNGP ``f(x1) f(x2)^T``."""
    spec = KernelSpec(f, trace_axes, diagonal_axes)

    def nngp_fn(x1, x2, params, **apply_fn_kwargs):
        return spec(("nngp",), params, x1, x2, apply_fn_kwargs)["nngp"]

    return nngp_fn


def empirical_ntk_fn(f: Callable, trace_axes: Any = (-1,), diagonal_axes: Any = (),
                     vmap_axes: Any = None,
                     implementation: Any = NtkImplementation.AUTO, *,
                     detect_vmap_axes: bool = True) -> Callable:
    """Returns ``ntk_fn(x1, x2, params, **apply_fn_kwargs)``: the NTK ``J(x1) J(x2)^T``.

    ``detect_vmap_axes`` and ``ntk_fn.independence``: as for :func:`empirical_kernel_fn`.
    """
    spec = KernelSpec(f, trace_axes, diagonal_axes, vmap_axes, implementation,
                      detect_vmap_axes)

    def ntk_fn(x1, x2, params, **apply_fn_kwargs):
        return spec(("ntk",), params, x1, x2, apply_fn_kwargs)["ntk"]

    ntk_fn.independence = spec.independence
    return ntk_fn


__all__ = ["empirical_kernel_fn", "empirical_nngp_fn", "empirical_ntk_fn", "KernelSpec"]
