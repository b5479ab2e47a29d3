"""Checks of :func:`mcntk.monte_carlo_kernel_fn`'s own arguments: ``n_samples`` and
``key``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_prng_impl


def canonicalize_n_samples(n_samples: Any) -> tuple[tuple[int, ...], bool]:
    """``(sorted distinct counts, whether a generator is wanted)``."""
    def check(n: Any) -> int:
        if _is_integer_scalar(n):
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"`n_samples` must be a positive int or an iterable of positive "
                            f"ints, got {n!r} ({type(n).__name__}).")
        if n <= 0:
            raise ValueError(f"`n_samples` must be positive, got {int(n)}.")
        return int(n)

    if n_samples is None:
        raise TypeError("`n_samples` must be given: a positive int, or an iterable of positive "
                        "ints for a generator of estimates.")
    if isinstance(n_samples, (bool, int, np.integer)) or _is_integer_scalar(n_samples):
        return (check(n_samples),), False
    if isinstance(n_samples, (str, bytes)) or not isinstance(n_samples, Iterable):
        raise TypeError(f"`n_samples` must be a positive int or an iterable of positive ints, "
                        f"got {n_samples!r}.")
    counts = list(n_samples)
    if not counts:
        raise ValueError(f"`n_samples` must name at least one sample count, got {n_samples!r}.")
    return tuple(sorted({check(n) for n in counts})), True


def _is_integer_scalar(n: Any) -> bool:
    """A 0-d integer array (NumPy or JAX), usable as a count."""
    return (hasattr(n, "dtype") and hasattr(n, "shape") and n.shape == ()
            and jnp.issubdtype(n.dtype, jnp.integer))


def check_key(key: Any) -> Any:
    """A legacy ``uint32[2]`` key or a typed key array of shape ()."""
    if key is None:
        raise TypeError("`key` must be a PRNG key, e.g. jax.random.PRNGKey(0), got None.")
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if jnp.shape(key) != ():
            raise ValueError(f"`key` must be a single key, got a key array of shape "
                             f"{jnp.shape(key)}.")
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        raise TypeError(f"`key` must be a PRNG key, not a seed: got {key!r}; pass "
                        f"jax.random.PRNGKey({key}).")
    try:
        arr = jnp.asarray(key)
    except TypeError:
        raise TypeError(f"`key` must be a PRNG key (uint32[2] from jax.random.PRNGKey or a "
                        f"typed key from jax.random.key), got {key!r}.") from None
    if arr.dtype != jnp.uint32 or arr.shape != (2,):
        raise ValueError(f"`key` must be a PRNG key (uint32[2] from jax.random.PRNGKey or a "
                         f"typed key from jax.random.key), got {arr.dtype}{list(arr.shape)}.")
    return arr


def is_threefry(key: Any) -> bool:
    """Whether ``key`` (as :func:`check_key` returns it) is a threefry key: raw
    ``uint32[2]`` keys are."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) == str(threefry_prng_impl.name)
    return True
