"""The ``Model`` pair, the ``ModelAdapter`` protocol and helpers shared by the adapters.

Every adapter turns a framework's model into ``Model(init, apply)``:

* ``init(key, input_shape, **kwargs) -> (output_shape, params)``. ``input_shape``
  is a shape (a tuple of ints) or a pytree of shapes for pytree inputs; a leaf may
  also be a ``jax.ShapeDtypeStruct`` to give that input its own dtype. Adapters build
  a zero example input of that shape (dtype: the adapter option ``input_dtype`` if
  given, else the leaf's dtype, else JAX's default float), call the model on it with
  ``kwargs`` merged with the option ``init_kwargs`` (``init_kwargs`` win), and return
  the shape (pytree) of the output. Adapters' inits are marked by
  :func:`make_init`, so the estimator passes them x1's shapes and dtypes and the
  kernel call's keyword arguments for x1 (``train=False``, a mask).
* ``apply(params, x, rng=None, **kwargs) -> output pytree``. ``rng`` is the
  estimator's dropout key; it drives every random stream of the model.

``params`` is everything the model needs besides its input. The estimator
differentiates it; state that the framework keeps apart from the parameters (Flax
collections other than ``params``, Haiku state, NNX ``BatchStat``) is stored in
``params`` too, and ``apply`` wraps it in ``jax.lax.stop_gradient`` so its Jacobian
is zero: it is drawn by ``init`` with the parameters and then held fixed.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from mcntk._apply import INPUT_SPECS_ATTRIBUTE
from mcntk._types import ApplyFn, InitFn, PyTree
from mcntk.errors import MissingFrameworkError

DUMMY_KEY_SEED = 0
"""Seed of the key used where a key is needed only for shapes or as a placeholder."""


class Model(NamedTuple):
    """A model as a pair of pure functions, in stax's conventions.

    Being a tuple, a ``Model`` unpacks into the ``init_fn, apply_fn`` arguments of
    ``mcntk.monte_carlo_kernel_fn`` and ``mcntk.empirical_kernel_fn``.

    Attributes:
      init: ``init(key, input_shape) -> (output_shape, params)``; draws fresh
        parameters from ``key``. Adapters' init functions also take the model call's
        keyword arguments (``init(key, input_shape, train=False)``).
      apply: ``apply(params, x, **kwargs) -> output pytree``; adapters' apply
        functions also take ``rng=None``, the key of dropout and other random streams.

    Example:
      >>> import jax
      >>> from jax.example_libraries import stax
      >>> from mcntk.adapters import Model
      >>> model = Model(*stax.serial(stax.Dense(4), stax.Relu))
      >>> output_shape, params = model.init(jax.random.PRNGKey(0), (3, 2))
      >>> output_shape
      (3, 4)
      >>> model.apply(params, jax.numpy.ones((3, 2))).shape
      (3, 4)
    """

    init: InitFn
    apply: ApplyFn


@runtime_checkable
class ModelAdapter(Protocol):
    """Turns one kind of model object into a :class:`Model`.

    Register an adapter with :func:`mcntk.adapters.register` or under the
    entry-point group ``mcntk.adapters``. An optional ``description`` attribute (a
    short phrase such as ``"flax.linen.Module instances"``) is shown in the error
    that lists the supported kinds of model.
    """

    def matches(self, obj: Any) -> bool:
        """Whether this adapter handles ``obj``. Must not import a framework."""
        ...

    def to_model(self, obj: Any, **options: Any) -> Model:
        """Returns ``Model(init, apply)`` for ``obj``; ``options`` are adapter-specific."""
        ...


# --- frameworks ---------------------------------------------------------------------


def loaded_module(name: str) -> ModuleType | None:
    """The module ``name`` if it has been imported already, else None. Never imports.

    A framework object exists only if its framework was imported, so dispatch can
    test ``isinstance`` against ``loaded_module(...)`` without importing anything.
    """
    return sys.modules.get(name)


def import_framework(name: str, *, extra: str, purpose: str) -> ModuleType:
    """Imports ``name``; if it is missing, raises an ImportError naming the pip extra."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingFrameworkError(
            f"{purpose} needs `{name}`, which could not be imported ({e}). Install it "
            f'with `pip install "mcntk[{extra}]"`.') from e


# --- option checks ------------------------------------------------------------------


def check_input_dtype(input_dtype: Any) -> Any:
    """``None`` (JAX's default float), anything ``jnp.dtype`` accepts, or a pytree of
    those matching the structure of a pytree input (e.g. ``{'ids': jnp.int32, 'mask':
    jnp.float32}``)."""
    if input_dtype is None:
        return None
    if isinstance(input_dtype, (dict, list, tuple)):
        return jax.tree.map(check_input_dtype, input_dtype,
                            is_leaf=lambda v: not isinstance(v, (dict, list, tuple)))
    try:
        return jnp.dtype(input_dtype)
    except TypeError as e:
        raise TypeError(f"`input_dtype` must be a dtype such as jnp.float32 or jnp.int32, "
                        f"a pytree of dtypes matching the input, or None, got "
                        f"{input_dtype!r}.") from e


def check_kwargs(name: str, value: Any) -> dict[str, Any]:
    """``None`` or a mapping with string keys, as a new dict."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"`{name}` must be a dict of keyword arguments or None, got {value!r}.")
    return dict(value)


def check_rng_streams(rng_streams: Any) -> tuple[str, ...]:
    """A stream name or a sequence of distinct names, as a tuple."""
    if isinstance(rng_streams, str):
        rng_streams = (rng_streams,)
    if (not isinstance(rng_streams, Sequence)
            or not all(isinstance(s, str) and s for s in rng_streams)):
        raise TypeError(f"`rng_streams` must be a stream name or a sequence of names, such "
                        f"as ('dropout',), got {rng_streams!r}.")
    if len(set(rng_streams)) != len(rng_streams):
        raise ValueError(f"`rng_streams` must not repeat a name, got {tuple(rng_streams)!r}.")
    return tuple(rng_streams)


def check_bool(name: str, value: Any) -> bool:
    """A Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


# --- inputs and outputs -------------------------------------------------------------


def is_shape(x: Any) -> bool:
    """A tuple or list of ints (``()`` included)."""
    return isinstance(x, (tuple, list)) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in x)


def example_input(input_shape: Any, dtype: Any) -> PyTree:
    """Zeros of ``input_shape`` (a shape or a pytree of shapes / ShapeDtypeStructs), of
    ``dtype`` (one dtype, or a pytree of dtypes that is a prefix of the input); where
    ``dtype`` is None, of the ShapeDtypeStruct's dtype, else JAX's default float."""
    if dtype is not None and not isinstance(dtype, np.dtype):
        try:
            return jax.tree.map(lambda d, sub: example_input(sub, d), dtype, input_shape,
                                is_leaf=lambda v: isinstance(v, np.dtype))
        except ValueError as e:
            raise ValueError(f"`input_dtype` {dtype!r} does not match the structure of the "
                             f"input shape {input_shape!r}.") from e

    def make(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.ShapeDtypeStruct):  # an explicit `input_dtype` wins
            return jnp.zeros(leaf.shape, leaf.dtype if dtype is None else dtype)
        if not is_shape(leaf):
            raise TypeError(f"`input_shape` must be a shape (a tuple of ints) or a pytree of "
                            f"shapes, got {leaf!r} in {input_shape!r}.")
        if any(d < 0 for d in leaf):
            raise ValueError(f"`input_shape` must have non-negative sizes, got {input_shape!r}.")
        return jnp.zeros(tuple(int(d) for d in leaf), dtype)

    return jax.tree.map(make, input_shape,
                        is_leaf=lambda v: is_shape(v) or isinstance(v, jax.ShapeDtypeStruct))


def make_init(build: Callable[[Any, PyTree, dict[str, Any]], tuple[PyTree, PyTree]], *,
              dtype: Any, init_kwargs: dict[str, Any]) -> InitFn:
    """An adapter's ``init(key, input_shape, **kwargs)``, marked for the estimator.

    The returned ``init`` builds the example input with :func:`example_input` (so an
    explicit ``input_dtype`` wins over the dtypes of ``jax.ShapeDtypeStruct`` leaves)
    and calls ``build(key, x, {**kwargs, **init_kwargs})``: the model call's keyword
    arguments, the adapter's ``init_kwargs`` winning on conflicts. It carries
    ``accepts_input_specs = True`` (:data:`mcntk._apply.INPUT_SPECS_ATTRIBUTE`), so the
    estimator calls it with x1's shapes and dtypes and the kernel call's keyword
    arguments for x1 (never ``rng``).

    Args:
      build: ``build(key, x, kwargs) -> (output_shape, params)`` for the example input
        ``x``.
      dtype: the checked ``input_dtype`` option (None: the specs' dtypes).
      init_kwargs: the checked ``init_kwargs`` option.

    Returns:
      ``init(key, input_shape, **kwargs) -> (output_shape, params)``.
    """
    def init(key: Any, input_shape: Any, **kwargs: Any) -> tuple[PyTree, PyTree]:
        return build(key, example_input(input_shape, dtype), {**kwargs, **init_kwargs})

    setattr(init, INPUT_SPECS_ATTRIBUTE, True)
    return init


def shapes(tree: PyTree) -> PyTree:
    """The shape tuple of every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def output_shape(fn: Callable[..., PyTree], *args: Any) -> PyTree:
    """The shape (pytree of shape tuples) of ``fn(*args)``, computed abstractly."""
    return shapes(jax.eval_shape(fn, *args))


def leading_size(x: PyTree) -> int:
    """The common size of the leading axis of every leaf of ``x``."""
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(x)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"`x` must be a batch: every input leaf needs the same leading "
                         f"(batch) axis, got shapes {jax.tree.map(jnp.shape, x)}.")
    return sizes.pop()


# --- keys, fixed state --------------------------------------------------------------


def dummy_key() -> jax.Array:
    """A fixed key for shape evaluation and placeholders."""
    return jax.random.PRNGKey(DUMMY_KEY_SEED)


def stream_keys(rng: Any, names: Sequence[str]) -> dict[str, Any]:
    """Keys of the named random streams, all derived from ``rng``.

    One stream gets ``rng`` itself (so a model with only dropout sees the estimator's
    key unchanged); several get ``jax.random.split(rng, len(names))`` in order.
    """
    if not names:
        return {}
    if len(names) == 1:
        return {names[0]: rng}
    return dict(zip(names, list(jax.random.split(rng, len(names)))))


def missing_rng(framework: str, error: Exception, unreachable: str | None = None) -> ValueError:
    """The error for a model that asked for a random key that ``apply`` could not give it.

    Args:
      framework: the framework's name, for the message.
      error: the framework's own error (chain it: ``raise ... from error``).
      unreachable: None when ``apply`` got ``rng=None``; else why the key it got cannot
        reach the model, and what to do instead.
    """
    said = f"{type(error).__name__}: {str(error).rstrip('. ')}"
    if unreachable is None:
        return ValueError(
            f"this {framework} model draws random numbers (dropout?) but was called with "
            f"`rng`=None ({said}). Pass a key: kernel_fn(x1, x2, get, params, rng=key) "
            f"for an empirical kernel (the Monte Carlo estimator passes one for every "
            f"sample), or call the model deterministically (train=False, "
            f"deterministic=True, inference=True, ...).")
    return ValueError(f"this {framework} model draws random numbers (dropout?) but "
                      f"{unreachable} ({said}).")


def shape_of(out: Any) -> str:
    """``out`` described by its structure and array shapes (tracers included)."""
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a, out)
    return describe(abstract)


def hold_fixed(tree: PyTree) -> PyTree:
    """``tree`` with every inexact leaf wrapped in ``jax.lax.stop_gradient``."""
    def stop(a: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            return jax.lax.stop_gradient(a)
        return a

    return jax.tree.map(stop, tree)


def unchanged(before: list, after: PyTree) -> bool:
    """Whether the leaves of ``after`` are the very objects in ``before`` (a leaf list).

    Frameworks pass state they did not write through untouched, so identity tells a
    write apart from no write, also under ``jax.jit`` (where values are tracers).
    Take ``before`` with ``jax.tree.leaves`` before the call: some frameworks update
    their state containers in place.
    """
    leaves = jax.tree.leaves(after)
    return len(leaves) == len(before) and all(a is b for a, b in zip(leaves, before))


def accepts_keyword(fn: Callable[..., Any], name: str, *, default: bool = True,
                    var_keyword: bool = True) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (or ``**kwargs``, if ``var_keyword``).

    Returns ``default`` when ``fn`` has no inspectable signature.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return default
    return any((var_keyword and p.kind is inspect.Parameter.VAR_KEYWORD)
               or (p.name == name and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
               for p in params)


def describe(obj: Any) -> str:
    """A short description of ``obj`` for error messages."""
    text = repr(obj)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (type {type(obj).__module__}.{type(obj).__qualname__})"
