"""Where the cotangent of a use's result is read, and when it is known in advance.

Two shortcuts save work:

* A result whose only reader adds it to a value of its own shape (a ``dot_general``
  followed by a bias) has the cotangent of the sum, negated for a subtrahend: one
  probe serves both uses (:attr:`Routes.source`).
* A value that reaches an output leaf only through such additions, copies, and
  reshapes or transposes that move its dimensions (adding or dropping size-1 ones)
  has, for that leaf, a cotangent that is plus or minus the identity
  (:attr:`Routes.identity`). No VJP is needed for it, and the contraction links the
  value's dimensions to the output's directly, instead of summing over
  ``outputs x outputs`` products of one-hot vectors (the last layer of a network
  with untraced outputs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from mcntk.ntk._program import Program, Ref

_ADD = {"add": 1.0, "add_any": 1.0, "sub": -1.0}
_MOVES = {"copy", "copy_p", "squeeze", "reshape", "transpose", "broadcast_in_dim",
          "convert_element_type"}


class Identity(NamedTuple):
    """A cotangent that is ``sign`` times the identity for one output leaf.

    Attributes:
      sign: ``1.0`` or ``-1.0``.
      dims: for each dimension of the output leaf, the dimension of the value it is
        (None: a dimension of size 1 that the value does not have).
    """

    sign: float
    dims: tuple[int | None, ...]


class Routes:
    """Cotangent sources of the results ``refs`` of a program.

    Attributes:
      source: for each result, ``(id whose cotangent it has, sign)``.
      identity: ``{(source id, output leaf index): Identity}`` where known.
    """

    def __init__(self, program: Program, refs: Iterable[Ref]):
        consumers = program.consumers()
        outputs = set(program.outputs)
        self.source: dict[Ref, tuple[Ref, float]] = {}
        self.identity: dict[tuple[Ref, int], Identity] = {}
        for ref in refs:
            target, sign = _through_additions(program, consumers, outputs, ref)
            self.source[ref] = (target, sign)
            found = _to_output(program, consumers, outputs, target)
            if found is not None:
                out_ref, ident = found
                for leaf, r in enumerate(program.outputs):
                    if r == out_ref:
                        self.identity[(target, leaf)] = ident

    def probes(self, extra: Iterable[Ref] = ()) -> list[Ref]:
        """The ids to probe: every source, and ``extra``."""
        return sorted({t for t, _ in self.source.values()} | set(extra))


def _single_reader(program, consumers, ref):
    readers = consumers.get(ref, [])
    return (program.nodes[readers[0][0]], readers[0][1]) if len(readers) == 1 else (None, 0)


def _through_additions(program, consumers, outputs, ref) -> tuple[Ref, float]:
    sign = 1.0
    while ref not in outputs:
        node, pos = _single_reader(program, consumers, ref)
        if node is None or node.name not in _ADD or node.outs[0] is None:
            break
        out = node.outs[0]
        if (program.shape(out) != program.shape(ref)
                or program.avals[out].dtype != program.avals[ref].dtype):
            break
        sign *= _ADD[node.name] if pos == 1 else 1.0
        ref = out
    return ref, sign


def _to_output(program, consumers, outputs, ref) -> tuple[Ref, Identity] | None:
    """``(output id, Identity)`` if ``ref`` reaches an output as described above."""
    dims: list[int | None] = list(range(len(program.shape(ref))))
    sign = 1.0
    while ref not in outputs:
        node, pos = _single_reader(program, consumers, ref)
        if node is None or node.outs[0] is None:
            return None
        out = node.outs[0]
        in_shape, out_shape = program.shape(ref), program.shape(out)
        if program.avals[out].dtype != program.avals[ref].dtype:
            return None
        if node.name in _ADD:
            if out_shape != in_shape:
                return None
            sign *= _ADD[node.name] if pos == 1 else 1.0
        elif node.name == "transpose":
            dims = [dims[p] for p in node.params["permutation"]]
        elif node.name in _MOVES:
            moved = _moved_dims(node, in_shape, out_shape)
            if moved is None:
                return None
            dims = [None if m is None else dims[m] for m in moved]
        else:
            return None
        ref = out
    return ref, Identity(sign, tuple(dims))


def _moved_dims(node, in_shape, out_shape) -> list[int | None] | None:
    """For each output dimension, the input dimension it is, when the operation only
    adds or drops size-1 dimensions (None for an added one); None otherwise."""
    if node.name == "reshape" and node.params.get("dimensions") is not None:
        return None
    if node.name == "broadcast_in_dim" and any(
            out_shape[d] != in_shape[k] for k, d in enumerate(
                node.params["broadcast_dimensions"])):
        return None
    big_in = [d for d, s in enumerate(in_shape) if s != 1]
    big_out = [d for d, s in enumerate(out_shape) if s != 1]
    if [in_shape[d] for d in big_in] != [out_shape[d] for d in big_out]:
        return None
    moved: list[int | None] = [None] * len(out_shape)
    for i, o in zip(big_in, big_out):
        moved[o] = i
    return moved
