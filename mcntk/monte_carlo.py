"""``monte_carlo_kernel_fn``: NNGP and NTK of a finite network averaged over
random initialisations, with neural-tangents' arguments and numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcntk import _accumulate, _apply, _grid, _inputs, _placement, _sampler, ntk
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
    *,
    mesh: jax.sharding.Mesh | None = None,
    sample_axes: str | tuple[str, ...] | None = None,
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
      device_count: the devices that compute the estimate: -1 all devices, 0 one
        device, ``k`` the first ``k`` devices of ``jax.devices()``. Blocks of the grid
        and samples are spread over them (docs/sharding.md); the estimate does not
        depend on it (up to the order of floating-point sums).
      store_on_device: ``False`` returns NumPy arrays and moves each finished block
        to host memory.
      trace_axes, diagonal_axes: the axes rule, see docs/axes.md.
      vmap_axes: batch axes of the model, see docs/axes.md.
      implementation: an :class:`NtkImplementation`; AUTO picks by cost per shape.
      mesh: a ``jax.sharding.Mesh`` whose devices compute the estimate (instead of
        ``device_count``); any axis names and shape.
      sample_axes: names of ``mesh`` axes over which samples are split (blocks go
        over the other axes). Default: blocks over as many devices as there are
        blocks, samples over the rest (docs/sharding.md).

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
    devices = _placement.select(device_count, mesh, sample_axes)
    if not isinstance(store_on_device, (bool, np.bool_)):
        raise TypeError(f"`store_on_device` must be a bool, got {store_on_device!r}.")
    spec = KernelSpec(apply_fn, trace_axes, diagonal_axes, vmap_axes, implementation)
    estimator = _Estimator(init_fn, spec, key, batch_size, bool(store_on_device), devices)

    def kernel_fn(x1: PyTree, x2: PyTree | None = None, get: Any = None, **apply_fn_kwargs):
        names, single = canonicalize_get(get)
        estimates = estimator.estimates(x1, x2, names, counts, apply_fn_kwargs)

        def pack(result):
            values, treedef = result
            return pack_result(values, names, single, "MonteCarloKernel", treedef,
                               asked_none=get is None)

        if as_generator:
            return (pack(v) for v in estimates)
        (result,) = tuple(estimates)
        return pack(result)

    return kernel_fn


class _Estimator:
    """Wires the stages: inputs -> grid plan -> placement -> programs -> moments."""

    samples_per_step = 1  # samples vmapped per loop step on a device

    def __init__(self, init_fn, spec: KernelSpec, key, batch_size: int, on_device: bool,
                 devices: _placement.Devices):
        self.init_fn, self.spec, self.key = init_fn, spec, key
        self.batch_size, self.on_device, self.devices = batch_size, on_device, devices
        self.rng = _apply.accepts_rng(spec.apply_fn)
        self.options = ntk.Options(platform=devices.platform)
        self._programs: dict[Any, _sampler.Program] = {}

    # --- shapes and the plan -------------------------------------------------------

    def _init(self, side1: _inputs.Side) -> Callable:
        """``init(key, dyn1) -> params`` for inputs like x1 (with x1's keyword arrays)."""
        def init(key, dyn):
            return _apply.call_init(self.init_fn, key, side1.x, side1.rebuild(dyn))
        return init

    def _apply_for_shapes(self, params, x, **kwargs):
        if self.rng:
            kwargs = {**kwargs, "rng": self.key}
        return self.spec.apply_fn(params, x, **kwargs)

    def _plan(self, call: _inputs.Call, params_struct) -> tuple[_grid.GridPlan, list, Any]:
        """The grid plan, the layout of each output leaf's kernel and the output treedef."""
        side1 = call.side1
        out, out2 = _inputs.output_shapes(self._apply_for_shapes, params_struct, side1,
                                          call.side2)
        leaves, treedef = jax.tree.flatten(out)
        rules = self.spec.axes.rules(out, out2)
        vmap = self.spec.vmap_axes
        batch_axes = _inputs.output_batch_axes(self._apply_for_shapes, params_struct, side1,
                                               None if vmap is None else vmap.out_axes)
        if batch_axes is not None:
            _inputs.warn_if_traced_examples(rules, batch_axes, self.spec.axes.trace)
        n1 = side1.size
        n2 = n1 if call.symmetric else call.side2.size
        if self.batch_size == 0 or n1 is None or self.batch_size >= max(n1, n2 or 0):
            plan = _grid.GridPlan(n1 or 1, n2 or 1, 0, call.symmetric, not self.rng, False)
            return plan, [None] * len(leaves), treedef
        self._check_splittable(call, [o.shape for o in leaves], rules, batch_axes)
        layouts = [_grid.layout(r, a) for r, a in zip(rules, batch_axes)]
        diagonal = {w.diagonal for w in layouts}
        if len(diagonal) != 1:
            raise ValueError(
                f"`batch_size`={self.batch_size} needs the axis holding the examples to be "
                f"diagonal in every output leaf or in none; `diagonal_axes`="
                f"{self.spec.axes.diagonal} makes it diagonal in some output leaves only "
                f"(output shapes {[o.shape for o in leaves]}).")
        # with an rng, blocks (i, j) and (j, i) see different dropout keys: no mirroring
        plan = _grid.GridPlan(n1, n2, self.batch_size, call.symmetric, not self.rng,
                              diagonal.pop())
        return plan, layouts, treedef

    def _check_splittable(self, call, shapes, rules, batch_axes) -> None:
        b = self.batch_size
        if batch_axes is None or None in batch_axes:
            raise ValueError(
                f"`batch_size`={b} cuts the examples into blocks, so it needs to know which "
                f"output axis holds the examples, and could not tell for output shapes "
                f"{shapes} (the output does not change with the number of examples in the way "
                f"expected). Declare it with `vmap_axes`=(in_axes, out_axes, kwargs_axes), "
                f"or use `batch_size`=0.")
        for rule, a in zip(rules, batch_axes):
            if a in rule.trace:
                raise ValueError(
                    f"`trace_axes`={self.spec.axes.trace} traces output axis {a}, the axis "
                    f"that holds the examples (output shapes {shapes}), so the kernel has no "
                    f"example axes to cut into `batch_size`={b} blocks. To get one entry per "
                    f"pair of examples, pass `trace_axes`=().")
        for side, name in ((call.side1, "x1"), (call.side2, "x2")):
            if side is None:
                continue
            for kw, a, v in zip(side.names, side.dyn_axes, side.dyn):
                if a == _inputs.UNKNOWN:
                    raise ValueError(
                        f"keyword argument `{kw}` (an array of shape {jnp.shape(v)}) has no "
                        f"known batch axis, so `batch_size`={b} cannot give each block its "
                        f"rows. Pass it as a 2-tuple ({kw}_for_x1, {kw}_for_x2) (rows on axis "
                        f"0), declare its axis in `vmap_axes`=(in_axes, out_axes, {{'{kw}': "
                        f"axis}}), or, if it is the same for every example, bind it into "
                        f"apply_fn (functools.partial).")
                if a is not None and jnp.shape(v)[a] != side.size:
                    raise ValueError(
                        f"keyword argument `{kw}` has {jnp.shape(v)[a]} rows on its batch axis "
                        f"{a} (shape {jnp.shape(v)}), but `{name}` has {side.size} examples; "
                        f"`batch_size`={b} needs one row per example.")

    # --- programs ----------------------------------------------------------------

    def _one_sample(self, names, impl, options):
        def one_sample(params, k1, k2, b1: _inputs.Side, b2: _inputs.Side | None):
            kw1 = b1.rebuild(b1.dyn)
            kw2 = kw1 if b2 is None else b2.rebuild(b2.dyn)
            if self.rng:
                kw1, kw2 = {**kw1, "rng": k1}, {**kw2, "rng": k2}
            return self.spec.kernels(names, params, b1.x, None if b2 is None else b2.x,
                                     kw1, kw2, impl, options)
        return one_sample

    def _program(self, names, call, blocks1, blocks2, count, params_struct):
        placement = _placement.place(self.devices, count)
        per_row = max(1, -(-count // placement.db))
        if not self.on_device:
            per_row = 1  # one block per device at a time; the rest waits on the host
        sig = auto.signature(blocks1.first_leaves(),
                             None if blocks2 is None else blocks2.first_leaves())
        cache_key = (names, sig, blocks2 is None, call.static, per_row, self.samples_per_step,
                     tuple(d.id for d in placement.mesh.devices.flat), placement.mesh.devices.shape,
                     auto.signature(call.side1.x, call.side1.dyn))
        cache_key = cache_key if call.static is not None else None
        if cache_key is not None and cache_key in self._programs:
            return self._programs[cache_key]

        def make_fn(impl, options):
            fn = self._one_sample(names, impl, options)

            def one(p, k, leaves1, leaves2):
                b2 = None if blocks2 is None else blocks2.rebuild(leaves2)
                return fn(p, k, k, blocks1.rebuild(leaves1), b2)
            return one

        first2 = None if blocks2 is None else blocks2.first_leaves()
        impl = self.spec.resolve(names, make_fn, (params_struct, self.key,
                                                  blocks1.first_leaves(), first2),
                                 cache_key and cache_key[:4])
        program = _sampler.make_program(self._init(call.side1),
                                        self._one_sample(names, impl, self.options),
                                        placement, blocks1, blocks2, per_row,
                                        call.side1.dyn, self.samples_per_step)
        if cache_key is not None:
            self._programs[cache_key] = program
        return program

    # --- the run -------------------------------------------------------------------

    def estimates(self, x1, x2, names, counts, kwargs) -> Iterator[tuple[dict, Any]]:
        call = _inputs.prepare(x1, x2, kwargs, self.spec.vmap_axes)
        if self.batch_size:
            _inputs.check_batchable(call.side1, "x1")
            if call.side2 is not None:
                _inputs.check_batchable(call.side2, "x2")
        params_struct = jax.eval_shape(self._init(call.side1), self.key, call.side1.dyn)
        plan, layouts, treedef = self._plan(call, params_struct)
        blocks1 = plan.split(call.side1, True)
        blocks2 = blocks1 if call.symmetric else plan.split(call.side2, False)
        waves = []
        for symmetric, pairs in plan.groups().items():
            b2 = None if symmetric else blocks2
            program = self._program(names, call, blocks1, b2, len(pairs), params_struct)
            waves.extend(self._waves(program, plan, pairs, blocks1, b2, call))
        return self._loop(plan, waves, layouts, treedef, counts)

    def _waves(self, program, plan, pairs, blocks1, blocks2, call):
        """The calls of ``program`` that cover ``pairs``: one, or one per ``db`` blocks
        when finished blocks go to the host."""
        placement = program.placement
        size = len(pairs) if self.on_device else placement.db
        out = []
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            order, valid = placement.layout(len(chunk))
            chosen = [chunk[o] for o in order]
            same = [self._same(blocks1, blocks2, i, j) for i, j in chosen]
            inputs = _sampler.ProgramInputs(
                np.asarray(chosen, np.int32), valid, np.asarray(same, bool), blocks1.leaves,
                None if blocks2 is None else blocks2.leaves, call.side1.dyn)
            rep = placement.replicated()
            inputs = inputs._replace(
                pairs=_placement.put(inputs.pairs, placement.sharding(_placement.BLOCKS)),
                valid=_placement.put(inputs.valid, placement.sharding(_placement.BLOCKS)),
                same=_placement.put(inputs.same, placement.sharding(_placement.BLOCKS)),
                blocks1=_placement.put(inputs.blocks1, rep),
                blocks2=None if blocks2 is None else _placement.put(inputs.blocks2, rep),
                init_args=_placement.put(inputs.init_args, rep))
            slots = [None] * len(order)
            for pos, (o, v) in enumerate(zip(order, valid)):
                if v:
                    slots[pos] = pairs.index(chunk[o])  # position in the group
            out.append(_Wave(program, inputs, [chunk[o] if v else None
                                               for o, v in zip(order, valid)]))
        return out

    def _same(self, blocks1, blocks2, i, j) -> bool:
        """neural-tangents' rule per block: f(x2) gets x1's dropout key for equal blocks."""
        if not self.rng or blocks2 is None:
            return True
        nx = len(blocks1.side.x_axes)
        get = lambda b, k: [v[k] if s else v for v, s in
                            zip(b.leaves[:nx], b.batched[:nx])]
        return _inputs.numpy_equal(get(blocks1, i), get(blocks2, j))

    def _loop(self, plan, waves, layouts, treedef, counts):
        states = [None] * len(waves)
        key, done = self.key, 0
        for target in counts:
            n = jnp.asarray(target - done, jnp.int32)
            next_key = key
            for w, wave in enumerate(waves):
                moments = states[w]
                if moments is None:
                    moments = wave.zeros()
                elif not self.on_device:
                    moments = _placement.put(moments, wave.moments_sharding())
                rep = wave.program.placement.replicated()
                moments, failure, next_key = wave.program.advance(
                    moments, _placement.put(key, rep), _placement.put(n, rep), wave.inputs)
                _check_failure(failure, done, wave)
                states[w] = moments if self.on_device else jax.device_get(moments)
            key, done = next_key, target
            yield self._finalize(plan, waves, states, layouts, treedef)

    def _finalize(self, plan, waves, states, layouts, treedef):
        xp = jnp if self.on_device else np
        by_pair: dict[tuple[int, int], dict] = {}
        for wave, moments in zip(waves, states):
            merged = _accumulate.merge_axis(moments, 0)
            means = _accumulate.mean(merged, wave.program.kernel_shapes)
            if not self.on_device:
                means = jax.device_get(means)
            for pos, pair in enumerate(wave.pairs):
                if pair is not None:
                    by_pair[pair] = jax.tree.map(lambda v, pos=pos: v[pos], means)
        order = plan.pairs()
        out = {}
        for name in by_pair[order[0]]:
            per_leaf = [jax.tree.leaves(by_pair[pair][name]) for pair in order]
            leaves = []
            for i, where in enumerate(layouts):
                stacked = xp.stack([blocks[i] for blocks in per_leaf])
                full = stacked[0] if where is None else plan.assemble(xp, stacked, where)
                if self.on_device:
                    full = _placement.put(full, _placement.output_sharding(self.devices,
                                                                           full.shape))
                leaves.append(full)
            out[name] = jax.tree.unflatten(treedef, leaves)
        return out, treedef


class _Wave(NamedTuple):
    """One call of a program: its inputs and the block of each stacked position."""

    program: _sampler.Program
    inputs: _sampler.ProgramInputs
    pairs: list  # (i, j) per stacked position, None for padding

    def moments_sharding(self):
        p = self.program.placement
        return p.sharding(_placement.SAMPLES, _placement.BLOCKS)

    def zeros(self):
        p = self.program.placement
        moments = _accumulate.init(self.program.kernel_shapes, False, (p.ds, len(self.pairs)))
        return _placement.put(moments, self.moments_sharding())


def _check_failure(failure, done, wave) -> None:
    sample = np.asarray(failure.sample)
    if (sample == _sampler.NO_FAILURE).all():
        return
    where = np.unravel_index(np.argmin(sample), sample.shape)
    block = wave.pairs[int(np.asarray(failure.block)[where])]
    raise FloatingPointError(
        f"sample {done + int(sample[where])} (0-based) gave a non-finite kernel (NaN or Inf) "
        f"in block {block} of the grid; it was not added to the estimate.")
