"""Flax linen: a ``flax.linen.Module`` as ``Model(init, apply)``.

* ``params`` is the variables dict ``module.init`` returns: ``{'params': ...}`` plus
  any other collection (``batch_stats``, ...). ``apply`` wraps every collection but
  ``params`` in ``jax.lax.stop_gradient``: those are initialised and held fixed.
* ``apply(params, x, rng=key, **kwargs)`` calls ``module.apply`` with
  ``rngs={'dropout': key}``; with several ``rng_streams`` each gets a key from
  ``jax.random.split(key, n)``, in order. ``rng=None`` passes no rngs, so a module
  that needs a stream raises Flax's error. Other keyword arguments (``train=``,
  ``deterministic=``) reach the module's method; ``init(key, input_shape, **kwargs)``
  passes them to ``module.init`` as well, merged with ``init_kwargs``.
* A module that writes to a collection during ``apply`` (BatchNorm with
  ``use_running_average=False``) raises :class:`StateMutationError` unless
  ``mutable=`` names the collections; then the updates are discarded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

from mcntk.errors import StateMutationError

from ._base import (
    Model,
    check_input_dtype,
    check_kwargs,
    check_rng_streams,
    describe,
    hold_fixed,
    import_framework,
    loaded_module,
    make_init,
    missing_rng,
    shapes,
    stream_keys,
)

PARAMS = "params"


def check_mutable(mutable: Any) -> bool | tuple[str, ...]:
    """``False``, ``True``, a collection name or a sequence of names."""
    if isinstance(mutable, bool):
        return mutable
    if isinstance(mutable, str):
        return (mutable,)
    if isinstance(mutable, (list, tuple)) and all(isinstance(c, str) for c in mutable):
        return tuple(mutable) or False
    raise TypeError(f"`mutable` must be False, True, a collection name or a list of names "
                    f"such as ['batch_stats'], got {mutable!r}.")


def _rng_error(error: Exception, rng: Any, streams: tuple[str, ...]) -> Exception:
    """The error for a module that asked for a key of a stream ``apply`` did not give."""
    found = re.search(r'needs PRNG for "([^"]+)"', str(error))
    stream = found.group(1) if found else None
    if stream is not None and stream not in streams:
        return missing_rng(
            "Flax linen", error,
            f"draws from the rng stream {stream!r}, which is not in `rng_streams`="
            f"{streams!r}, so `rng` does not reach it: pass "
            f"as_model(module, rng_streams={(*streams, stream)!r})")
    return missing_rng("Flax linen", error) if rng is None else error


class LinenAdapter:
    """Adapter for ``flax.linen.Module`` instances."""

    description = "flax.linen.Module instances"

    def matches(self, obj: Any) -> bool:
        """A ``flax.linen.Module`` instance (checked only if flax.linen is imported)."""
        nn = loaded_module("flax.linen")
        return nn is not None and isinstance(obj, nn.Module)

    def to_model(
        self,
        module: Any,
        *,
        input_dtype: Any = None,
        rng_streams: Any = ("dropout",),
        init_kwargs: dict[str, Any] | None = None,
        method: Any = None,
        mutable: Any = False,
    ) -> Model:
        """Returns ``Model(init, apply)`` for a linen module.

        Args:
          module: an unbound ``flax.linen.Module``.
          input_dtype: dtype of the example input built by ``init`` (e.g.
            ``jnp.int32`` for token ids); wins over the dtype of the input specs
            ``init`` gets (from the estimator: x1's dtype). ``None``: the specs'
            dtype, or JAX's default float for plain shapes.
          rng_streams: names of the random streams that ``apply``'s ``rng`` feeds.
          init_kwargs: keyword arguments of the module call during ``init``, e.g.
            ``{'train': True}``; merged over those ``init`` is called with (from
            the estimator: the kernel call's keyword arguments for x1).
          method: the module method to call instead of ``__call__``.
          mutable: collections that ``apply`` may write (the writes are discarded):
            a name, a list of names or ``True``. See :class:`StateMutationError`.

        Returns:
          A :class:`Model` whose ``init`` returns the full variables dict.

        Example:
          >>> import jax, flax.linen as nn
          >>> from mcntk.adapters import as_model
          >>> model = as_model(nn.Dense(3))
          >>> output_shape, params = model.init(jax.random.PRNGKey(0), (5, 2))
          >>> output_shape, jax.tree.map(lambda p: p.shape, params)
          ((5, 3), {'params': {'bias': (3,), 'kernel': (2, 3)}})
        """
        nn = import_framework("flax.linen", extra="flax", purpose="The Flax linen adapter")
        flax_errors = import_framework("flax.errors", extra="flax",
                                       purpose="The Flax linen adapter")
        if not isinstance(module, nn.Module):
            raise TypeError(f"the linen adapter needs a flax.linen.Module, got {describe(module)}.")
        dtype = check_input_dtype(input_dtype)
        streams = check_rng_streams(rng_streams)
        if PARAMS in streams:
            raise ValueError(f"`rng_streams` must not contain 'params' (init draws parameters "
                             f"from its own key), got {streams!r}.")
        init_kw = check_kwargs("init_kwargs", init_kwargs)
        mutable = check_mutable(mutable)

        def build(key, x, kwargs):
            rngs = {PARAMS: key, **stream_keys(jax.random.fold_in(key, 1), streams)}
            out, variables = module.init_with_output(rngs, x, method=method, **kwargs)
            return shapes(out), variables

        def apply(params, x, rng=None, **kwargs):
            if not isinstance(params, Mapping):
                raise TypeError(f"`params` of a linen model must be the variables dict that "
                                f"init returns, e.g. {{'params': ...}}, got {describe(params)}.")
            variables = {c: v if c == PARAMS else hold_fixed(v) for c, v in params.items()}
            rngs = None if rng is None else stream_keys(rng, streams)
            try:
                out = module.apply(variables, x, rngs=rngs, method=method, mutable=mutable,
                                   **kwargs)
            except flax_errors.ModifyScopeVariableError as e:
                raise StateMutationError(
                    f"this linen module writes to a collection during apply ({e}). mcntk "
                    f"holds collections other than 'params' fixed, so the update would be "
                    f"discarded; and batch statistics (BatchNorm in training mode) couple the "
                    f"examples of a batch, so the kernel is not per-example and `vmap_axes` "
                    f"must be None. To accept that, pass mutable=['<collection>'] (or "
                    f"mutable=True) to as_model; otherwise call the module in inference mode "
                    f"(e.g. train=False or use_running_average=True).") from e
            except flax_errors.InvalidRngError as e:
                explained = _rng_error(e, rng, streams)
                if explained is e:
                    raise
                raise explained from e
            return out[0] if mutable else out

        return Model(make_init(build, dtype=dtype, init_kwargs=init_kw), apply)
