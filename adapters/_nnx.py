"""Flax NNX: a module *factory* as ``Model(init, apply)``.

``init`` must draw fresh parameters from its key, so an NNX model is given as a
factory ``factory(rngs) -> nnx.Module`` (an ``nnx.Module`` subclass whose
constructor takes only ``rngs``, a ``functools.partial`` of one, or a lambda). A
factory is an ordinary callable, indistinguishable from other functions, so it is
marked explicitly: ``nnx_model(factory)`` or ``as_model(factory, framework='nnx')``.
``as_model`` accepts ``nnx.Module`` subclasses directly, and rejects module
*instances* with a TypeError that asks for a factory.

* ``init(key, shape, **kwargs)`` builds the module with ``nnx.Rngs(key, dropout=...)`` (one
  named stream per ``rng_streams``) and returns pure dicts
  (``nnx.to_pure_dict``): ``{'params': <nnx.Param state>}`` plus, if the module has
  other variables (``BatchStat``, ...), ``'fixed': <their state>``, held fixed by
  ``jax.lax.stop_gradient`` in ``apply``. It calls the module abstractly with
  ``kwargs`` (merged with ``init_kwargs``) for the output shape.
* RNG state is not part of ``params``: ``apply(params, x, rng=key)`` re-keys every
  ``RngStream`` of the module from ``key`` (counts reset to 0), so dropout masks
  come from the estimator's key. The streams named in ``rng_streams`` come first,
  then any other stream found in the module, by name; one stream gets ``key``
  itself, several get ``jax.random.split(key, n)`` in that order. With
  ``rng=None`` the streams get a fixed key.
* A module that writes a non-``Param`` variable during the call (BatchNorm in
  training mode) raises :class:`StateMutationError` unless ``mutable=True``.
"""

from __future__ import annotations

from typing import Any

import jax

from mcntk.errors import StateMutationError

from ._base import (
    Model,
    accepts_keyword,
    check_bool,
    check_input_dtype,
    check_kwargs,
    check_rng_streams,
    describe,
    dummy_key,
    hold_fixed,
    import_framework,
    loaded_module,
    make_init,
    output_shape,
    stream_keys,
    unchanged,
)

_PURPOSE = "The Flax NNX adapter"


def _nnx():
    return import_framework("flax.nnx", extra="flax", purpose=_PURPOSE)


def _traverse():
    return import_framework("flax.traverse_util", extra="flax", purpose=_PURPOSE)


def call_factory(factory: Any, rngs: Any) -> Any:
    """``factory(rngs=rngs)`` if it takes a keyword ``rngs``, else ``factory(rngs)``."""
    if accepts_keyword(factory, "rngs"):
        return factory(rngs=rngs)
    return factory(rngs)


def typed_key(key: Any) -> jax.Array:
    """A typed key array from a typed or a legacy ``uint32[2]`` key."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def build_state(flat_template: list, values: dict) -> Any:
    """An ``nnx.State`` shaped like ``flat_template`` with leaves taken from ``values``.

    Args:
      flat_template: ``[(path, Variable)]`` from ``nnx.to_flat_state``.
      values: ``{path: array}``; paths of a pure dict may spell ints as strings.
    """
    nnx = _nnx()
    items = []
    for path, var in flat_template:
        value = values.get(path, values.get(tuple(str(p) for p in path)))
        if value is None:
            raise ValueError(f"`params` lacks the NNX variable at {'/'.join(map(str, path))}; "
                             f"pass the params returned by init.")
        items.append((path, var.replace(value)))
    return nnx.from_flat_state(items)


def rng_values(flat_rngs: list, names: tuple[str, ...], rng: Any) -> dict:
    """Values of the module's RNG variables, all derived from ``rng``.

    Every stream named ``names`` gets a key by :func:`stream_keys`; a stream key of
    shape ``s`` (split streams) becomes ``jax.random.split(key, s)``; counts are 0.
    """
    nnx = _nnx()
    keys = stream_keys(typed_key(dummy_key() if rng is None else rng), names)
    values = {}
    for path, var in flat_rngs:
        if isinstance(var, nnx.RngKey):
            key = keys[var.tag]
            values[path] = key if var.shape == () else jax.random.split(key, var.shape)
        else:
            values[path] = jax.numpy.zeros(var.shape, var.dtype)
    return values


class NnxAdapter:
    """Adapter for Flax NNX module factories."""

    description = ("flax.nnx.Module subclasses, and NNX factories marked with "
                   "nnx_model(factory) or framework='nnx'")

    def matches(self, obj: Any) -> bool:
        """An ``nnx.Module`` subclass or instance (instances are then rejected)."""
        nnx = loaded_module("flax.nnx")
        if nnx is None:
            return False
        return isinstance(obj, nnx.Module) or (isinstance(obj, type)
                                               and issubclass(obj, nnx.Module))

    def to_model(
        self,
        factory: Any,
        *,
        input_dtype: Any = None,
        rng_streams: Any = ("dropout",),
        init_kwargs: dict[str, Any] | None = None,
        mutable: bool = False,
    ) -> Model:
        """Returns ``Model(init, apply)`` for an NNX module factory.

        Args:
          factory: ``factory(rngs) -> nnx.Module``, e.g. ``lambda rngs: Net(3, rngs=rngs)``
            or an ``nnx.Module`` subclass whose constructor needs only ``rngs``.
          input_dtype: dtype of the example input built by ``init``; wins over the
            dtype of the input specs ``init`` gets (from the estimator: x1's dtype).
          rng_streams: named streams created for the factory (``nnx.Rngs(key,
            dropout=...)``) and re-keyed first from ``apply``'s ``rng``.
          init_kwargs: keyword arguments of the module call used by ``init`` to
            infer the output shape, e.g. ``{'deterministic': True}``; merged over
            those ``init`` is called with (from the estimator: the kernel call's
            keyword arguments for x1).
          mutable: let the call write non-``Param`` variables, discarding the writes.

        Returns:
          A :class:`Model`; ``init`` returns ``{'params': ..., ['fixed': ...]}``.

        Example:
          >>> import jax
          >>> from flax import nnx
          >>> from mcntk.adapters import nnx_model
          >>> model = nnx_model(lambda rngs: nnx.Linear(2, 3, rngs=rngs))
          >>> output_shape, params = model.init(jax.random.PRNGKey(0), (5, 2))
          >>> output_shape, jax.tree.map(lambda p: p.shape, params)
          ((5, 3), {'params': {'bias': (3,), 'kernel': (2, 3)}})
        """
        nnx, traverse = _nnx(), _traverse()
        if isinstance(factory, nnx.Module):
            raise TypeError(
                f"as_model needs a factory for an NNX model, not a module instance "
                f"({type(factory).__qualname__}): init must draw fresh parameters from its "
                f"key. Pass nnx_model(lambda rngs: {type(factory).__qualname__}(..., "
                f"rngs=rngs)) or as_model(<that lambda>, framework='nnx').")
        if not callable(factory):
            raise TypeError(f"an NNX factory must be callable as factory(rngs) -> nnx.Module, "
                            f"got {describe(factory)}.")
        dtype = check_input_dtype(input_dtype)
        streams = check_rng_streams(rng_streams)
        init_kw = check_kwargs("init_kwargs", init_kwargs)
        mutable = check_bool("mutable", mutable)

        def build(key):
            named = stream_keys(jax.random.fold_in(key, 1), streams)
            return call_factory(factory, nnx.Rngs(key, **named))

        try:
            abstract = nnx.eval_shape(build, dummy_key())
        except TypeError as e:
            if not isinstance(factory, type):
                raise
            name = factory.__qualname__
            raise TypeError(f"as_model calls an NNX class as {name}(rngs=rngs), which failed "
                            f"({e}); for constructor arguments pass "
                            f"nnx_model(lambda rngs: {name}(..., rngs=rngs)).") from e
        if not isinstance(abstract, nnx.Module):
            raise TypeError(f"an NNX factory must return an nnx.Module, got "
                            f"{describe(abstract)} from {describe(factory)}.")
        graphdef, abs_params, abs_rngs, abs_fixed = nnx.split(
            abstract, nnx.Param, nnx.RngState, ...)
        flat_params = list(nnx.to_flat_state(abs_params))
        flat_rngs = list(nnx.to_flat_state(abs_rngs))
        flat_fixed = list(nnx.to_flat_state(abs_fixed))
        tags = {v.tag for _, v in flat_rngs if isinstance(v, nnx.RngKey)}
        names = streams + tuple(sorted(tags - set(streams)))
        fixed_filter = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))

        def call(params, x, rng, kwargs):
            """``(output, whether the call wrote a non-Param variable)``."""
            fixed = traverse.flatten_dict(hold_fixed(params.get("fixed", {})))
            p_state = build_state(flat_params, traverse.flatten_dict(params["params"]))
            f_state = build_state(flat_fixed, fixed)
            before = jax.tree.leaves(f_state)
            r_state = build_state(flat_rngs, rng_values(flat_rngs, names, rng))
            module = nnx.merge(graphdef, p_state, r_state, f_state)
            out = module(x, **kwargs)
            return out, not unchanged(before, nnx.state(module, fixed_filter))

        def build_params(key, x, kwargs):
            _, p_state, _, f_state = nnx.split(build(key), nnx.Param, nnx.RngState, ...)
            params = {"params": nnx.to_pure_dict(p_state)}
            if flat_fixed:
                params["fixed"] = nnx.to_pure_dict(f_state)
            return output_shape(lambda p, x: call(p, x, None, kwargs)[0], params, x), params

        def apply(params, x, rng=None, **kwargs):
            out, wrote = call(params, x, rng, kwargs)
            if wrote and not mutable:
                raise StateMutationError(
                    "this NNX module writes a non-Param variable during its call (e.g. "
                    "BatchNorm with use_running_average=False). mcntk holds such state "
                    "fixed, so the update would be discarded; and batch statistics couple "
                    "the examples of a batch, so the kernel is not per-example and "
                    "`vmap_axes` must be None. To accept that, pass mutable=True to "
                    "nnx_model/as_model; otherwise call it in inference mode (e.g. "
                    "use_running_average=True, or model.eval() in the factory).")
            return out

        return Model(make_init(build_params, dtype=dtype, init_kwargs=init_kw), apply)


def nnx_model(factory: Any, **options: Any) -> Model:
    """``Model(init, apply)`` for an NNX module factory; see :meth:`NnxAdapter.to_model`.

    Args:
      factory: ``factory(rngs) -> nnx.Module``.
      **options: ``input_dtype``, ``rng_streams``, ``init_kwargs``, ``mutable``.

    Returns:
      A :class:`Model`.
    """
    return NnxAdapter().to_model(factory, **options)
