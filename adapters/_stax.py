"""stax: ``(init_fn, apply_fn)`` pairs and neural-tangents ``(init_fn, apply_fn, kernel_fn)``.

stax already follows the ``Model`` conventions (``jax.example_libraries.stax`` and
neural-tangents' ``stax`` apply functions take ``rng=`` through ``**kwargs``), so the
adapter only validates the tuple and drops ``kernel_fn``. Functions wrapped in
``jax.jit`` are used as they are.
"""

from __future__ import annotations

from typing import Any

from ._base import Model, describe


class StaxAdapter:
    """Adapter for stax ``(init_fn, apply_fn[, kernel_fn])`` tuples."""

    description = "stax (init_fn, apply_fn) pairs and (init_fn, apply_fn, kernel_fn) triples"

    def matches(self, obj: Any) -> bool:
        """A plain tuple of two or three callables."""
        return (isinstance(obj, tuple) and not isinstance(obj, Model) and len(obj) in (2, 3)
                and all(callable(f) for f in obj))

    def to_model(self, obj: Any) -> Model:
        """Returns ``Model(init_fn, apply_fn)``.

        Args:
          obj: ``(init_fn, apply_fn)`` or ``(init_fn, apply_fn, kernel_fn)``, where
            ``init_fn(key, input_shape) -> (output_shape, params)`` and
            ``apply_fn(params, x, **kwargs) -> output``.

        Returns:
          The pair, unchanged.

        Example:
          >>> import jax
          >>> from jax.example_libraries import stax
          >>> from mcntk.adapters import as_model
          >>> model = as_model(stax.serial(stax.Dense(8), stax.Relu, stax.Dense(1)))
          >>> model.init(jax.random.PRNGKey(0), (5, 3))[0]
          (5, 1)
        """
        if not self.matches(obj):
            raise TypeError(f"a stax model must be a tuple (init_fn, apply_fn) or "
                            f"(init_fn, apply_fn, kernel_fn) of callables, got {describe(obj)}.")
        return Model(obj[0], obj[1])
