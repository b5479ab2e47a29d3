"""A traced function as a flat list of primitive applications, and its evaluation.

``trace(fn, *args)`` turns ``jax.make_jaxpr(fn)(*args)`` into a :class:`Program`:
every value (inputs, constants, literals, intermediate results) gets an integer id,
and calls of sub-jaxprs that only group code (``jit``, ``closed_call``, ``remat``)
are inlined, so that a layer written inside a jitted helper (``jnp.dot``, a Flax
module) is seen primitive by primitive. Calls with their own differentiation rules
(``custom_jvp_call``, ``custom_vjp_call``) and control flow stay single nodes, so
that evaluating the program differentiates exactly like the original function.

:meth:`Program.evaluate` runs the program with *probes* (values added to chosen
results: at zero they change nothing, and derivatives with respect to them are the
cotangents of those results) and returns chosen intermediate values.

Only public JAX APIs are used: ``jax.make_jaxpr`` and ``jax.extend.core``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core as jcore

Ref = int
"""The id of one value of a :class:`Program`."""

# Calls whose sub-jaxpr is inlined: they group code and change nothing else.
_INLINED = {
    p: key
    for p, key in ((getattr(jcore.primitives, "jit_p", None), "jaxpr"),
                   (getattr(jcore.primitives, "closed_call_p", None), "call_jaxpr"),
                   (getattr(jcore.primitives, "call_p", None), "call_jaxpr"),
                   (getattr(jcore.primitives, "remat_p", None), "jaxpr"))
    if p is not None
}


class Node(NamedTuple):
    """One primitive application: ``outs = eqn.primitive(*ins)``.

    Attributes:
      eqn: the jaxpr equation (primitive and parameters).
      ins: the ids of its operands.
      outs: the ids of its results (None for results nobody reads).
    """

    eqn: Any
    ins: tuple[Ref, ...]
    outs: tuple[Ref | None, ...]

    @property
    def name(self) -> str:
        return self.eqn.primitive.name

    @property
    def params(self) -> Mapping[str, Any]:
        return self.eqn.params


class Program:
    """A flat program: nodes in evaluation order over values named by :data:`Ref`.

    Attributes:
      nodes: the primitive applications, in order.
      inputs: the ids of the traced function's (flattened) arguments.
      outputs: the ids of its (flattened) results.
      out_tree: the pytree structure of the results.
      consts: values known at trace time (closed-over arrays, literals) by id.
      avals: the abstract value (shape, dtype) of every id.
    """

    def __init__(self):
        self.nodes: list[Node] = []
        self.inputs: list[Ref] = []
        self.outputs: list[Ref] = []
        self.out_tree: Any = None
        self.consts: dict[Ref, Any] = {}
        self.avals: list[Any] = []

    def shape(self, ref: Ref) -> tuple[int, ...]:
        return tuple(self.avals[ref].shape)

    def _new(self, aval: Any) -> Ref:
        self.avals.append(aval)
        return len(self.avals) - 1

    def _const(self, value: Any, aval: Any) -> Ref:
        ref = self._new(aval)
        self.consts[ref] = value
        return ref

    def _inline(self, jaxpr: Any, consts: Sequence[Any], in_refs: Sequence[Ref]) -> list[Ref]:
        env: dict[Any, Ref] = {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = self._const(value, var.aval)
        env.update(zip(jaxpr.invars, in_refs))

        def read(atom):
            if isinstance(atom, jcore.Literal):
                return self._const(atom.val, atom.aval)
            return env[atom]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            key = _INLINED.get(eqn.primitive)
            if key is not None:
                sub = eqn.params[key]
                closed = isinstance(sub, jcore.ClosedJaxpr)
                sub_jaxpr, sub_consts = (sub.jaxpr, sub.consts) if closed else (sub, ())
                outs = self._inline(sub_jaxpr, sub_consts, ins)
            else:
                outs = [None if isinstance(v, jcore.DropVar) else self._new(v.aval)
                        for v in eqn.outvars]
                self.nodes.append(Node(eqn, tuple(ins), tuple(outs)))
            for var, ref in zip(eqn.outvars, outs):
                if not isinstance(var, jcore.DropVar):
                    env[var] = ref
        return [read(a) for a in jaxpr.outvars]

    def read_inputs(self) -> list[bool]:
        """For each input, whether the outputs depend on it. An input read only on the
        way to results nobody uses (a key split but never drawn from) is not; one read
        by an equation with side effects is."""
        live = set(self.outputs)
        for node in reversed(self.nodes):
            if node.eqn.effects or any(r is not None and r in live for r in node.outs):
                live.update(node.ins)
        return [r in live for r in self.inputs]

    def consumers(self) -> dict[Ref, list[tuple[int, int]]]:
        """For each id, the ``(node index, operand position)`` pairs that read it."""
        out: dict[Ref, list[tuple[int, int]]] = {}
        for i, node in enumerate(self.nodes):
            for pos, ref in enumerate(node.ins):
                out.setdefault(ref, []).append((i, pos))
        return out

    def evaluate(self, inputs: Sequence[Any], probes: Mapping[Ref, Any] | None = None,
                 capture: Sequence[Ref] = (),
                 rules: Mapping[str, Callable[..., Any]] | None = None
                 ) -> tuple[Any, dict[Ref, Any]]:
        """Runs the program.

        Args:
          inputs: one value per id of :attr:`inputs`.
          probes: values added to the results with these ids as they are computed.
          capture: ids whose values to return.
          rules: ``{primitive name: fn(*operands, **params) -> result}`` to evaluate
            those primitives with (same values; e.g. other derivative code); a list of
            results for primitives with several.

        Returns:
          ``(outputs as a pytree, {id: value for id in capture})``.
        """
        probes = probes or {}
        rules = rules or {}
        env: dict[Ref, Any] = dict(self.consts)
        for ref, value in zip(self.inputs, inputs):
            env[ref] = value + probes[ref] if ref in probes else value
        for node in self.nodes:
            operands = [env[r] for r in node.ins]
            rule = rules.get(node.name)
            if rule is None:
                results = apply(node.eqn, operands)
            else:
                out = rule(*operands, **node.params)
                results = list(out) if node.eqn.primitive.multiple_results else [out]
            for ref, value in zip(node.outs, results):
                if ref is not None:
                    env[ref] = value + probes[ref] if ref in probes else value
        outputs = jax.tree.unflatten(self.out_tree, [env[r] for r in self.outputs])
        return outputs, {r: env[r] for r in capture}


def apply(eqn: Any, values: Sequence[Any]) -> list[Any]:
    """The results of one equation applied to ``values``.

    A first-order primitive is bound directly; one that holds sub-jaxprs (custom
    derivative rules, control flow) is run through ``jax.extend.core.jaxpr_as_fun`` on a
    one-equation jaxpr, which applies JAX's own rules for it.
    """
    if not any(True for _ in jcore.jaxprs_in_params(eqn.params)):
        out = eqn.primitive.bind(*values, **eqn.params)
        return list(out) if eqn.primitive.multiple_results else [out]
    invars: list[Any] = []
    args: list[Any] = []
    for var, value in zip(eqn.invars, values):
        if not isinstance(var, jcore.Literal) and all(var is not v for v in invars):
            invars.append(var)
            args.append(value)
    outvars = [v for v in eqn.outvars if not isinstance(v, jcore.DropVar)]
    one = jcore.Jaxpr([], invars, outvars, [eqn], eqn.effects,
                      jcore.DebugInfo("mcntk structured derivatives", eqn.primitive.name, None,
                                      None))
    results = iter(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(one, []))(*args))
    return [None if isinstance(v, jcore.DropVar) else next(results) for v in eqn.outvars]


def trace(fn: Callable[..., Any], *args: Any) -> Program:
    """The :class:`Program` of ``fn(*args)`` (``args`` may be abstract)."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    program = Program()
    program.inputs = [program._new(v.aval) for v in closed.jaxpr.invars]
    program.outputs = program._inline(closed.jaxpr, closed.consts, program.inputs)
    program.out_tree = jax.tree.structure(out_shape)
    return program


def reached(jaxpr: jcore.Jaxpr, sources: Sequence[Any]) -> tuple[set, list[bool]]:
    """The variables of ``jaxpr`` computed from ``sources`` (its input variables, which
    are included), and per equation whether it reads one. An equation reading such a
    value makes all its results computed from them; sub-programs are not looked into,
    so the answer errs towards "computed from"."""
    found = set(sources)
    reads = []
    for eqn in jaxpr.eqns:
        reads.append(any(not isinstance(v, jcore.Literal) and v in found for v in eqn.invars))
        if reads[-1]:
            found.update(eqn.outvars)
    return found, reads


def depends(jaxpr: jcore.Jaxpr, sources: Sequence[Any], values: Sequence[Any]) -> list[bool]:
    """Whether each of ``values`` (variables or literals of ``jaxpr``) is computed from
    ``sources`` (:func:`reached`)."""
    found = reached(jaxpr, sources)[0]
    return [not isinstance(v, jcore.Literal) and v in found for v in values]
