"""NTK by structured derivatives: contract the factors of each layer's Jacobian.

The idea is that of Novak, Sohl-Dickstein and Schoenholz, "Fast Finite Width
Neural Tangent Kernel" (ICML 2022): the Jacobian of a network with respect to the
kernel ``W`` of a dense layer ``y = u W`` is the outer product of the layer's
input ``u`` and the cotangents at its output ``y``, so its NTK term

    ``sum_W J(x1) J(x2)^T = (u1 u2^T) * (g1 g2^T)``

is a product of an input Gram and a cotangent Gram, and no Jacobian need ever be
formed. The same holds, with other index patterns, for every bilinear use of a
parameter (``dot_general`` with any dimension numbers, convolutions through
patches, bias additions, elementwise scales).

How it is computed, for each side of the kernel:

1. ``apply_fn`` is traced to a jaxpr (:mod:`mcntk.ntk._program`; one example at a
   time when ``vmap_axes`` is given, so every factor is per example).
2. Each parameter is followed through operations that only rearrange it to its
   uses (:mod:`mcntk.ntk._structure`).
3. The program is evaluated again with zero-valued probes added to the results of
   the uses; one VJP per output entry (vectorised) gives the cotangents at every
   probe, and the data operands of the uses are captured on the way.
4. The factors of x1 and x2 are contracted with ``einsum``, the contraction
   order chosen by FLOPs (:mod:`mcntk.ntk._contract`).

A parameter used in any other way (``gather`` as in an embedding, ``reduce_sum``,
``select_n``, a depthwise or batch-grouped convolution, a convolution taking it as
its input, inside a ``custom_jvp``/``custom_vjp`` function or control flow, read
directly as an output, or shared between uses that lay it out differently) falls
back to the Jacobian contraction for that parameter only: its cotangent, i.e. its
Jacobian, is taken from the same VJP.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mcntk._types import PyTree
from mcntk.ntk import _contract, _cotangents, _layouts, _program, _structure
from mcntk.ntk._sides import Axes, Options, Side, zeros_except


class _Evaluated(NamedTuple):
    """One side's outputs, captured data and per-output-leaf cotangents."""

    program: _program.Program
    structure: _structure.Structure
    routes: _cotangents.Routes
    outputs: PyTree
    captured: dict
    cotangents: list[dict]
    example_axes: list[int] | None  # per output leaf, when evaluated per example
    shared: list[frozenset] | None = None  # per output leaf: cotangents without that axis

    def side_values(self, leaf: int, labels: list[int], shape: tuple[int, ...]
                    ) -> _contract.SideValues:
        """The values for output leaf ``leaf`` (of ``shape``) whose dimensions have
        ``labels``."""
        if self.example_axes is None:
            lead, out_labels, example = labels, labels, None
        else:
            axis = self.example_axes[leaf]
            out_labels = [label for i, label in enumerate(labels) if i != axis]
            lead, example = [labels[axis], *out_labels], labels[axis]
        shared = frozenset() if self.shared is None else self.shared[leaf]
        return _contract.SideValues(self.program, self.routes, leaf, self.captured,
                                    self.cotangents[leaf], lead, out_labels, example,
                                    dict(zip(labels, shape)), shared)


def _abstract_example(value: Any, axis: int | None) -> jax.ShapeDtypeStruct:
    shape = tuple(jnp.shape(value))
    if axis is not None:
        shape = shape[:axis] + shape[axis + 1:]
    return jax.ShapeDtypeStruct(shape, jnp.result_type(value))


def _trace(side: Side, params: list) -> _program.Program:
    pe = side.per_example
    if pe is None:
        return _program.trace(side.fn, params)
    return _program.trace(pe.fn, params, *_one_example(side))


def _run(program: _program.Program, inputs: list, probe_refs: list, capture: list):
    """Outputs, captured values and, per output leaf, the cotangents of the probes
    for every entry of that leaf (leading dimensions: the leaf's shape)."""
    zeros = {r: jnp.zeros(program.shape(r), program.avals[r].dtype) for r in probe_refs}

    def run(probes):
        return program.evaluate(inputs, probes, capture, _layouts.RULES)

    if not zeros:
        outputs, captured = run({})
        return outputs, captured, [{} for _ in jax.tree.leaves(outputs)]
    outputs, vjp, captured = jax.vjp(run, zeros, has_aux=True)
    cotangents = []
    for k, leaf in enumerate(jax.tree.leaves(outputs)):
        basis = jnp.eye(leaf.size, dtype=leaf.dtype).reshape((leaf.size, *leaf.shape))
        per_entry = jax.vmap(lambda e, k=k: vjp(zeros_except(outputs, k, e))[0])(basis)
        cotangents.append({r: v.reshape(leaf.shape + v.shape[1:])
                           for r, v in per_entry.items()})
    return outputs, captured, cotangents


def _evaluate(side: Side, program: _program.Program, structure: _structure.Structure,
              params: list) -> _Evaluated:
    results = [program.nodes[u.node].outs[0] for uses in structure.uses for u in uses]
    routes = _cotangents.Routes(program, results)
    probes = routes.probes(program.inputs[p] for p in structure.unstructured)
    capture = structure.capture_refs(program)
    pe = side.per_example
    if pe is None:
        evaluated = _run(program, list(params), probes, capture)
        return _Evaluated(program, structure, routes, *evaluated, None)

    def one(x_i, kw_i):
        return _run(program, [*params, *jax.tree.leaves(x_i), *kw_i], probes, capture)

    cotangent_axes = _cotangent_axes(one, _one_example(side))
    evaluated = pe.vmap(one, side.x, (pe.out_axes, 0, cotangent_axes))
    shared = [frozenset(r for r, a in axes.items() if a is None) for axes in cotangent_axes]
    return _Evaluated(program, structure, routes, *evaluated, jax.tree.leaves(pe.out_axes),
                      shared)


def _one_example(side: Side) -> tuple:
    """Abstract ``(x_i, kw_i)``: one example of ``side``."""
    pe = side.per_example
    axes = jax.tree.leaves(pe.x_axes, is_leaf=lambda a: a is None)
    leaves, treedef = jax.tree.flatten(side.x)
    x_i = jax.tree.unflatten(treedef, [_abstract_example(v, a) for v, a in zip(leaves, axes)])
    return x_i, [_abstract_example(v, a) for v, a in zip(pe.kw_leaves, pe.kw_axes)]


def _cotangent_axes(one, example: tuple) -> list[dict]:
    """Per output leaf, ``{ref: 0 or None}``: None for a cotangent that does not depend
    on the example (e.g. behind a flatten and a dense readout), computed once and
    contracted without an example axis instead of repeated for every example.

    Decided on the jaxpr of ``one``: an equation's results depend on the example if
    any of its operands does (sub-programs are not looked into: conservative)."""
    closed, (_, _, cotangents) = jax.make_jaxpr(one, return_shape=True)(*example)
    jaxpr = closed.jaxpr
    leaves, treedef = jax.tree.flatten(cotangents)
    outs = jaxpr.outvars[len(jaxpr.outvars) - len(leaves):]  # the last ones
    found = _program.depends(jaxpr, jaxpr.invars, outs)
    return jax.tree.unflatten(treedef, [0 if d else None for d in found])


def _split(ev: _Evaluated, n1: int) -> tuple[_Evaluated, _Evaluated]:
    """The evaluation of x1's ``n1`` examples followed by x2's, as two evaluations."""
    def cut(tree, axes):
        leaves, treedef = jax.tree.flatten(tree)
        halves = [(v, v) if a is None else jnp.split(v, [n1], axis=a)
                  for v, a in zip(leaves, axes)]
        return tuple(jax.tree.unflatten(treedef, [h[k] for h in halves]) for k in (0, 1))

    zeros = lambda tree: [0] * len(jax.tree.leaves(tree))
    outputs = cut(ev.outputs, ev.example_axes)
    captured = cut(ev.captured, zeros(ev.captured))
    shared = ev.shared or [frozenset()] * len(ev.cotangents)
    axes = [{r: None if r in s else 0 for r in c} for c, s in zip(ev.cotangents, shared)]
    cotangents = cut(ev.cotangents, jax.tree.leaves(axes, is_leaf=lambda a: a is None))
    return tuple(ev._replace(outputs=outputs[k], captured=captured[k],
                             cotangents=cotangents[k]) for k in (0, 1))


def _joint(side1: Side, side2: Side) -> tuple[Side, int] | None:
    """One side holding x1's examples then x2's, when both sides evaluate the same
    per-example program (same shapes, same shared keyword values); and x1's count."""
    pe1, pe2 = side1.per_example, side2.per_example
    if pe1 is None or pe2 is None or pe1.kw_axes != pe2.kw_axes:
        return None
    if jax.tree.leaves(pe1.out_axes) != jax.tree.leaves(pe2.out_axes):
        return None
    x1, treedef = jax.tree.flatten(side1.x)
    x2, treedef2 = jax.tree.flatten(side2.x)
    axes = jax.tree.leaves(pe1.x_axes, is_leaf=lambda a: a is None)
    if treedef != treedef2 or axes != jax.tree.leaves(pe2.x_axes, is_leaf=lambda a: a is None):
        return None
    pairs = list(zip(x1 + pe1.kw_leaves, x2 + pe2.kw_leaves, axes + list(pe1.kw_axes)))
    counts = set()
    for a, b, axis in pairs:
        if axis is None:
            if a is not b:
                return None
            continue
        if (jnp.result_type(a) != jnp.result_type(b) or jnp.ndim(a) != jnp.ndim(b) or any(
                m != n for d, (m, n) in enumerate(zip(jnp.shape(a), jnp.shape(b)))
                if d != axis)):
            return None
        counts.add(jnp.shape(a)[axis])
    if len(counts) != 1:
        return None
    joined = [a if axis is None else jnp.concatenate([a, b], axis) for a, b, axis in pairs]
    x = jax.tree.unflatten(treedef, joined[: len(x1)])
    return Side(None, x, pe1._replace(kw_leaves=joined[len(x1):])), counts.pop()


def _kernel(rule, ev1: _Evaluated, ev2: _Evaluated, index: int, n_params: int,
            shapes: tuple) -> jax.Array:
    fresh = _contract.counter()
    labels1 = fresh(rule.ndim)
    labels2 = [labels1[i] if i in rule.trace or i in rule.diagonal else fresh(1)[0]
               for i in range(rule.ndim)]
    out = []
    for i in range(rule.ndim):
        if i in rule.diagonal:
            out.append(labels1[i])
        elif i not in rule.trace:
            out += [labels1[i], labels2[i]]
    shape1, shape2, dtype = shapes
    sizes = {**dict(zip(labels1, shape1)), **dict(zip(labels2, shape2))}
    v1 = ev1.side_values(index, labels1, shape1)
    v2 = ev2.side_values(index, labels2, shape2)
    pairs = []
    for p in range(n_params):
        if p in ev1.structure.unstructured:
            pairs.append((_contract.direct_factors(v1, p, fresh),
                          _contract.direct_factors(v2, p, fresh)))
            continue
        pairs += [(_contract.use_factors(v1, u, fresh), _contract.use_factors(v2, w, fresh))
                  for u in ev1.structure.uses[p] for w in ev2.structure.uses[p]]
    total = _contract.contract(pairs, out, sizes)
    if total is None:
        return jnp.zeros(rule.kernel_shape(shape1, shape2), dtype)
    return total / rule.trace_size(shape1)


def ntk(side1: Side, side2: Side | None, params: PyTree, axes: Axes, options: Options):
    """``(f(x1), f(x2), NTK)`` by structured derivatives; see the module docstring."""
    params = list(params)
    prog1 = _trace(side1, params)
    struct1 = _structure.analyse(prog1, len(params))
    if side2 is None:
        struct1, _ = _structure.pair(struct1, struct1)
        ev1 = ev2 = _evaluate(side1, prog1, struct1, params)
    elif not options.separate_sides and (joint := _joint(side1, side2)) is not None:
        # one batch of x1's and x2's examples
        struct1, _ = _structure.pair(struct1, struct1)
        ev1, ev2 = _split(_evaluate(joint[0], prog1, struct1, params), joint[1])
    else:
        prog2 = _trace(side2, params)
        struct2 = _structure.analyse(prog2, len(params))
        struct1, struct2 = _structure.pair(struct1, struct2)
        ev1 = _evaluate(side1, prog1, struct1, params)
        ev2 = _evaluate(side2, prog2, struct2, params)
    fx1, fx2 = ev1.outputs, ev2.outputs
    rules = axes.rules(fx1, fx2)
    leaves1, treedef = jax.tree.flatten(fx1)
    leaves2 = jax.tree.leaves(fx2)
    kernels = [_kernel(rule, ev1, ev2, k, len(params), (a.shape, b.shape, a.dtype))
               for k, (rule, a, b) in enumerate(zip(rules, leaves1, leaves2))]
    return fx1, fx2, jax.tree.unflatten(treedef, kernels)
