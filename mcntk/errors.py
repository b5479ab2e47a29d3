"""Named exceptions. Each docstring is the help page for its error."""

from __future__ import annotations


class NotYetImplementedError(NotImplementedError):
    """The requested feature is planned but has not landed yet.

    ``NtkImplementation.STRUCTURED_DERIVATIVES`` raises this until the structured
    derivatives implementation lands. Use ``NtkImplementation.AUTO`` (the default),
    ``JACOBIAN_CONTRACTION`` or ``NTK_VECTOR_PRODUCTS`` meanwhile: they give the
    same kernels.
    """
