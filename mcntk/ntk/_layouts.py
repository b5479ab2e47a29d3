"""Evaluation rules that give XLA faster memory layouts; same values, same derivatives.

The VJPs of structured derivatives run once per output entry, so they are most of
the work. For a convolution, autodiff's input cotangent is a convolution with the
kernel's feature dimensions swapped by reinterpretation (``(..., out, in)``), and
XLA's CPU backend runs that layout 2-3x slower inside loops, where the sampler runs
every sample. :func:`conv` evaluates a convolution as usual but gives it a JVP whose
input tangent goes through a kernel swapped in memory, so the transposed
convolution reads a kernel laid out ``(..., in, out)`` again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jcore

_CONV = jcore.primitives.conv_general_dilated_p


def _swapped(lhs, rhs, params):
    """``conv(lhs, rhs)`` computed from a copy of ``rhs`` with its feature dimensions
    swapped (and the dimension numbers saying so)."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    o, i = rhs_spec[0], rhs_spec[1]
    perm = list(range(rhs.ndim))
    perm[o], perm[i] = i, o
    numbers = type(params["dimension_numbers"])(lhs_spec, (i, o, *rhs_spec[2:]), out_spec)
    return _CONV.bind(lhs, jnp.transpose(rhs, perm), **{**params, "dimension_numbers": numbers})


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv(lhs, rhs, params):
    return _CONV.bind(lhs, rhs, **dict(params))


def _conv_jvp(params, primals, tangents):
    lhs, rhs = primals
    d_lhs, d_rhs = tangents
    params_dict = dict(params)
    out = _conv(lhs, rhs, params)
    terms = []
    if not isinstance(d_lhs, SymbolicZero):
        terms.append(_swapped(d_lhs, rhs, params_dict))
    if not isinstance(d_rhs, SymbolicZero):
        terms.append(_CONV.bind(lhs, d_rhs, **params_dict))
    return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def conv(lhs, rhs, **params):
    """``conv_general_dilated`` (the primitive's parameters) with the JVP above."""
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return _CONV.bind(lhs, rhs, **params)
    return _conv(lhs, rhs, tuple(sorted(params.items())))


RULES = {"conv_general_dilated": conv}
"""Rules for :meth:`mcntk.ntk._program.Program.evaluate`."""
