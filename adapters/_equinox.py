"""Equinox: a module *factory* as ``Model(init, apply)``.

``init`` must draw fresh parameters from its key, so an Equinox model is given as a
factory ``factory(key) -> eqx.Module`` (e.g. ``lambda key: eqx.nn.MLP(..., key=key)``),
marked explicitly: ``equinox_model(factory)`` or
``as_model(factory, framework='equinox')``. ``as_model`` rejects module *instances*
with a TypeError that asks for a factory.

* ``params`` is ``eqx.filter(module, eqx.is_array)``: the module with every
  non-array leaf replaced by ``None``. The rest of the module (activation
  functions, sizes) is static, taken once from ``eqx.filter_eval_shape(factory, key)``.
  Inexact arrays are the parameters; other arrays (rare) are carried as constants.
* Stateful modules: a factory may return ``(module, state)``, as
  ``eqx.nn.make_with_state(Net)`` does. ``params`` then holds both, and ``apply``
  calls ``module(x, state)`` and keeps the output, the first element of the pair it
  returns (the new state is dropped). Every ``eqx.nn.State`` in ``params`` (this
  one, or one a module stores as a field) is held fixed with
  ``jax.lax.stop_gradient``, as the other adapters hold BatchNorm statistics.
* Equinox modules usually map one example: with ``batched=False`` (the default)
  ``apply`` maps the module over the leading axis of ``x`` with ``jax.vmap``;
  ``batched=True`` calls it on the whole batch.
* ``apply(params, x, rng=key)`` passes ``key=`` to the module call if its signature
  has a ``key`` parameter (``eqx.nn.MLP``, ``eqx.nn.Dropout`` do): the batch key
  itself when ``batched=True``, else ``jax.random.split(key, batch_size)``, one key
  per example. Other keyword arguments (``inference=``) reach the call unmapped;
  ``init(key, input_shape, **kwargs)`` passes them (merged with ``init_kwargs``) to
  the abstract call that gives the output shape.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp

from ._base import (
    Model,
    accepts_keyword,
    check_bool,
    check_input_dtype,
    check_kwargs,
    describe,
    dummy_key,
    hold_fixed,
    import_framework,
    leading_size,
    loaded_module,
    make_init,
    missing_rng,
    output_shape,
    shape_of,
)


def _is_abstract_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.ShapeDtypeStruct)


def _is_stateful(eqx: Any, obj: Any) -> bool:
    """A factory's ``(module, state)`` pair, as ``eqx.nn.make_with_state`` returns."""
    return (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], eqx.nn.State)
            and callable(obj[0]))


def _check_state_indices(eqx: Any, abstract: Any, factory: Any) -> None:
    """Rejects state indices that differ between calls of ``factory``.

    ``init`` calls the factory once per sample and ``apply`` combines its arrays with
    the static part of another call, so a ``StateIndex`` must be named the same way
    each time: ``eqx.nn.make_with_state`` names them by their path in the model; one
    made without it is named by a fresh ``object()``.
    """
    is_index = lambda node: isinstance(node, eqx.nn.StateIndex)
    nodes = jax.tree.leaves(abstract, is_leaf=is_index)
    if any(is_index(node) and not isinstance(node.marker, str) for node in nodes):
        raise TypeError(
            f"the Equinox factory {describe(factory)} builds a stateful module "
            f"(eqx.nn.StateIndex, e.g. in eqx.nn.BatchNorm) without "
            f"eqx.nn.make_with_state, so its state indices differ from one call to the "
            f"next. Pass eqx.nn.make_with_state(Net) as the factory (it returns "
            f"(module, state), and the module is called as module(x, state)).")


def _map_states(eqx: Any, fn: Any, params: Any) -> Any:
    """``params`` with ``fn`` applied to every ``eqx.nn.State`` in it."""
    is_state = lambda node: isinstance(node, eqx.nn.State)
    return jax.tree.map(lambda node: fn(node) if is_state(node) else node, params,
                        is_leaf=is_state)


def _computed(state: Any) -> Any:
    """``state`` with every leaf passed through a select.

    ``eqx.nn.State.set`` requires an update to have the type of the old value. Inside
    ``shard_map`` (the estimator's programs) a computed value's type names the mesh,
    but a constant's (an initial state, which does not depend on the key) does not,
    so a BatchNorm in training mode would be refused while ``init`` finds the output
    shape. A select computes the same value.
    """
    return jax.tree.map(lambda a: jnp.where(True, a, a), state)


def _takes_state(module: Any) -> bool:
    """Whether ``module`` can be called as ``module(x, state)``."""
    try:
        params = inspect.signature(module).parameters.values()
    except (TypeError, ValueError):
        return True
    kinds = [p.kind for p in params]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return (sum(k in positional for k in kinds) >= 2
            or inspect.Parameter.VAR_POSITIONAL in kinds)


def _output(eqx: Any, out: Any) -> Any:
    """The output of a stateful module's call ``(output, state)``."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], eqx.nn.State)):
        raise TypeError(
            f"the Equinox factory returned (module, state), so the module is called as "
            f"module(x, state) and must return (output, state); it returned "
            f"{shape_of(out)}.")
    return out[0]


def _refused_update(error: Exception) -> ValueError:
    """The error for an ``eqx.nn.State.set`` that refused an update in mcntk's programs."""
    return ValueError(
        f"eqx.nn.State.set refused a state update inside mcntk's programs "
        f"({str(error).rstrip('. ')}). They run under jax.shard_map, where a constant "
        f"written to the state (as eqx.nn.BatchNorm(mode='ema') does in training mode) "
        f"has another type than the value it replaces. Use eqx.nn.BatchNorm(..., "
        f"mode='batch') for training mode, or inference mode.")


def _is_module_instance(eqx: Any, obj: Any) -> bool:
    """An ``eqx.Module`` holding parameters: a model, not a (wrapped) factory."""
    return isinstance(obj, eqx.Module) and bool(
        jax.tree.leaves(eqx.filter(obj, eqx.is_inexact_array)))


class EquinoxAdapter:
    """Adapter for Equinox module factories."""

    description = "Equinox factories marked with equinox_model(factory) or framework='equinox'"

    def matches(self, obj: Any) -> bool:
        """An ``eqx.Module`` instance with parameters (then rejected: a factory is needed)."""
        eqx = loaded_module("equinox")
        return eqx is not None and _is_module_instance(eqx, obj)

    def to_model(
        self,
        factory: Any,
        *,
        batched: bool = False,
        input_dtype: Any = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> Model:
        """Returns ``Model(init, apply)`` for an Equinox module factory.

        Args:
          factory: ``factory(key) -> eqx.Module``.
          batched: whether the module maps a whole batch (``True``) or one example
            (``False``: ``apply`` vmaps it over the leading axis of ``x``).
          input_dtype: dtype of the example input built by ``init``; wins over the
            dtype of the input specs ``init`` gets (from the estimator: x1's dtype).
          init_kwargs: keyword arguments of the module call used by ``init`` to
            infer the output shape; merged over those ``init`` is called with (from
            the estimator: the kernel call's keyword arguments for x1).

        Returns:
          A :class:`Model`.

        Example:
          >>> import jax, equinox as eqx
          >>> from mcntk.adapters import equinox_model
          >>> model = equinox_model(lambda key: eqx.nn.MLP(3, 2, 8, 1, key=key))
          >>> model.init(jax.random.PRNGKey(0), (5, 3))[0]
          (5, 2)
        """
        eqx = import_framework("equinox", extra="equinox", purpose="The Equinox adapter")
        if _is_module_instance(eqx, factory):
            raise TypeError(
                f"as_model needs a factory for an Equinox model, not a module instance "
                f"({type(factory).__qualname__}): init must draw fresh parameters from its "
                f"key. Pass equinox_model(lambda key: {type(factory).__qualname__}(..., "
                f"key=key)) or as_model(<that lambda>, framework='equinox').")
        if not callable(factory):
            raise TypeError(f"an Equinox factory must be callable as factory(key) -> module, "
                            f"got {describe(factory)}.")
        batched = check_bool("batched", batched)
        dtype = check_input_dtype(input_dtype)
        init_kw = check_kwargs("init_kwargs", init_kwargs)

        abstract = eqx.filter_eval_shape(factory, dummy_key())
        stateful = _is_stateful(eqx, abstract)
        if not (stateful or callable(abstract)):
            raise TypeError(f"an Equinox factory must return a callable module or a pair "
                            f"(module, eqx.nn.State), got {describe(abstract)} from "
                            f"{describe(factory)}.")
        if stateful and not _takes_state(abstract[0]):
            raise TypeError(
                f"the Equinox factory {describe(factory)} returned (module, state), so the "
                f"module is called as module(x, state) -> (output, state), but "
                f"{type(abstract[0]).__qualname__}.__call__ takes no state argument.")
        _check_state_indices(eqx, abstract, factory)
        static = eqx.partition(abstract, _is_abstract_array)[1]
        takes_key = accepts_keyword(abstract[0] if stateful else abstract, "key",
                                    default=False, var_keyword=False)

        def build(key, x, kwargs):
            params = eqx.filter(factory(key), eqx.is_array)
            return output_shape(functools.partial(apply, rng=dummy_key(), **kwargs),
                                _map_states(eqx, _computed, params), x), params

        def apply(params, x, rng=None, **kwargs):
            combined = eqx.combine(_map_states(eqx, hold_fixed, params), static)
            if stateful:
                module, state = combined
                call = lambda xi, **kw: _output(eqx, module(xi, state, **kw))
            else:
                call = combined
            use_key = rng is not None and takes_key
            try:
                if batched:
                    return call(x, key=rng, **kwargs) if use_key else call(x, **kwargs)
                if not use_key:
                    return jax.vmap(lambda xi: call(xi, **kwargs))(x)
                keys = jax.random.split(rng, leading_size(x))
                return jax.vmap(lambda xi, ki: call(xi, key=ki, **kwargs))(x, keys)
            except RuntimeError as error:
                if "requires a key" not in str(error) or (rng is not None and takes_key):
                    raise
                if rng is None:
                    raise missing_rng("Equinox", error) from error
                raise missing_rng(
                    "Equinox", error, "its __call__ takes no `key` argument, so `rng` "
                    "cannot reach it: give it `key=None` and pass that on to the layers that "
                    "draw, or call them deterministically") from error
            except NameError as error:
                if batched or "unbound axis name" not in str(error):
                    raise
                raise ValueError(
                    f"the Equinox module uses a named axis that batched=False does not "
                    f"bind (an eqx.nn.BatchNorm(axis_name=...) in training mode?): "
                    f"{str(error).rstrip('. ')}. Call it in inference mode "
                    f"(eqx.nn.inference_mode(...) in the factory), or pass batched=True "
                    f"with a module that maps the batch itself (jax.vmap(..., "
                    f"axis_name=...)).") from error
            except ValueError as error:
                if not (stateful and "Old and new values have different" in str(error)):
                    raise
                raise _refused_update(error) from error

        return Model(make_init(build, dtype=dtype, init_kwargs=init_kw), apply)


def equinox_model(factory: Any, **options: Any) -> Model:
    """``Model(init, apply)`` for an Equinox factory; see :meth:`EquinoxAdapter.to_model`.

    Args:
      factory: ``factory(key) -> eqx.Module``.
      **options: ``batched``, ``input_dtype``, ``init_kwargs``.

    Returns:
      A :class:`Model`.
    """
    return EquinoxAdapter().to_model(factory, **options)
