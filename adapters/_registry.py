"""Dispatch: ``as_model`` finds the adapter for an object; third parties register more.

Order of dispatch: a :class:`Model` is returned as is; then the built-in adapters
(Haiku, linen, NNX, Equinox, stax: Haiku before stax, since Haiku transforms are
tuples of two functions too); then adapters added with :func:`register`; then, the
first time nothing matched, the adapters published under the entry-point group
``mcntk.adapters`` are loaded and registered, and dispatch is tried once more.

Built-in adapters never import their framework to decide: an object of a framework
exists only once that framework is imported, so they look it up in ``sys.modules``.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any

from mcntk.errors import UnsupportedModelError

from ._base import Model, ModelAdapter, describe
from ._equinox import EquinoxAdapter
from ._haiku import HaikuAdapter
from ._linen import LinenAdapter
from ._nnx import NnxAdapter
from ._stax import StaxAdapter

ENTRY_POINT_GROUP = "mcntk.adapters"

BUILTINS: dict[str, ModelAdapter] = {
    "haiku": HaikuAdapter(),
    "linen": LinenAdapter(),
    "nnx": NnxAdapter(),
    "equinox": EquinoxAdapter(),
    "stax": StaxAdapter(),
}

_registered: dict[str, ModelAdapter] = {}
_entry_points_loaded = False


def check_adapter(adapter: Any) -> ModelAdapter:
    """An object with ``matches`` and ``to_model`` methods."""
    if isinstance(adapter, type) or not isinstance(adapter, ModelAdapter):
        raise TypeError(f"`adapter` must be an object with methods matches(obj) -> bool and "
                        f"to_model(obj, **options) -> Model, got {describe(adapter)}.")
    return adapter


def register(adapter: ModelAdapter, *, name: str, replace: bool = False) -> ModelAdapter:
    """Adds ``adapter`` to the dispatch of :func:`as_model`, under ``name``.

    Registered adapters are tried after the built-in ones, in registration order;
    ``as_model(obj, framework=name)`` selects one directly.

    Args:
      adapter: an object with ``matches(obj) -> bool`` and
        ``to_model(obj, **options) -> Model`` (see :class:`ModelAdapter`).
      name: a unique name; the built-in names (``haiku``, ``linen``, ``nnx``,
        ``equinox``, ``stax``) are taken.
      replace: replace an adapter registered earlier under ``name``.

    Returns:
      ``adapter``.
    """
    adapter = check_adapter(adapter)
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty string, got {name!r}.")
    if name in BUILTINS:
        raise ValueError(f"`name` {name!r} belongs to a built-in adapter; built-in names are "
                         f"{sorted(BUILTINS)}.")
    if name in _registered and not replace:
        raise ValueError(f"an adapter is already registered as {name!r}; pass replace=True to "
                         f"replace it, or unregister({name!r}) first.")
    _registered[name] = adapter
    return adapter


def unregister(name: str) -> ModelAdapter:
    """Removes the adapter registered under ``name`` and returns it."""
    if name not in _registered:
        raise KeyError(f"no adapter is registered as {name!r}; registered: {sorted(_registered)}.")
    return _registered.pop(name)


def registered() -> dict[str, ModelAdapter]:
    """All adapters by name: built-in first, then registered ones (a new dict)."""
    return {**BUILTINS, **_registered}


def find_entry_points() -> list[Any]:
    """The entry points of group ``mcntk.adapters`` (a seam for tests)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_entry_points() -> list[str]:
    """Loads and registers the adapters published under the ``mcntk.adapters`` group.

    Each entry point names an adapter object, or a class instantiated without
    arguments. Names already registered are skipped; an entry point that fails to
    load is skipped with a warning. Runs once per process (later calls return []).

    Returns:
      The names registered by this call.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    names = []
    for ep in find_entry_points():
        if ep.name in BUILTINS or ep.name in _registered:
            continue
        try:
            adapter = ep.load()
            if isinstance(adapter, type):
                adapter = adapter()
            register(adapter, name=ep.name)
        except Exception as e:  # a broken plug-in must not break dispatch
            warnings.warn(f"mcntk: skipping adapter entry point {ep.name!r} = {ep.value!r} "
                          f"of group {ENTRY_POINT_GROUP!r}: {type(e).__name__}: {e}",
                          stacklevel=3)
            continue
        names.append(ep.name)
    return names


def _find_adapter(obj: Any) -> ModelAdapter | None:
    for adapter in (*BUILTINS.values(), *_registered.values()):
        if adapter.matches(obj):
            return adapter
    return None


def _unsupported(obj: Any) -> UnsupportedModelError:
    kinds = ["a mcntk.adapters.Model(init, apply)"]
    kinds += [getattr(a, "description", name) for name, a in registered().items()]
    listing = "".join(f"\n  - {k}" for k in kinds)
    return UnsupportedModelError(
        f"as_model cannot turn {describe(obj)} into a Model. Supported:{listing}\n"
        f"To support it, pass Model(init, apply) yourself, or register an adapter (an object "
        f"with matches(obj) and to_model(obj, **options)) with "
        f"mcntk.adapters.register(adapter, name=...), or publish one under the entry-point "
        f"group {ENTRY_POINT_GROUP!r}.")


def as_model(obj: Any, *, framework: str | None = None, **options: Any) -> Model:
    """Turns a model of any supported framework into ``Model(init, apply)``.

    Args:
      obj: a :class:`Model` (returned unchanged); a stax ``(init_fn, apply_fn)``
        pair or ``(init_fn, apply_fn, kernel_fn)`` triple; a ``flax.linen.Module``;
        an ``nnx.Module`` subclass or, with ``framework='nnx'``, a factory
        ``factory(rngs) -> nnx.Module``; a Haiku ``Transformed`` or
        ``TransformedWithState``; with ``framework='equinox'``, a factory
        ``factory(key) -> eqx.Module``; or anything a registered adapter matches.
      framework: the name of the adapter to use instead of dispatching on ``obj``
        (``'stax'``, ``'linen'``, ``'nnx'``, ``'haiku'``, ``'equinox'`` or a
        registered name).
      **options: options of that adapter, e.g. ``input_dtype=jnp.int32``; see the
        ``to_model`` method of each adapter.

    Returns:
      ``Model(init, apply)`` with ``init(key, input_shape) -> (output_shape, params)``
      and ``apply(params, x, rng=None, **kwargs) -> output``.

    Raises:
      UnsupportedModelError: (a TypeError) no adapter handles ``obj``.
      MissingFrameworkError: (an ImportError) the adapter's framework is missing.

    Example:
      >>> import jax
      >>> from jax.example_libraries import stax
      >>> from mcntk.adapters import as_model
      >>> init_fn, apply_fn = as_model(stax.serial(stax.Dense(4), stax.Relu))
      >>> init_fn(jax.random.PRNGKey(0), (2, 3))[0]
      (2, 4)
    """
    if isinstance(obj, Model):
        if framework is not None or options:
            raise TypeError(f"as_model returns a Model unchanged and takes no options for it, "
                            f"got framework={framework!r} and options {sorted(options)}.")
        return obj
    if framework is not None:
        adapters = registered()
        if framework not in adapters:
            load_entry_points()
            adapters = registered()
        if framework not in adapters:
            raise ValueError(f"`framework` must name an adapter, one of {sorted(adapters)}, "
                             f"got {framework!r}.")
        adapter = adapters[framework]
    else:
        adapter = _find_adapter(obj)
        if adapter is None and load_entry_points():
            adapter = _find_adapter(obj)
        if adapter is None:
            raise _unsupported(obj)
    model = adapter.to_model(obj, **options)
    if not isinstance(model, Model):
        if isinstance(model, tuple) and len(model) == 2 and all(map(callable, model)):
            return Model(*model)
        raise TypeError(f"adapter {adapter!r} returned {describe(model)} from to_model; it "
                        f"must return mcntk.adapters.Model(init, apply).")
    return model
