"""Haiku: ``hk.Transformed`` and ``hk.TransformedWithState`` as ``Model(init, apply)``.

* ``hk.Transformed``: ``params`` is Haiku's params dict; ``apply(params, x, rng=key)``
  calls ``f.apply(params, key, x)`` (``f.apply(params, x)`` for
  ``hk.without_apply_rng`` transforms, which ignore ``rng``).
* ``hk.TransformedWithState``: ``params`` is ``{'params': ..., 'state': ...}``; the
  state is initialised with the parameters and held fixed (``jax.lax.stop_gradient``).
  If ``apply`` writes state (``hk.set_state``, BatchNorm with ``is_training=True``) it
  raises :class:`StateMutationError` unless ``mutable=True``, which discards the
  new state.

The transformed function is called as ``f(x, **kwargs)``, by ``init(key,
input_shape, **kwargs)`` too (merged with ``init_kwargs``). Whether ``apply`` takes an
rng is read from its signature (``rng`` after ``params`` / ``state``), so
``hk.Transformed(f.init, jax.jit(f.apply))`` works too.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from mcntk.errors import StateMutationError

from ._base import (
    Model,
    check_bool,
    check_input_dtype,
    check_kwargs,
    describe,
    dummy_key,
    hold_fixed,
    import_framework,
    loaded_module,
    make_init,
    missing_rng,
    output_shape,
    unchanged,
)

BATCHNORM_NOTE = (
    "right after init its moving averages hold the statistics of init's example input "
    "(zeros: identical examples), so the running variance is 0, each feature is divided "
    "by sqrt(eps) and kernels come out ~1/eps (~1e5) times too large, without an error. "
    "Either take the kernel in training mode (mutable=True, is_training=True, "
    "vmap_axes=None), or set the statistics after init in an init function of your own "
    "(e.g. every 'var_ema' state's 'average' to ones and every 'mean_ema' one to zeros, "
    "where Flax's BatchNorm starts); see docs/adapters.md.")
"""Why hk.BatchNorm in inference mode right after ``init`` gives wrong kernels."""


def missing_state_advice(error: Exception, kwargs: dict[str, Any]) -> str:
    """The message for Haiku's "No value for ..." error during ``init``."""
    return (f"Haiku found no initial value for a state variable during init ({error}). "
            f"hk.BatchNorm and hk.ExponentialMovingAverage create their state only in "
            f"training mode, and init called the function with keyword arguments "
            f"{summarize(kwargs)} (the kernel call's arguments for x1, merged with "
            f"`init_kwargs`). Pass init_kwargs={{'is_training': True}} (your function's "
            f"training flag) to as_model; but note that for hk.BatchNorm used in inference "
            f"mode {BATCHNORM_NOTE}")


def summarize(kwargs: dict[str, Any]) -> str:
    """``kwargs`` for a message: static values as they are, arrays as shape and dtype."""
    def show(v: Any) -> str:
        return f"<array {jnp.shape(v)} {jnp.result_type(v)}>" if hasattr(v, "shape") else repr(v)

    return "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in kwargs.items()) + "}"


def takes_rng(apply_fn: Any, position: int) -> bool:
    """Whether the parameter at ``position`` of Haiku's ``apply`` is its ``rng``."""
    try:
        names = list(inspect.signature(apply_fn).parameters)
    except (TypeError, ValueError):
        return True
    return len(names) > position and names[position] == "rng"


class HaikuAdapter:
    """Adapter for ``hk.Transformed`` and ``hk.TransformedWithState``."""

    description = "haiku.Transformed and haiku.TransformedWithState (hk.transform...)"

    def matches(self, obj: Any) -> bool:
        """Any Haiku transform (checked only if haiku is imported)."""
        hk = loaded_module("haiku")
        if hk is None:
            return False
        kinds = (hk.Transformed, hk.TransformedWithState, hk.MultiTransformed,
                 hk.MultiTransformedWithState)
        return isinstance(obj, kinds)

    def to_model(
        self,
        f: Any,
        *,
        input_dtype: Any = None,
        init_kwargs: dict[str, Any] | None = None,
        mutable: bool = False,
    ) -> Model:
        """Returns ``Model(init, apply)`` for a Haiku transform.

        Args:
          f: ``hk.transform(fn)``, ``hk.transform_with_state(fn)``, or either wrapped
            in ``hk.without_apply_rng``; ``fn(x, **kwargs)``.
          input_dtype: dtype of the example input built by ``init``; wins over the
            dtype of the input specs ``init`` gets (from the estimator: x1's dtype).
          init_kwargs: keyword arguments of ``fn`` during ``init``, e.g.
            ``{'is_training': True}`` (``hk.BatchNorm`` creates its state only then);
            merged over those ``init`` is called with (from the estimator: the kernel
            call's keyword arguments for x1).
          mutable: for ``TransformedWithState``, let ``apply`` write state and discard
            the new state. See :class:`StateMutationError`.

        Returns:
          A :class:`Model`.

        Example:
          >>> import jax, haiku as hk
          >>> from mcntk.adapters import as_model
          >>> model = as_model(hk.transform(lambda x: hk.nets.MLP([8, 2])(x)))
          >>> output_shape, params = model.init(jax.random.PRNGKey(0), (5, 3))
          >>> output_shape, sorted(params)
          ((5, 2), ['mlp/~/linear_0', 'mlp/~/linear_1'])
        """
        hk = import_framework("haiku", extra="haiku", purpose="The Haiku adapter")
        if isinstance(f, (hk.MultiTransformed, hk.MultiTransformedWithState)):
            raise TypeError("hk.multi_transform models have several apply functions; pick "
                            "one: as_model(hk.Transformed(f.init, f.apply.<name>)) (init must "
                            "then take (rng, x)).")
        if not isinstance(f, (hk.Transformed, hk.TransformedWithState)):
            raise TypeError(f"the Haiku adapter needs hk.Transformed or hk.TransformedWithState, "
                            f"got {describe(f)}.")
        dtype = check_input_dtype(input_dtype)
        init_kw = check_kwargs("init_kwargs", init_kwargs)
        mutable = check_bool("mutable", mutable)
        with_state = isinstance(f, hk.TransformedWithState)
        uses_rng = takes_rng(f.apply, 2 if with_state else 1)

        def call(params, x, rng, kwargs):
            """``(output, leaves of the state before, state after)`` of one raw Haiku apply."""
            try:
                return raw_call(params, x, rng, kwargs)
            except ValueError as e:
                if type(e).__name__ != "MissingRNGError" or (rng is not None and uses_rng):
                    raise
                if rng is None:
                    raise missing_rng("Haiku", e) from e
                raise missing_rng("Haiku", e, "its apply takes no rng (hk.without_apply_rng), "
                                  "so `rng` cannot reach it: transform it without "
                                  "hk.without_apply_rng") from e

        def raw_call(params, x, rng, kwargs):
            rng_args = (rng,) if uses_rng else ()
            if not with_state:
                return f.apply(params, *rng_args, x, **kwargs), None, None
            state = hold_fixed(params["state"])
            out, new_state = f.apply(params["params"], state, *rng_args, x, **kwargs)
            return out, jax.tree.leaves(state), new_state

        def build(key, x, kwargs):
            try:
                raw = f.init(key, x, **kwargs)
            except ValueError as e:
                if "No value for" not in str(e):
                    raise
                raise ValueError(missing_state_advice(e, kwargs)) from e
            params = {"params": raw[0], "state": raw[1]} if with_state else raw
            shape = output_shape(lambda p, x: call(p, x, dummy_key(), kwargs)[0], params, x)
            return shape, params

        def apply(params, x, rng=None, **kwargs):
            out, state, new_state = call(params, x, rng, kwargs)
            if with_state and not mutable and not unchanged(state, new_state):
                raise StateMutationError(
                    "this Haiku function writes state during apply (hk.set_state, e.g. "
                    "BatchNorm or ExponentialMovingAverage with is_training=True). mcntk "
                    "holds state fixed, so the update would be discarded; and batch "
                    "statistics couple the examples of a batch, so the kernel is not "
                    "per-example and `vmap_axes` must be None. To accept that, pass "
                    "mutable=True to as_model: each batch is then normalised by its own "
                    "statistics. Inference mode (is_training=False) is no remedy for "
                    f"hk.BatchNorm: {BATCHNORM_NOTE}")
            return out

        return Model(make_init(build, dtype=dtype, init_kwargs=init_kw), apply)
