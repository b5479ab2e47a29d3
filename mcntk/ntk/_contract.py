"""The structured NTK term of one parameter: factors of its Jacobian, contracted.

For a use ``y = B(u, W)`` (bilinear in data ``u`` and parameter ``W``) with
cotangents ``g[o, y]`` of every output entry ``o`` at ``y``, the Jacobian with
respect to ``W`` is a contraction of ``g`` and ``u``:

* ``dot_general``: ``J[o, W] = sum_free(u) g[o, y] u`` over the data operand's
  free dimensions (batch and contracting dimensions are shared);
* ``conv_general_dilated``: ``J[o, W] = sum_{n, s} g[o, n, :, s] P(u)[n, :, :, s]``
  with ``P`` the patches of the input;
* ``add``: ``J[o, W] = g[o, y]`` (summed over broadcast dimensions);
* ``mul``: ``J[o, W] = g[o, y] u[y]`` (summed over broadcast dimensions).

The NTK term ``J(x1) J(x2)^T`` is then one ``einsum`` of the x1 factors and the x2
factors, with the parameter's dimensions shared between the sides and the output
dimensions laid out by the axes rule. ``jnp.einsum`` chooses the order of the
pairwise contractions by FLOPs, so that, e.g., the Gram of the layer inputs and the
Gram of the cotangents are formed first when that is cheaper than the Jacobians.
Terms that read the same cotangents (a kernel and its bias) share their cotangent
Gram when that is cheaper (:func:`contract`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mcntk.ntk._cotangents import Routes
from mcntk.ntk._program import Program, Ref
from mcntk.ntk._structure import Use


class SideValues(NamedTuple):
    """What one side's evaluation produced, seen from one output leaf.

    Attributes:
      program: the side's program.
      routes: where the cotangents of use results are read (:mod:`._cotangents`).
      leaf: the index of the output leaf.
      captured: values of data operands and scales, by id.
      cotangents: cotangents of probed ids for this leaf; leading dimensions: ``lead``.
      lead: labels of the leading (output) dimensions of every cotangent.
      out_labels: labels of the dimensions of the program's output leaf (``lead``
        without the example dimension when evaluated per example).
      example: the label of the leading example dimension of every captured value
        (per-example evaluation), or None.
      sizes: the size of every label of ``lead``.
      shared: ids whose cotangents do not depend on the example (per-example
        evaluation): their leading labels are ``out_labels``, not ``lead``.
    """

    program: Program
    routes: Routes
    leaf: int
    captured: Mapping[Ref, jax.Array]
    cotangents: Mapping[Ref, jax.Array]
    lead: list[int]
    out_labels: list[int]
    example: int | None
    sizes: Mapping[int, int]
    shared: frozenset = frozenset()

    def cotangent(self, ref: Ref) -> tuple[jax.Array, list[int], dict[int, int]]:
        """The cotangents of ``ref``, the labels of their leading dimensions, and the
        example label they leave out (with its size) when they are shared."""
        if ref in self.shared:
            return self.cotangents[ref], self.out_labels, {
                self.example: self.sizes[self.example]}
        return self.cotangents[ref], self.lead, {}


class Factors(NamedTuple):
    """Labelled operands whose contraction is one side's Jacobian of one use.

    ``source`` is the id whose cotangent is the first operand (None when the
    cotangent is an identity, left out; ``covered`` then has its labels and sizes).
    ``covered`` also holds the example label that a shared cotangent leaves out: a
    term whose operands all lack it is summed over it (a multiplicity) or
    broadcast along it.
    """

    operands: list[tuple[jax.Array, list[int]]]
    param_labels: list[int]
    sign: float
    source: Ref | None = None
    covered: Mapping[int, int] = {}


def counter() -> Callable[[int], list[int]]:
    """``fresh(k)``: ``k`` labels never returned before."""
    it = itertools.count()
    return lambda k=1: [next(it) for _ in range(k)]


def use_factors(side: SideValues, use: Use, fresh: Callable[[int], list[int]]) -> Factors:
    """The factors of the Jacobian of ``use`` on one side."""
    program = side.program
    node = program.nodes[use.node]
    ex = [] if side.example is None else [side.example]
    y_shape = program.shape(node.outs[0])
    source, sign = side.routes.source[node.outs[0]]
    identity = side.routes.identity.get((source, side.leaf))
    g, g_lead, covered = (None, side.lead, {}) if identity else side.cotangent(source)
    if use.kind in ("add", "mul"):
        y_labels = fresh(len(y_shape))
        ops = [(g, g_lead + y_labels)]
        op_labels = _elementwise_labels(program.shape(node.ins[use.position]), y_shape,
                                        y_labels, fresh)
        if use.kind == "mul":
            data = node.ins[use.data]
            d_labels = _elementwise_labels(program.shape(data), y_shape, y_labels, fresh)
            ops.append((side.captured[data], ex + d_labels))
    elif use.kind == "dot":
        labels, y_labels = _dot_labels(program, node, fresh)
        ops = [(g, g_lead + y_labels),
               (side.captured[node.ins[use.data]], ex + labels[use.data])]
        op_labels = labels[use.position]
    else:  # conv
        patches, p_labels, op_labels, y_labels = _conv_factors(side, node, fresh)
        ops = [(g, g_lead + y_labels), (patches, ex + p_labels)]
    for ref, power in use.scales:
        value = jnp.asarray(side.captured[ref])  # a literal may be a Python scalar
        value = value.reshape(value.shape[: len(ex)])
        ops.append((value if power == 1 else 1 / value, list(ex)))
    param_labels = [op_labels[d] for d in use.param_dims]
    if identity is not None:  # g[o, y] = sign * delta(o, y): link y's labels to o's
        link = {y_labels[d]: side.out_labels[j] for j, d in enumerate(identity.dims)
                if d is not None}
        ops = [(a, [link.get(x, x) for x in labels]) for a, labels in ops[1:]]
        param_labels = [link.get(x, x) for x in param_labels]
        covered = {x: side.sizes[x] for x in side.lead}
        sign *= identity.sign
    return Factors(ops, param_labels, use.sign * sign, None if identity else source, covered)


def direct_factors(side: SideValues, param: int, fresh: Callable[[int], list[int]]) -> Factors:
    """The Jacobian of an unstructured parameter: its own cotangent."""
    ref = side.program.inputs[param]
    labels = fresh(len(side.program.shape(ref)))
    g, g_lead, covered = side.cotangent(ref)
    return Factors([(g, g_lead + labels)], labels, 1.0, ref, covered)


def contract(pairs: list[tuple[Factors, Factors]], out_labels: list[int],
             sizes: Mapping[int, int]) -> jax.Array | None:
    """``sum`` of :func:`term` over ``pairs`` (None if there are none).

    Pairs that read the same two cotangents (a dense layer's kernel and its bias) are
    contracted together when that needs fewer FLOPs: the rest of each pair first,
    summed, then one contraction with the two cotangents, whose Gram is formed once.
    """
    groups: dict[Any, list[tuple[Factors, Factors]]] = {}
    for k, (f1, f2) in enumerate(pairs):
        both = f1.source is not None and f2.source is not None
        groups.setdefault((f1.source, f2.source) if both else k, []).append((f1, f2))
    total = None
    for group in groups.values():
        value = _together(group, out_labels) if len(group) > 1 else None
        if value is None:
            for f1, f2 in group:
                t = term(f1, f2, out_labels, sizes)
                value = t if value is None else value + t
        total = value if total is None else total + value
    return total


def _together(group: list[tuple[Factors, Factors]], out_labels: list[int]
              ) -> jax.Array | None:
    """The pairs of ``group`` (same cotangents on each side) contracted together, or
    None if their labels do not line up or that is not cheaper."""
    if any(x not in out_labels for f1, f2 in group for x in [*f1.covered, *f2.covered]):
        return None  # a shared cotangent's example label is summed: term() counts it
    (g1, c1), (g2, c2) = group[0][0].operands[0], group[0][1].operands[0]
    reference, prepared = None, []
    for f1, f2 in group:
        rename = {**dict(zip(f1.operands[0][1], c1)), **dict(zip(f2.operands[0][1], c2))}
        find = _union([rename.get(x, x) for x in f1.param_labels],
                      [rename.get(x, x) for x in f2.param_labels])
        interface = [find(x) for x in c1 + c2 + out_labels]
        pattern = [interface.index(x) for x in interface]
        if reference is None:
            reference = (pattern, interface)
        elif pattern != reference[0]:
            return None
        to_first = dict(zip(interface, reference[1]))
        relabel = lambda x, r=rename, f=find, m=to_first: m.get(f(r.get(x, x)), f(r.get(x, x)))
        rest = [(a, [relabel(x) for x in labels])
                for a, labels in f1.operands[1:] + f2.operands[1:]]
        prepared.append((rest, f1.sign * f2.sign))
    interface = reference[1]
    keep = list(dict.fromkeys(interface))
    g_ops = [(g1, interface[: len(c1)]), (g2, interface[len(c1): len(c1) + len(c2)])]
    size = {x: n for a, labels in g_ops + [o for rest, _ in prepared for o in rest]
            for x, n in zip(labels, a.shape)}
    parts, separate, merged = [], 0.0, 0.0
    outs = interface[len(c1) + len(c2):]
    unique = list(dict.fromkeys(outs))
    if any(x not in size for x in unique):
        return None  # an output label that no operand carries: term() adds it
    for rest, sign in prepared:
        labels = [x for x in keep if any(x in ls for _, ls in rest)]
        carried = {x for _, ls in g_ops + rest for x in ls}
        separate += _flops(g_ops + rest, [x for x in unique if x in carried])
        merged += _flops(rest, labels) if rest else 0.0
        parts.append((rest, labels, sign))
    joined = [x for x in keep if any(x in labels for _, labels, _ in parts)]
    merged += _flops(g_ops + [(jax.ShapeDtypeStruct([size[x] for x in joined], g1.dtype),
                               joined)], unique)
    if merged >= separate:
        return None
    r = None
    for rest, labels, sign in parts:
        value = _einsum(rest, labels) if rest else jnp.ones((), g1.dtype)
        value = jnp.broadcast_to(value.reshape([size[x] if x in labels else 1 for x in joined]),
                                 [size[x] for x in joined])
        value = value if sign == 1.0 else sign * value
        r = value if r is None else r + value
    result = _einsum(g_ops + [(r, joined)], unique)
    return _embed_diagonals(result, unique, outs) if len(unique) < len(outs) else result


def _union(a: list[int], b: list[int]) -> Callable[[int], int]:
    """``find`` of the union-find that merges ``a[i]`` with ``b[i]``."""
    parent: dict[int, int] = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for x, y in zip(a, b):
        parent[find(y)] = find(x)
    return find


def _einsum(operands: list[tuple[Any, list[int]]], out: list[int]) -> jax.Array:
    args: list[Any] = []
    for array, labels in operands:
        args += [array, labels]
    if len(operands) == 2:
        return _pair(*operands[0], *operands[1], out)
    if len(operands) < 2:
        return jnp.einsum(*args, out, precision=jax.lax.Precision.HIGHEST)
    path = [p for p in jnp.einsum_path(*args, out, optimize="auto")[0] if not isinstance(p, str)]
    ops = [(a, list(labels)) for a, labels in operands]
    for step, chosen in enumerate(path):
        picked = [ops[i] for i in chosen]
        ops = [o for i, o in enumerate(ops) if i not in chosen]
        if step == len(path) - 1:
            keep = list(out)
        else:
            rest = {x for _, labels in ops for x in labels} | set(out)
            keep = list(dict.fromkeys(x for _, labels in picked for x in labels if x in rest))
        a: list[Any] = []
        for array, labels in picked:
            a += [array, labels]
        value = (_pair(*picked[0], *picked[1], keep) if len(picked) == 2
                 else jnp.einsum(*a, keep, precision=jax.lax.Precision.HIGHEST))
        if step < len(path) - 1:
            value = jax.lax.optimization_barrier(value)
        ops.append((value, keep))
    return ops[0][0]


def _pair(a: jax.Array, la: list[int], b: jax.Array, lb: list[int], out: list[int]
          ) -> jax.Array:
    """``einsum(a, la, b, lb, out)``; where both operands are already laid out as
    ``[batch, free, contracted]`` (up to axes of size 1), as one matrix product of their
    3-d views: the labels contracted together merged into one axis. (Given several
    contracting axes, XLA's CPU compiler lays the operands out again, with copies that
    took longer than the product itself for a dense layer's cotangent Gram.) Other
    layouts, integer or bool operands, repeated labels within an operand, or output
    labels that neither operand carries are left to ``jnp.einsum``."""
    inexact = all(jnp.issubdtype(v.dtype, jnp.inexact) for v in (a, b))
    if (not inexact or len(set(la)) < len(la) or len(set(lb)) < len(lb)
            or not set(out) <= {*la, *lb}):
        return jnp.einsum(a, la, b, lb, out, precision=jax.lax.Precision.HIGHEST)
    dtype = jnp.result_type(a, b)
    a, b = a.astype(dtype), b.astype(dtype)
    # labels of one operand only that the output drops: summed first
    a, la = _sum_out(a, la, {*lb, *out})
    b, lb = _sum_out(b, lb, {*la, *out})
    batch = [x for x in la if x in lb and x in out]
    summed = [x for x in la if x in lb and x not in out]
    free_a = [x for x in la if x not in lb]
    free_b = [x for x in lb if x not in la]
    size = {**dict(zip(la, a.shape)), **dict(zip(lb, b.shape))}
    count = lambda labels: math.prod(size[x] for x in labels)
    orders = [[labels.index(x) for x in batch + free + summed]
              for labels, free in ((la, free_a), (lb, free_b))]
    if not all(_moves_nothing(order, v.shape) for order, v in zip(orders, (a, b))):
        # an operand laid out again either way: XLA's choice of how
        return jnp.einsum(a, la, b, lb, out, precision=jax.lax.Precision.HIGHEST)

    def matrix(v, order, free):
        return jnp.transpose(v, order).reshape(count(batch), count(free), count(summed))

    product = jax.lax.dot_general(matrix(a, orders[0], free_a), matrix(b, orders[1], free_b),
                                  (((2,), (2,)), ((0,), (0,))),
                                  precision=jax.lax.Precision.HIGHEST)
    labels = batch + free_a + free_b
    product = product.reshape([size[x] for x in labels])
    return jnp.transpose(product, [labels.index(x) for x in out])


def _moves_nothing(order: list[int], shape) -> bool:
    """Whether ``transpose(v, order)`` keeps ``v``'s elements in place (it moves only
    axes of size 1)."""
    kept = [i for i in order if shape[i] != 1]
    return kept == sorted(kept)


def _sum_out(v: jax.Array, labels: list[int], keep: set) -> tuple[jax.Array, list[int]]:
    """``v`` summed over its labels not in ``keep``."""
    drop = tuple(i for i, x in enumerate(labels) if x not in keep)
    if not drop:
        return v, labels
    return jnp.sum(v, axis=drop), [x for x in labels if x in keep]


def _flops(operands: list[tuple[Any, list[int]]], out: list[int]) -> float:
    """The FLOPs of contracting ``operands`` into ``out`` as ``jnp.einsum`` does: labels
    of one operand only are summed first, then the path that opt_einsum picks."""
    counts: dict[int, int] = {}
    for _, labels in operands:
        for x in set(labels):
            counts[x] = counts.get(x, 0) + 1
    flops, args = 0.0, []
    for array, labels in operands:
        kept = [(x, n) for x, n in zip(labels, array.shape) if counts[x] > 1 or x in out]
        if len(kept) < len(labels):
            flops += math.prod(array.shape)
        args += [jax.ShapeDtypeStruct([n for _, n in kept], array.dtype), [x for x, _ in kept]]
    if len(operands) == 1:
        return flops
    return flops + float(jnp.einsum_path(*args, out, optimize="auto")[1].opt_cost)


def term(f1: Factors, f2: Factors, out_labels: list[int], sizes: Mapping[int, int]
         ) -> jax.Array:
    """``sum_W J1[..., W] J2[..., W]`` laid out as ``out_labels`` (sizes of output
    labels in ``sizes``)."""
    find = _union(f1.param_labels, f2.param_labels)
    operands = [(a, [find(x) for x in labels]) for a, labels in f1.operands + f2.operands]
    out = [find(x) for x in out_labels]
    # dimensions that only an identity left out carried: summed (a multiplicity), or
    # kept in the output (ones)
    present = {x for _, labels in operands for x in labels}
    size = {find(x): n for x, n in {**f1.covered, **f2.covered, **sizes}.items()}
    missing = [x for x in dict.fromkeys(out) if x not in present]
    multiplicity = 1
    for x in {find(x) for x in [*f1.covered, *f2.covered]} - present - set(out):
        multiplicity *= size[x]
    dtype = jnp.result_type(*[a for a, _ in operands]) if operands else jnp.float32
    if missing:
        operands.append((jnp.ones([size[x] for x in missing], dtype), missing))
    unique = list(dict.fromkeys(out))
    # no operands: an identity's term with every output axis traced, a constant
    result = _einsum(operands, unique) if operands else jnp.ones((), dtype)
    if len(unique) < len(out):
        result = _embed_diagonals(result, unique, out)
    sign = f1.sign * f2.sign * multiplicity
    return result if sign == 1.0 else sign * result


def _embed_diagonals(result: jax.Array, unique: list[int], out: list[int]) -> jax.Array:
    """``result`` (labels ``unique``) laid out as ``out``, where a label repeated in
    ``out`` means a diagonal: zero wherever the repeated indices differ."""
    size = dict(zip(unique, result.shape))
    expanded = [size[x] if out.index(x) == axis else 1 for axis, x in enumerate(out)]
    full = jnp.broadcast_to(result.reshape(expanded), [size[x] for x in out])
    for axis, label in enumerate(out):
        first = out.index(label)
        if first != axis:
            mask = [1] * len(out)
            mask[first] = mask[axis] = size[label]
            full = full * jnp.eye(size[label], dtype=result.dtype).reshape(mask)
    return full


def _elementwise_labels(shape, y_shape, y_labels, fresh) -> list[int]:
    """Labels of an operand of an elementwise primitive (rank 0, or size-1 broadcasting)."""
    if not shape:
        return []
    return [y_labels[d] if shape[d] == y_shape[d] else fresh(1)[0] for d in range(len(shape))]


def _dot_labels(program: Program, node, fresh) -> tuple[list[list[int]], list[int]]:
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    shapes = [program.shape(r) for r in node.ins]
    labels: list[list[int | None]] = [[None] * len(s) for s in shapes]
    y_labels = []
    for i, j in zip(lb, rb):
        (label,) = fresh(1)
        labels[0][i] = labels[1][j] = label
        y_labels.append(label)
    for i, j in zip(lc, rc):
        (label,) = fresh(1)
        labels[0][i] = labels[1][j] = label
    for side in (0, 1):
        for d in range(len(shapes[side])):
            if labels[side][d] is None:
                (label,) = fresh(1)
                labels[side][d] = label
                y_labels.append(label)
    return labels, y_labels


def _conv_factors(side: SideValues, node, fresh):
    """Patches of the input, with labels, and labels of the kernel and the output."""
    program, params = side.program, node.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    nd = len(lhs_spec) - 2
    rhs_shape = program.shape(node.ins[1])
    kernel = [rhs_shape[rhs_spec[2 + j]] for j in range(nd)]
    n, o, i = fresh(3)
    s, k = fresh(nd), fresh(nd)
    y_labels = [0] * (nd + 2)
    y_labels[out_spec[0]], y_labels[out_spec[1]] = n, o
    op_labels = [0] * (nd + 2)
    op_labels[rhs_spec[0]], op_labels[rhs_spec[1]] = o, i
    for j in range(nd):
        y_labels[out_spec[2 + j]] = s[j]
        op_labels[rhs_spec[2 + j]] = k[j]
    out_shape = program.shape(node.outs[0])
    out_spatial = [out_shape[out_spec[2 + j]] for j in range(nd)]
    patches = functools.partial(_patches, spec=lhs_spec, kernel=kernel,
                                out_spatial=out_spatial, params=params)
    lhs = side.captured[node.ins[0]]
    p = patches(lhs) if side.example is None else jax.vmap(patches)(lhs)
    return p, [n, i, *k, *s], op_labels, y_labels


def _patches(lhs: jax.Array, spec, kernel, out_spatial, params) -> jax.Array:
    """The windows of ``lhs`` that a convolution reads, ``(N, C, K..., S...)``: its input
    dilated and padded, then one strided slice per kernel offset (data movement only)."""
    x = jnp.transpose(lhs, spec)  # (N, C, spatial...)
    pads = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in
                                     zip(params["padding"], params["lhs_dilation"])]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
    strides, dilation = params["window_strides"], params["rhs_dilation"]
    windows = []
    for offset in itertools.product(*[range(k) for k in kernel]):
        start = [0, 0] + [o * d for o, d in zip(offset, dilation)]
        limit = list(x.shape[:2]) + [b + (n - 1) * st + 1 for b, n, st in
                                     zip(start[2:], out_spatial, strides)]
        windows.append(jax.lax.slice(x, start, limit, [1, 1, *strides]))
    p = jnp.stack(windows, axis=2)
    return p.reshape(p.shape[:2] + tuple(kernel) + p.shape[3:])
