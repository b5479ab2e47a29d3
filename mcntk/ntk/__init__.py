"""NTK implementations. Each module computes the NTK of one parameter sample and
knows nothing of grids, devices or samples. Register a new one in ``IMPLEMENTATIONS``."""

from __future__ import annotations

from mcntk._types import NtkImplementation
from mcntk.errors import NotYetImplementedError
from mcntk.ntk import jacobian_contraction, structured_derivatives, vector_products
from mcntk.ntk._sides import DEFAULT_OPTIONS, Axes, NtkFn, Options, Side, nngp

IMPLEMENTATIONS: dict[NtkImplementation, NtkFn] = {
    NtkImplementation.JACOBIAN_CONTRACTION: jacobian_contraction.ntk,
    NtkImplementation.NTK_VECTOR_PRODUCTS: vector_products.ntk,
    NtkImplementation.STRUCTURED_DERIVATIVES: structured_derivatives.ntk,
}


def get(implementation: NtkImplementation) -> NtkFn:
    """The NTK function of a concrete (non-AUTO) implementation."""
    try:
        return IMPLEMENTATIONS[implementation]
    except KeyError:
        available = ", ".join(i.name for i in IMPLEMENTATIONS)
        raise NotYetImplementedError(
            f"`implementation`={implementation!r} is not available yet; use "
            f"NtkImplementation.AUTO or one of {available}, which compute the same kernel."
        ) from None


def check_available(implementation: NtkImplementation) -> None:
    """Raises early (at kernel-function construction) for an implementation not yet built."""
    if implementation != NtkImplementation.AUTO:
        get(implementation)


__all__ = ["DEFAULT_OPTIONS", "Axes", "IMPLEMENTATIONS", "NtkFn", "Options", "Side",
           "check_available", "get", "nngp"]
