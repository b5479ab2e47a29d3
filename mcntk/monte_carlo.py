"""``monte_carlo_kernel_fn``: NNGP and NTK of a finite network averaged over
random initialisations, with neural-tangents' arguments and numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcntk import _apply, _grid, _sampler, ntk
from mcntk._axes import AxesRule
from mcntk._types import NtkImplementation, PyTree, canonicalize_get, pack_result
from mcntk.empirical import KernelSpec
from mcntk.ntk import auto


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


def check_inputs(x: Any, name: str) -> PyTree:
    """``x`` as a pytree of JAX arrays; Python scalars or None leaves are rejected."""
    if x is None:
        raise TypeError(f"`{name}` must be an array or a pytree of arrays, got None.")
    leaves = jax.tree.leaves(x)
    bad = [v for v in leaves if not hasattr(v, "shape") or not hasattr(v, "dtype")]
    if not leaves or bad:
        raise TypeError(f"`{name}` must be an array or a pytree of arrays, got "
                        f"{type(x).__name__} with leaves {bad[:3] if bad else leaves!r}; "
                        f"wrap a list of numbers in jnp.asarray.")
    return jax.tree.map(jnp.asarray, x)


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
    arr = jnp.asarray(key)
    if arr.dtype != jnp.uint32 or arr.shape != (2,):
        raise ValueError(f"`key` must be a PRNG key (uint32[2] from jax.random.PRNGKey or a "
                         f"typed key from jax.random.key), got {arr.dtype}{list(arr.shape)}.")
    return arr


def check_device_count(device_count: Any) -> int:
    if isinstance(device_count, bool) or not isinstance(device_count, (int, np.integer)):
        raise TypeError(f"`device_count` must be an int (-1: all devices, 0: none), "
                        f"got {device_count!r}.")
    if device_count < -1:
        raise ValueError(f"`device_count` must be -1 (all devices), 0 or positive, "
                         f"got {device_count}.")
    return int(device_count)


def _resolve_model(init_fn, apply_fn, key, n_samples):
    """Supports ``(init_fn, apply_fn, key, n)`` and ``(model, key, n)`` call forms."""
    if apply_fn is not None and not callable(apply_fn):  # (model, key, ...) positionally
        if key is None:
            apply_fn, key = None, apply_fn
        elif n_samples is None:
            apply_fn, key, n_samples = None, apply_fn, key
    owner = getattr(init_fn, "__self__", None)
    if owner is not None and getattr(apply_fn, "__self__", None) is owner:
        # e.g. (module.init, module.apply) of a Flax linen module: adapt the module
        from mcntk.adapters import UnsupportedModelError, as_model

        try:
            return (*as_model(owner), key, n_samples)
        except UnsupportedModelError:
            pass
    if apply_fn is None:
        from mcntk.adapters import as_model

        init_fn, apply_fn = as_model(init_fn)
    if not callable(init_fn):
        raise TypeError(f"`init_fn` must be callable, got {init_fn!r}.")
    return init_fn, apply_fn, key, n_samples


def monte_carlo_kernel_fn(
    init_fn: Callable | Any,
    apply_fn: Callable | None = None,
    key: Any = None,
    n_samples: int | Iterable[int] | None = None,
    batch_size: int = 0,
    device_count: int = -1,
    store_on_device: bool = True,
    trace_axes: int | tuple[int, ...] = (-1,),
    diagonal_axes: int | tuple[int, ...] = (),
    vmap_axes: Any = None,
    implementation: NtkImplementation | int = NtkImplementation.AUTO,
) -> Callable:
    """Returns ``kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)``: Monte Carlo
    estimates of the NNGP and NTK, averaged over ``n_samples`` initialisations.

    Args:
      init_fn: ``init_fn(key, input_shape) -> (output_shape, params)``; or a framework
        model (Flax, Haiku, Equinox, stax pair), with ``apply_fn`` omitted.
      apply_fn: ``apply_fn(params, x, **kwargs) -> output pytree``.
      key: PRNG key. Sample ``s`` uses neural-tangents' key schedule, so the same key
        gives the same estimate (see :mod:`mcntk._sampler`).
      n_samples: a positive int; or an iterable of them, in which case ``kernel_fn``
        returns a generator yielding the estimate at each distinct count in
        ascending order, computed incrementally.
      batch_size: compute the kernel in blocks of ``batch_size`` x1 and x2 examples
        (0: one block). Any size works; for deterministic models whose examples
        are independent the result does not depend on it (docs/axes.md).
      device_count: accepted with neural-tangents' meaning (-1: all devices, 0: run
        sequentially); computation currently runs on the default device.
      store_on_device: ``False`` returns NumPy arrays and moves each finished block
        to host memory.
      trace_axes, diagonal_axes: the axes rule, see docs/axes.md.
      vmap_axes: batch axes of the model, see docs/axes.md.
      implementation: an :class:`NtkImplementation`; AUTO picks by cost per shape.

    Returns:
      ``kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)``. ``get`` is None (an
      ``EmpiricalKernel(nngp, ntk)``), a kernel name (an array) or a tuple of names
      (a ``MonteCarloKernel`` namedtuple). ``x2=None`` means ``x2 = x1``. Keyword
      arguments go to ``apply_fn`` (2-tuples are split between x1 and x2); ``rng``
      is supplied per sample when ``apply_fn`` accepts it.

    Example:
      >>> import jax, mcntk
      >>> from jax.example_libraries import stax
      >>> init_fn, apply_fn = stax.serial(stax.Dense(16), stax.Relu, stax.Dense(1))
      >>> kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 8)
      >>> kernel_fn(jax.numpy.ones((3, 2)), None, 'ntk').shape
      (3, 3)
    """
    init_fn, apply_fn, key, n_samples = _resolve_model(init_fn, apply_fn, key, n_samples)
    key = check_key(key)
    counts, as_generator = canonicalize_n_samples(n_samples)
    batch_size = _grid.check_batch_size(batch_size)
    check_device_count(device_count)
    if not isinstance(store_on_device, (bool, np.bool_)):
        raise TypeError(f"`store_on_device` must be a bool, got {store_on_device!r}.")
    spec = KernelSpec(apply_fn, trace_axes, diagonal_axes, vmap_axes, implementation)
    estimator = _Estimator(init_fn, spec, key, batch_size, bool(store_on_device))

    def kernel_fn(x1: PyTree, x2: PyTree | None = None, get: Any = None, **apply_fn_kwargs):
        names, single = canonicalize_get(get)
        if "rng" in apply_fn_kwargs:
            raise ValueError("`rng` is supplied per sample from `key` by the Monte Carlo "
                             "estimator; do not pass it to kernel_fn.")
        estimates = estimator.estimates(x1, x2, names, counts, apply_fn_kwargs)

        def pack(values):
            return pack_result(values, names, single, "MonteCarloKernel", asked_none=get is None)

        if as_generator:
            return (pack(v) for v in estimates)
        (result,) = tuple(estimates)
        return pack(result)

    return kernel_fn


def _hashable(key: Any) -> Any:
    """``key`` if it can key a cache (static keyword values may not be hashable), else None."""
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _Estimator:
    """Runs the sampler over the blocks of the grid and accumulates the sums."""

    def __init__(self, init_fn, spec: KernelSpec, key, batch_size: int, on_device: bool):
        self.init_fn, self.spec, self.key = init_fn, spec, key
        self.batch_size, self.on_device = batch_size, on_device
        self.rng = _apply.accepts_rng(spec.apply_fn)
        self._runners: dict[Any, _sampler.Runner] = {}

    def _one_sample(self, names, impl, rebuild, options=None):
        def one_sample(params, k1, k2, x1, x2, dyn):
            kw1, kw2 = rebuild(dyn)
            if self.rng:
                kw1, kw2 = {**kw1, "rng": k1}, {**kw2, "rng": k2}
            return self.spec.kernels(names, params, x1, x2, kw1, kw2, impl,
                                     options or ntk.DEFAULT_OPTIONS)
        return one_sample

    def _runner(self, names, x1b, x2b, dyn, rebuild, static, x1, params_struct):
        cache_key = _hashable((names, auto.signature(x1b, x2b, dyn), x2b is None,
                               auto.signature(x1), static))
        if cache_key is not None and cache_key in self._runners:
            return self._runners[cache_key]

        def make_fn(impl, options):
            fn = self._one_sample(names, impl, rebuild, options)
            return lambda p, k, a, b, d: fn(p, k, k, a, b, d)

        impl = self.spec.resolve(names, make_fn, (params_struct, self.key, x1b, x2b, dyn),
                                 cache_key)
        def init(key, d):
            return _apply.call_init(self.init_fn, key, x1, rebuild(d)[0])

        runner = _sampler.make_runner(init, self._one_sample(names, impl, rebuild))
        if cache_key is not None:
            self._runners[cache_key] = runner
        return runner

    def _plan(self, x1, x2, kw1, params_struct):
        """The grid plan and, per output leaf, the permutation transposing a block."""
        kw = {**kw1, "rng": self.key} if self.rng else kw1
        out = jax.eval_shape(lambda p, x: self.spec.apply_fn(p, x, **kw), params_struct, x1)
        rules = [AxesRule(self.spec.axes.trace, self.spec.axes.diagonal, len(o.shape))
                 for o in jax.tree.leaves(out)]
        perms = [r.swap_perm() for r in rules]
        n1 = _grid.batch_length(x1, "x1") if self.batch_size else 1
        n2 = n1 if x2 is None or not self.batch_size else _grid.batch_length(x2, "x2")
        if self.batch_size == 0 or self.batch_size >= max(n1, n2):
            return _grid.GridPlan(1, 1, 0, x2 is None, False), perms
        diag = {0 in r.diagonal for r in rules}
        wrong = [o.shape for o in jax.tree.leaves(out) if not o.shape or o.shape[0] != n1]
        if len(diag) != 1 or wrong:
            raise ValueError(
                f"`batch_size`={self.batch_size} splits inputs along axis 0 and needs every "
                f"output leaf to have its {n1} examples on axis 0, each either paired or diagonal "
                f"(`diagonal_axes`={self.spec.axes.diagonal}); got output shapes "
                f"{[o.shape for o in jax.tree.leaves(out)]}. Use `batch_size`=0.")
        if any(0 in r.trace for r in rules):
            raise ValueError(f"`trace_axes`={self.spec.axes.trace} traces the batch axis 0, "
                             f"which cannot be split into batches; use `batch_size`=0.")
        # with an rng, blocks (i, j) and (j, i) see different dropout keys: no symmetry
        plan = _grid.GridPlan(n1, n2, self.batch_size, x2 is None and not self.rng, diag.pop())
        return plan, perms

    def estimates(self, x1, x2, names, counts, kwargs) -> Iterator[dict[str, PyTree]]:
        x1 = check_inputs(x1, "x1")
        x2 = None if x2 is None else check_inputs(x2, "x2")
        if self.batch_size:  # before init_fn sees the shapes
            _grid.batch_length(x1, "x1")
            if x2 is not None:
                _grid.batch_length(x2, "x2")
        x2, kw1, kw2 = _apply.prepare(x1, x2, kwargs)
        dyn, rebuild, static = _apply.partition_static((kw1, kw2))
        params_struct = jax.eval_shape(
            lambda k, d: _apply.call_init(self.init_fn, k, x1, rebuild(d)[0]), self.key, dyn)
        plan, perms = self._plan(x1, x2, kw1, params_struct)
        if plan.single:
            x1s, x2s = [x1], [x2]
        else:
            x1s = plan.split(x1, True)
            x2s = x1s if x2 is None else plan.split(x2, False)
        jobs = []
        for i, j in plan.blocks():
            x2b = None if (x2 is None and i == j) else x2s[j]
            # neural-tangents' rule per block: x2's dropout key is x1's when the blocks are equal
            same = jnp.asarray(_apply.same_inputs(x1s[i], x2b) if self.rng else True)
            runner = self._runner(names, x1s[i], x2b, dyn, rebuild, static, x1, params_struct)
            jobs.append(((i, j), runner, x1s[i], x2b, same))
        return self._loop(jobs, plan, perms, counts, dyn)

    def _loop(self, jobs, plan, perms, counts, dyn):
        accs = {}
        key, done = self.key, 0
        for target in counts:
            n = jnp.asarray(target - done, jnp.int32)
            next_key = key
            for ij, runner, a, b, same in jobs:
                acc = accs.get(ij)
                if acc is None:
                    acc = runner.zeros(key, a, b, same, dyn)
                acc, next_key = runner.run(acc, key, n, a, b, same, dyn)
                accs[ij] = acc if self.on_device else jax.device_get(acc)
            key, done = next_key, target
            full = {name: plan.assemble({ij: v[name] for ij, v in accs.items()}, perms,
                                        self.on_device)
                    for name in next(iter(accs.values()))}
            # the mean, in the kernels' own dtype (sums are kept in at least float32)
            dtypes = jobs[0][1].shapes(key, jobs[0][2], jobs[0][3], jobs[0][4], dyn)
            yield jax.tree.map(lambda v, d, t=target: (v / t).astype(d.dtype), full, dtypes)
