"""Where each parameter enters a :class:`~mcntk.ntk._program.Program`, and how.

A parameter ``W`` usually reaches the computation through a short *chain* of
operations that only rearrange it: dtype conversions, reshapes, transposes,
broadcasts, reversals, negation and multiplication or division by a scalar. The
chain ends in a *use*: a primitive that is linear in the chain value, with the
other operand as data:

* ``dot_general`` (either operand), ``conv_general_dilated`` (the kernel);
* ``add``/``sub`` (a bias), ``mul`` (a scale, e.g. LayerNorm's).

The Jacobian of the network with respect to such a use factorises into the
cotangent of the use's result times its data operand; the NTK term of ``W`` is the
contraction of those factors for x1 and x2 (see :mod:`mcntk.ntk._contract`). A
chain is followed symbolically: an integer array holding, for every element of the
chain value, which entry of ``W`` it is. Dimensions along which that array is
constant are broadcast dimensions (summed on each side separately); the others must
hold every entry at most once.

Uses that carry no derivative (``stop_gradient``, comparisons, integer casts) are
ignored. A parameter with any other use, read as an output, or with uses whose
chains lay ``W`` out differently, is *unstructured*: its Jacobian is computed
directly (Jacobian contraction for that parameter only).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from mcntk.ntk._program import Program, Ref

MAX_USES = 8
"""More uses of one parameter than this (e.g. an unrolled loop): unstructured, since
the structured term costs one contraction per pair of uses."""

# primitives whose results carry no derivative
_ZERO_DERIVATIVE = {"stop_gradient", "sign", "floor", "ceil", "round", "eq", "ne", "lt", "le",
                    "gt", "ge", "is_finite"}
_IDENTITY = {"copy", "copy_p", "sharding_constraint"}
_ADD = {"add", "add_any", "sub"}


class Use(NamedTuple):
    """One structured use of a parameter.

    Attributes:
      kind: ``'dot'``, ``'conv'``, ``'add'`` or ``'mul'``.
      node: index of the node in the program.
      position: operand position of the chain value.
      sign: ``-1.0`` when the chain or the use negates the parameter.
      scales: ``(id, power)`` of scalar factors applied along the chain.
      param_dims: the operand's dimensions that index entries of the parameter
        (neither broadcast nor of size 1), in order.
      layout: which entry of the parameter each element of the operand restricted to
        ``param_dims`` holds; uses with equal layouts can be paired.
    """

    kind: str
    node: int
    position: int
    sign: float
    scales: tuple[tuple[Ref, int], ...]
    param_dims: tuple[int, ...]
    layout: np.ndarray

    @property
    def data(self) -> int | None:
        """Operand position of the data operand, if the factorisation needs it."""
        return None if self.kind == "add" else 1 - self.position


class Structure(NamedTuple):
    """The uses of every parameter of a program.

    Attributes:
      uses: per parameter, its structured uses (empty: unused, or unstructured).
      unstructured: indices of the parameters whose Jacobian is needed directly.
    """

    uses: list[list[Use]]
    unstructured: frozenset[int]

    def capture_refs(self, program: Program) -> list[Ref]:
        """The ids of data operands and scale factors the NTK needs."""
        refs = set()
        for uses in self.uses:
            for u in uses:
                if u.data is not None:
                    refs.add(program.nodes[u.node].ins[u.data])
                refs |= {r for r, _ in u.scales}
        return sorted(refs)


def pair(first: Structure, second: Structure) -> tuple[Structure, Structure]:
    """Both structures with the parameter dimensions of every use of a parameter put
    in one order (e.g. for uses of ``W`` and ``W.T``), so that any use on one side can
    be paired with any use on the other; parameters whose uses lay them out in
    incompatible ways become unstructured on both."""
    bad = set(first.unstructured) | set(second.unstructured)
    aligned: tuple[list, list] = ([], [])
    for p, (a, b) in enumerate(zip(first.uses, second.uses)):
        reference = (a + b)[0].layout if a + b else None
        out = ([_align(u, reference) for u in a], [_align(u, reference) for u in b])
        if any(u is None for u in out[0] + out[1]):
            bad.add(p)
        for k in (0, 1):
            aligned[k].append([] if p in bad else out[k])
    bad_set = frozenset(bad)
    return Structure(aligned[0], bad_set), Structure(aligned[1], bad_set)


def _align(use: Use, reference: np.ndarray) -> Use | None:
    """``use`` with its parameter dimensions permuted to lay the parameter out as
    ``reference`` does, or None if no permutation does."""
    layout = use.layout
    if layout.shape == reference.shape and np.array_equal(layout, reference):
        return use
    if layout.ndim > 4 or sorted(layout.shape) != sorted(reference.shape):
        return None
    for perm in itertools.permutations(range(layout.ndim)):
        if np.array_equal(np.transpose(layout, perm), reference):
            return use._replace(param_dims=tuple(use.param_dims[i] for i in perm),
                                layout=reference)
    return None


class _Chain(NamedTuple):
    index: np.ndarray
    sign: float
    scales: tuple[tuple[Ref, int], ...]


def analyse(program: Program, n_params: int) -> Structure:
    """The uses of the first ``n_params`` inputs of ``program``."""
    consumers = program.consumers()
    outputs = set(program.outputs)
    uses: list[list[Use]] = []
    unstructured = set()
    for p in range(n_params):
        ref = program.inputs[p]
        shape = program.shape(ref)
        start = _Chain(np.arange(math.prod(shape), dtype=np.int64).reshape(shape), 1.0, ())
        found: list[Use] = []
        ok = _follow(program, consumers, outputs, ref, start, found)
        if not ok or len(found) > MAX_USES:
            unstructured.add(p)
            found = []
        uses.append(found)
    return Structure(uses, frozenset(unstructured))


def _follow(program, consumers, outputs, ref, chain, found) -> bool:
    """Adds the uses reached from ``ref`` to ``found``; False if one is unsupported."""
    stack = [(ref, chain)]
    while stack:
        ref, chain = stack.pop()
        if ref in outputs:
            return False
        for i, pos in consumers.get(ref, ()):
            node = program.nodes[i]
            step = _step(program, node, pos, chain)
            if step is None:
                continue
            if step is False:
                return False
            if isinstance(step, _Chain):
                if node.outs[0] is not None:
                    stack.append((node.outs[0], step))
                continue
            use = _use(program, node, i, pos, chain, *step)
            if use is None:
                return False
            found.append(use)
    return True


def _float_outputs(program, node) -> bool:
    return any(r is not None and jnp.issubdtype(program.avals[r].dtype, jnp.inexact)
               for r in node.outs)


def _step(program: Program, node, pos: int, chain: _Chain) -> Any:
    """What ``node`` does with the chain value at operand ``pos``: a new
    :class:`_Chain`, ``(kind, sign)`` for a use, None for no derivative, False for an
    unsupported use."""
    name, params = node.name, node.params
    if name in _ZERO_DERIVATIVE or not _float_outputs(program, node):
        return None
    index = chain.index
    out_shape = program.shape(node.outs[0]) if node.outs[0] is not None else None
    if name in _IDENTITY or name == "convert_element_type":
        return chain
    if name == "reshape" and params.get("dimensions") is None:
        return chain._replace(index=index.reshape(params["new_sizes"]))
    if name == "squeeze":
        return chain._replace(index=np.squeeze(index, tuple(params["dimensions"])))
    if name == "transpose":
        return chain._replace(index=np.transpose(index, params["permutation"]))
    if name == "rev":
        return chain._replace(index=np.flip(index, tuple(params["dimensions"])))
    if name == "broadcast_in_dim":
        expanded = [1] * len(params["shape"])
        for k, d in enumerate(params["broadcast_dimensions"]):
            expanded[d] = index.shape[k]
        return chain._replace(index=np.broadcast_to(index.reshape(expanded), params["shape"]))
    if name == "neg":
        return chain._replace(sign=-chain.sign)
    if name in ("mul", "div") and len(node.ins) == 2:
        other = node.ins[1 - pos]
        scalar = math.prod(program.shape(other)) == 1 and out_shape == index.shape
        if scalar and (name == "mul" or pos == 0):
            power = 1 if name == "mul" else -1
            return chain._replace(scales=chain.scales + ((other, power),))
        return ("mul", 1.0) if name == "mul" else False
    if name in _ADD:
        return ("add", -1.0 if name == "sub" and pos == 1 else 1.0)
    if name == "dot_general":
        return ("dot", 1.0)
    if (name == "conv_general_dilated" and pos == 1 and params["feature_group_count"] == 1
            and params["batch_group_count"] == 1):
        return ("conv", 1.0)
    return False


def _use(program, node, i, pos, chain, kind, sign) -> Use | None:
    """The :class:`Use` of the chain value at operand ``pos`` of ``node``, or None if
    the chain does not lay out the parameter injectively."""
    index = chain.index
    if kind in ("add", "mul") and index.ndim not in (0, len(program.shape(node.outs[0]))):
        return None
    param_dims = []
    reduced = index
    for d in reversed(range(index.ndim)):
        if index.shape[d] == 1:
            reduced = np.take(reduced, 0, axis=d)
        elif _constant_along(reduced, d):
            reduced = np.take(reduced, 0, axis=d)
        else:
            param_dims.append(d)
    reduced = np.ascontiguousarray(reduced)
    if reduced.size and np.bincount(reduced.ravel()).max() > 1:
        return None
    return Use(kind, i, pos, chain.sign * sign, chain.scales, tuple(reversed(param_dims)),
               reduced)


def _constant_along(index: np.ndarray, axis: int) -> bool:
    if index.strides[axis] == 0:
        return True
    first = np.take(index, [0], axis=axis)
    return bool(np.all(index == first))
