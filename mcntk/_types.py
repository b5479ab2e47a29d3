"""Shared types: the NTK implementation enum, result namedtuples and the `get` rule."""

from __future__ import annotations

import collections
import enum
import functools
from typing import Any, NamedTuple, Protocol

PyTree = Any
Shape = Any  # a tuple of ints, or a pytree of such tuples for pytree inputs

KERNEL_NAMES = ("nngp", "ntk")


class InitFn(Protocol):
    """``init_fn(key, input_shape) -> (output_shape, params)`` (stax convention)."""

    def __call__(self, key: Any, input_shape: Shape) -> tuple[Shape, PyTree]: ...


class ApplyFn(Protocol):
    """``apply_fn(params, x, **kwargs) -> output pytree`` (stax convention)."""

    def __call__(self, params: PyTree, x: PyTree, **kwargs: Any) -> PyTree: ...


class NtkImplementation(enum.IntEnum):
    """How the empirical NTK ``J(x1) J(x2)^T`` of one sample is computed.

    Attributes:
      AUTO: pick, per input shape, whichever of the implementations below the
        compiler's cost model rates cheapest (FLOPs and memory traffic, see
        :mod:`mcntk.ntk.auto`). The choice is cached.
      JACOBIAN_CONTRACTION: build both Jacobians with reverse mode and contract
        them. Fast for small outputs; memory grows with outputs x parameters.
      NTK_VECTOR_PRODUCTS: never build a Jacobian; compute ``J(x1) (J(x2)^T v)``
        for every basis vector ``v`` of the x2 outputs with JVPs of VJPs.
      STRUCTURED_DERIVATIVES: exploit the structure of each layer's derivative:
        the NTK term of a dense layer's weights is the product of the Gram of its
        inputs and the Gram of the cotangents at its outputs, and likewise for
        convolutions, biases and scales; no Jacobian is formed. Parameters used in
        other ways fall back to their own Jacobian (:mod:`mcntk.ntk.structured_derivatives`).
    """

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3


class EmpiricalKernel(NamedTuple):
    """Both kernels, returned when ``get=None``."""

    nngp: PyTree
    ntk: PyTree


class Estimate(NamedTuple):
    """A Monte Carlo kernel with its accuracy, returned in place of each kernel array
    by ``monte_carlo_kernel_fn(..., stderr=True)`` (docs/long_runs.md).

    Attributes:
      mean: the estimate, exactly the array a call without ``stderr`` returns.
      stderr: the standard error of ``mean`` per entry, ``sqrt(s^2 / n)`` with ``s^2``
        the unbiased sample variance of the one-sample kernels (NaN when ``n < 2``).
      n_samples: ``n``, the number of samples averaged; below the requested count
        when ``rtol`` stopped the run early.
    """

    mean: Any
    stderr: Any
    n_samples: int


@functools.cache
def result_type(typename: str, fields: tuple[str, ...]) -> type:
    """The namedtuple class that holds the kernels ``fields`` (cached, so types compare equal)."""
    if typename == "EmpiricalKernel" and fields == EmpiricalKernel._fields:
        return EmpiricalKernel
    return collections.namedtuple(typename, fields)


def canonicalize_get(get: Any) -> tuple[tuple[str, ...], bool]:
    """Validates ``get``; returns the lower-cased names and whether one array is wanted.

    ``None`` means both kernels; a string means one kernel returned as an array; a
    tuple or list means a namedtuple with the fields in the given order.
    """
    valid = ", ".join(repr(n) for n in KERNEL_NAMES)
    if get is None:
        return KERNEL_NAMES, False
    if isinstance(get, str):
        names, single = (get,), True
    elif isinstance(get, (tuple, list)):
        names, single = tuple(get), False
    else:
        raise TypeError(
            f"`get` must be None, a kernel name or a tuple of kernel names ({valid}), "
            f"got {get!r} of type {type(get).__name__}."
        )
    if not names:
        raise ValueError(f"`get` must name at least one kernel ({valid}), got {get!r}.")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"`get` entries must be strings ({valid}), got {n!r} in {get!r}.")
    lowered = tuple(n.lower() for n in names)
    unknown = [n for n, low in zip(names, lowered) if low not in KERNEL_NAMES]
    if unknown:
        raise ValueError(f"`get` has unknown kernel name(s) {unknown}; valid names are {valid}.")
    if len(set(lowered)) != len(lowered):
        raise ValueError(f"`get` names a kernel twice: {get!r}; valid names are {valid}.")
    return lowered, single


def pack_result(values: dict[str, Any], names: tuple[str, ...], single: bool, typename: str,
                treedef: Any, asked_none: bool = False) -> Any:
    """Packs computed kernels the way ``get`` asked for them.

    ``values[name]`` has the structure ``treedef`` of the model's output (one kernel
    per output leaf). A single name gives that pytree of kernels; a tuple of names
    (or None) gives, as neural-tangents does, the output's structure holding one
    namedtuple per output leaf: ``result[0].ntk`` for a tuple output. For an array
    output, that is just the namedtuple.
    """
    if single:
        return values[names[0]]
    cls = EmpiricalKernel if asked_none else result_type(typename, names)
    per_name = [treedef.flatten_up_to(values[n]) for n in names]
    return treedef.unflatten([cls(*leaves) for leaves in zip(*per_name)])


def unpack_implementation(implementation: Any) -> NtkImplementation:
    """Validates ``implementation`` (an ``NtkImplementation`` or its int value)."""
    if isinstance(implementation, bool) or not isinstance(implementation, int):
        raise TypeError(
            "`implementation` must be an mcntk.NtkImplementation or an int in "
            f"{[int(i) for i in NtkImplementation]}, got {implementation!r}."
        )
    try:
        return NtkImplementation(int(implementation))
    except ValueError:
        choices = ", ".join(f"{i.name}={int(i)}" for i in NtkImplementation)
        raise ValueError(
            f"`implementation` must be one of {choices}; got {implementation!r}."
        ) from None

