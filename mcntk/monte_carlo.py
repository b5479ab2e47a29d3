"""``monte_carlo_kernel_fn``: NNGP and NTK of a finite network averaged over
random initialisations, with neural-tangents' arguments and numbers."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcntk import (
    _accumulate,
    _apply,
    _arguments,
    _budget,
    _checkpoint,
    _draws,
    _grid,
    _inputs,
    _placement,
    _planning,
    _run,
    _sampler,
    ntk,
)
from mcntk._types import Estimate, NtkImplementation, PyTree, canonicalize_get, pack_result
from mcntk.empirical import KernelSpec
from mcntk.ntk import auto


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
    stderr: bool = False,
    rtol: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 64,
    progress: bool | None = None,
    detect_vmap_axes: bool = True,
    memory_budget: int | None = None,
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
      store_on_device: ``True`` returns ``jax.Array`` kernels laid out over the devices
        used; ``False`` returns NumPy arrays, moving each finished block to host
        memory. With several processes, True returns a global ``jax.Array`` and False
        the full NumPy kernel on every process (docs/sharding.md).
      trace_axes, diagonal_axes: the axes rule, see docs/axes.md.
      vmap_axes: batch axes of the model, see docs/axes.md.
      implementation: an :class:`NtkImplementation`; AUTO picks by cost per shape.
      mesh: a ``jax.sharding.Mesh`` whose devices compute the estimate (instead of
        ``device_count``); any axis names and shape.
      sample_axes: names of ``mesh`` axes over which samples are split (blocks go
        over the other axes). Default: as many block rows as keep each device's work
        within 10% of an even split, samples over the rest (docs/sharding.md).
      stderr: ``True`` returns each kernel as an :class:`mcntk.Estimate`
        ``(mean, stderr, n_samples)``: ``mean`` is the array returned without it,
        ``stderr`` the standard error of the mean per entry. See docs/long_runs.md
        for these options.
      rtol: stop at the first boundary (below) where every returned kernel has
        ``max(stderr) <= rtol * max(|mean|)``; ``n_samples`` is then the ceiling
        (a generator stops likewise). Needs ``stderr=True``, which reports the count.
      checkpoint_dir: a directory where the run state is committed atomically
        (orbax-checkpoint, ``pip install "mcntk[checkpoint]"``); calling the kernel
        function again, here or in a new process, resumes from the last commit.
        A checkpoint of another computation is refused
        (:class:`mcntk.errors.CheckpointMismatchError`).
      checkpoint_every: samples between boundaries: commits of ``checkpoint_dir``,
        tests of ``rtol`` and updates of the bar's standard error. Default 64: a
        commit costs tens of milliseconds, and 64 is a multiple of any power-of-two
        number of devices splitting samples, which keeps the estimate bitwise equal
        to a run without boundaries.
      progress: a tqdm bar on stderr (``pip install "mcntk[progress]"``): None shows
        it when stderr is a terminal or in a notebook, True always, False never.
      detect_vmap_axes: with ``vmap_axes=None``, compute the NTK from per-example
        derivatives when the model provably treats its examples independently (an
        analysis of its jaxpr, see docs/axes.md); False never does. Each call
        signature's decision is in ``kernel_fn.independence``.
      memory_budget: bytes per device that a call may use (None: no limit). With
        ``batch_size=0`` the first block size whose estimated peak fits among all
        ``n`` examples (one block), ``n/2``, ``n/4``, ... is used; with
        ``batch_size > 0`` that size is checked and a ValueError names one that fits.
        The estimate is XLA's memory analysis of one block's compiled one-sample
        program plus the kernel's accumulators
        (:mod:`mcntk._budget`); each call signature's choice is in
        ``kernel_fn.block_sizes``. On GPUs and TPUs the budget (without one, in a
        single process: half the memory the device reports) also sets how many
        samples a device draws and computes together, vmapped, per step (at most 16;
        one on CPUs); each program's choice is in ``kernel_fn.samples_per_step``.

    Returns:
      ``kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)``. ``get`` is None (an
      ``EmpiricalKernel(nngp, ntk)``), a kernel name (an array) or a tuple of names
      (a ``MonteCarloKernel`` namedtuple). ``x2=None`` means ``x2 = x1``. Keyword
      arguments go to ``apply_fn`` (2-tuples are split between x1 and x2); ``rng``
      is supplied per sample when ``apply_fn`` accepts it. A sample whose kernel
      has NaN or Inf raises :class:`mcntk.errors.NonFiniteSampleError` before it
      enters the estimate.

    Example:
      >>> import jax, mcntk
      >>> from jax.example_libraries import stax
      >>> init_fn, apply_fn = stax.serial(stax.Dense(16), stax.Relu, stax.Dense(1))
      >>> kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 8)
      >>> kernel_fn(jax.numpy.ones((3, 2)), None, 'ntk').shape
      (3, 3)
    """
    init_fn, apply_fn, key, n_samples = _resolve_model(init_fn, apply_fn, key, n_samples)
    key = _arguments.check_key(key)
    counts, as_generator = _arguments.canonicalize_n_samples(n_samples)
    batch_size = _grid.check_batch_size(batch_size)
    devices = _placement.select(device_count, mesh, sample_axes)
    if not isinstance(store_on_device, (bool, np.bool_)):
        raise TypeError(f"`store_on_device` must be a bool, got {store_on_device!r}.")
    spec = KernelSpec(apply_fn, trace_axes, diagonal_axes, vmap_axes, implementation,
                      detect_vmap_axes)
    run = _run.check_options(stderr, rtol, checkpoint_dir, checkpoint_every, progress)
    estimator = _Estimator(init_fn, spec, key, batch_size, bool(store_on_device), devices,
                           _budget.check_budget(memory_budget))

    def kernel_fn(x1: PyTree, x2: PyTree | None = None, get: Any = None, **apply_fn_kwargs):
        names, single = canonicalize_get(get)
        estimates = estimator.estimates(x1, x2, names, counts, apply_fn_kwargs, run)

        def pack(result):
            values, treedef = result
            return pack_result(values, names, single, "MonteCarloKernel", treedef,
                               asked_none=get is None)

        if as_generator:
            return (pack(v) for v in estimates)
        (result,) = tuple(estimates)
        return pack(result)

    kernel_fn.independence = spec.independence
    kernel_fn.auto_choices = spec.auto_choices
    kernel_fn.block_sizes = estimator.block_sizes
    kernel_fn.samples_per_step = estimator.samples_per_step
    return kernel_fn


class _Estimator:
    """Wires the stages: inputs -> grid plan -> placement -> programs -> moments."""

    def __init__(self, init_fn, spec: KernelSpec, key, batch_size: int, on_device: bool,
                 devices: _placement.Devices, memory_budget: int | None = None):
        self.init_fn, self.spec, self.key = init_fn, spec, key
        self.batch_size, self.on_device, self.devices = batch_size, on_device, devices
        self.rng = _apply.accepts_rng(spec.apply_fn)
        self.planner = _planning.Planner(init_fn, spec, key, self.rng)
        self.options = ntk.Options(platform=devices.platform)
        self._programs: dict[Any, _sampler.Program] = {}
        self._assemblers: dict[Any, Callable] = {}  # jitted finalize per plan and layout
        self.memory_budget = memory_budget
        self.block_sizes: dict[Any, _budget.BlockChoice] = {}  # under memory_budget
        self.samples_per_step: dict[Any, int] = {}  # per program signature

    # --- programs ----------------------------------------------------------------

    def _one_sample(self, names, impl, options, vmap_axes=None):
        def one_sample(params, k1, k2, b1: _inputs.Side, b2: _inputs.Side | None):
            kw1 = b1.rebuild(b1.dyn)
            kw2 = kw1 if b2 is None else b2.rebuild(b2.dyn)
            if self.rng:
                kw1, kw2 = {**kw1, "rng": k1}, {**kw2, "rng": k2}
            return self.spec.kernels(names, params, b1.x, None if b2 is None else b2.x,
                                     kw1, kw2, impl, options, vmap_axes)
        return one_sample

    def _per_example_axes(self, names, call, blocks1, blocks2, params_struct):
        """The NTK's per-example axes for blocks like these (declared or detected)."""
        if "ntk" not in names:
            return None
        sides = [blocks1.first()] + ([] if blocks2 is None else [blocks2.first()])
        key = (auto.signature([(s.x, s.dyn) for s in sides], params_struct),
               tuple(str(a) for s in sides for a in s.dyn_axes), call.static)
        return self.spec.per_example_axes(key if call.static is not None else None,
                                          params_struct, sides, self.key if self.rng else None)

    def _reuse(self, pairs) -> bool:
        """Whether two-sided blocks ``pairs`` compute x1's part once per grid row: rows
        of several blocks, run together on the devices (:mod:`mcntk._staging`)."""
        return self.on_device and len({i for i, _ in pairs}) < len(pairs)

    def _vmaps_samples(self) -> bool:
        """Whether a device may compute several samples per loop step: not on CPUs, where
        it measured no faster (``benchmarks/RESULTS.md``, "Samples per step")."""
        return self.devices.platform != "cpu"

    def _per_step(self, names, call, blocks1, blocks2, params_struct, placement, reuse,
                  samples, all_blocks, key) -> tuple[int, Any]:
        """Samples vmapped per loop step on each device and its record key in
        ``kernel_fn.samples_per_step`` (:func:`_budget.samples_per_step`). One on CPUs,
        with ``reuse``, keys other than threefry (vmapped, ``rbg`` bits differ) and the
        model's own grouped convolutions (see docs/implementations.md)."""
        share = min(-(-samples // placement.ds), _budget.MOST_PER_STEP)
        key = None if key is None else key + (share,)
        if key is not None and key in self.samples_per_step:
            return self.samples_per_step[key], key
        budget = self.memory_budget or _budget.device_budget(placement.mesh.devices.flat[0])
        per_step = 1
        if (share > 1 and budget is not None and not reuse and self._vmaps_samples()
                and _arguments.is_threefry(self.key)):
            forward, args = self._block_kernel(("nngp",), call, blocks1, blocks2,
                                               params_struct)[2:]
            if not _sampler.has_convolution(jax.make_jaxpr(forward)(*args), grouped=True):
                one = self._block_kernel(names, call, blocks1, blocks2, params_struct)[2]
                peak, per_block = _budget.program_bytes(one, args)
                # the accumulators of every block of the call, with stderr's two more
                per_step = _budget.samples_per_step(peak, 3 * per_block * all_blocks, budget,
                                                    share)
        if key is not None:
            if len(self.samples_per_step) >= auto.CACHE_LIMIT:
                self.samples_per_step.clear()
            self.samples_per_step[key] = per_step
        return per_step, key

    def _program(self, names, call, blocks1, blocks2, count, params_struct, reuse=False,
                 samples=1, all_blocks=None):
        placement = _placement.place(self.devices, count)
        per_row = max(1, -(-count // placement.db))
        if not self.on_device:
            per_row = 1  # one block per device at a time; the rest waits on the host
        sig = auto.signature(blocks1.first_leaves(),
                             None if blocks2 is None else blocks2.first_leaves())
        # whether leaves are cut into stacked blocks changes the program, not the block shapes
        cut = (tuple(blocks1.batched), None if blocks2 is None else tuple(blocks2.batched))
        reuse = reuse and per_row > 1
        cache_key = (names, sig, blocks2 is None, call.static, per_row, cut, reuse,
                     tuple(d.id for d in placement.mesh.devices.flat), placement.mesh.devices.shape,
                     auto.signature(call.side1.x, call.side1.dyn))
        cache_key = cache_key if call.static is not None else None
        per_step, step_key = self._per_step(names, call, blocks1, blocks2, params_struct,
                                            placement, reuse, samples, all_blocks or count,
                                            cache_key)
        cache_key = cache_key and cache_key + (per_step,)
        if cache_key is not None and cache_key in self._programs:
            return self._programs[cache_key]

        impl, vmap = self._block_kernel(names, call, blocks1, blocks2, params_struct,
                                        cache_key and cache_key[:4])[:2]
        # Convolutions of the model (its forward program: a kernel's own vmaps turn plain
        # convolutions into grouped ones): on one device, any on a CPU (slow inside XLA
        # control flow) and grouped ones anywhere (not batchable under a mesh sharding)
        # run host-stepped.
        one, args = self._block_kernel(("nngp",), call, blocks1, blocks2, params_struct)[2:]
        forward = jax.make_jaxpr(one)(*args)
        grouped = _sampler.has_convolution(forward, grouped=True)
        options = self.options._replace(separate_sides=reuse)
        init = self.planner.init(call.side1)
        if self.devices.platform == "cpu":
            init = _draws.unrolled(init)  # the same draws, in one pass (mcntk._draws)

        def build(per_step):
            stepped = (placement.db * placement.ds == 1 and per_step == 1 and (
                grouped or (self.devices.platform == "cpu"
                            and _sampler.has_convolution(forward))))
            return _sampler.make_program(init, self._one_sample(names, impl, options, vmap),
                                         placement, blocks1, blocks2, per_row,
                                         call.side1.dyn, per_step, stepped,
                                         grouped and "ntk" in names, reuse,
                                         _sampler.dropout_key_like(self.key))

        program = build(per_step)
        if per_step > 1:
            def fell_back():  # later calls find the one-per-step program under its key
                if step_key is not None:
                    self.samples_per_step[step_key] = 1
                if cache_key is not None:
                    self._programs[cache_key[:-1] + (1,)] = program
            program = program._replace(advance=_sampler.or_one_per_step(
                program.advance, lambda: build(1).advance, fell_back))
        if cache_key is not None:
            self._programs[cache_key] = program
        return program

    def _block_kernel(self, names, call, blocks1, blocks2, params_struct, choice_key=None):
        """``(implementation, per-example axes, one, args)``: the kernels of one sample
        for one block pair, ``one(*args)`` with abstract ``args``."""
        vmap = self._per_example_axes(names, call, blocks1, blocks2, params_struct)

        def make_fn(impl, options):
            fn = self._one_sample(names, impl, options, vmap)

            def one(p, k, leaves1, leaves2):
                b2 = None if blocks2 is None else blocks2.rebuild(leaves2)
                return fn(p, k, k, blocks1.rebuild(leaves1), b2)
            return one

        first2 = None if blocks2 is None else blocks2.first_leaves()
        args = (params_struct, self.key, blocks1.first_leaves(), first2)
        impl = self.spec.resolve(names, make_fn, args, choice_key)
        return impl, vmap, make_fn(impl, self.options), args

    def _fit(self, call: _inputs.Call, names, stderr: bool) -> int:
        """The block size under ``memory_budget`` (:mod:`mcntk._budget`), once per call
        signature (recorded in ``kernel_fn.block_sizes``)."""
        sides = [call.side1] + ([] if call.symmetric else [call.side2])
        key = (auto.signature([(s.x, s.dyn) for s in sides]), call.static, names, stderr)
        if call.static is not None and key in self.block_sizes:
            return self.block_sizes[key].batch_size
        n1 = call.side1.size
        n2 = n1 if call.symmetric else call.side2.size
        n = None if n1 is None or n2 is None else max(n1, n2)
        budget = self.memory_budget

        def estimate(b):
            try:
                return self._block_peak(names, call, b, stderr)
            except ValueError as e:
                if b == self.batch_size:
                    raise
                raise ValueError(f"`memory_budget`={budget} led to blocks of {b} examples, "
                                 f"which this call cannot use: {e}") from e

        choice = _budget.choose(estimate, n, self.batch_size, budget)
        if call.static is not None:
            if len(self.block_sizes) >= auto.CACHE_LIMIT:
                self.block_sizes.clear()
            self.block_sizes[key] = choice
        return choice.batch_size

    def _block_peak(self, names, call, batch_size: int, stderr: bool) -> int:
        """Estimated peak bytes on one device when blocks hold ``batch_size`` examples:
        XLA's memory analysis of one block's one-sample kernel program, plus the
        accumulators of the whole kernel."""
        plan, _, _, params_struct = self.planner.plan(call, batch_size)
        blocks1 = plan.split(call.side1, True)
        blocks2 = blocks1 if call.symmetric else plan.split(call.side2, False)
        peak, per_block = 0, 0
        for symmetric, pairs in plan.groups().items():  # diagonal blocks of x2=None: one side
            b2 = None if symmetric else blocks2
            impl, vmap, one, args = self._block_kernel(names, call, blocks1, b2, params_struct)
            program_peak, block_bytes = _budget.program_bytes(one, args)
            kept = 0  # a row's x1 part, kept while its blocks are computed
            per_device = -(-len(pairs) // _placement.place(self.devices, len(pairs)).db)
            if not symmetric and self._reuse(pairs) and per_device > 1:
                fn = self._one_sample(names, impl, self.options._replace(separate_sides=True),
                                      vmap)
                stages = _sampler.block_stages(fn, params_struct, blocks1, b2,
                                               _sampler.dropout_key_like(self.key))
                kept = 0 if stages is None else sum(
                    math.prod(r.shape) * r.dtype.itemsize for r in stages.residuals)
            peak = max(peak, program_peak + kept)
            per_block = max(per_block, block_bytes)
        return peak + per_block * len(plan.pairs()) * (3 if stderr else 1)

    # --- the run -------------------------------------------------------------------

    def estimates(self, x1, x2, names, counts, kwargs,
                  run: _run.RunOptions | None = None) -> Iterator[tuple[dict, Any]]:
        call = _inputs.prepare(x1, x2, kwargs, self.spec.vmap_axes)
        run = _run.RunOptions() if run is None else run
        batch_size = self.batch_size
        if batch_size:
            _inputs.check_batchable(call.side1, "x1")
            if call.side2 is not None:
                _inputs.check_batchable(call.side2, "x2")
        if self.memory_budget is not None:
            batch_size = self._fit(call, names, run.stderr)
        plan, layouts, treedef, params_struct = self.planner.plan(call, batch_size)
        blocks1 = plan.split(call.side1, True)
        blocks2 = blocks1 if call.symmetric else plan.split(call.side2, False)
        if "ntk" in names:
            self.planner.check_vmap_axes(call, blocks1)
        waves = []
        for symmetric, pairs in plan.groups().items():
            b2 = None if symmetric else blocks2
            program = self._program(names, call, blocks1, b2, len(pairs), params_struct,
                                    b2 is not None and self._reuse(pairs), counts[-1],
                                    len(plan.pairs()))
            waves.extend(self._waves(program, plan, pairs, blocks1, b2, call))
        identity = (call, names, params_struct, blocks1, batch_size)
        return self._loop(plan, waves, layouts, treedef, counts, run, identity)

    def _waves(self, program, plan, pairs, blocks1, blocks2, call):
        """The calls of ``program`` that cover ``pairs``: one, or one per ``db`` blocks
        (one per block row) when finished blocks go to the host."""
        placement = program.placement
        if not self.on_device:  # each call hands its moments to the host (every process)
            program = program._replace(advance=_sampler.then_fetch(program.advance))
        leaves2 = None if blocks2 is None else blocks2.leaves
        shared = (blocks1.leaves, leaves2, call.side1.dyn)
        _placement.check_same((self.key, shared), "x1, x2, the keyword arrays or the key")
        shared = _placement.put(shared, placement.replicated())
        by_block = placement.sharding(_placement.BLOCKS)
        size = len(pairs) if self.on_device else placement.db
        out = []
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            order, valid = placement.layout(len(chunk))
            chosen = [chunk[o] for o in order]
            same = [self._same(blocks1, blocks2, i, j) for i, j in chosen]
            inputs = _sampler.ProgramInputs(
                *_placement.put((np.asarray(chosen, np.int32), valid, np.asarray(same, bool)),
                                by_block), *shared)
            out.append(_Wave(program, inputs, [c if v else None for c, v in zip(chosen, valid)]))
        return out

    def _same(self, blocks1, blocks2, i, j) -> bool:
        """neural-tangents' rule per block: f(x2) gets x1's dropout key for equal blocks."""
        if not self.rng or blocks2 is None:
            return True
        nx = len(blocks1.side.x_axes)
        get = lambda b, k: [v[k] if s else v for v, s in
                            zip(b.leaves[:nx], b.batched[:nx])]
        return _inputs.numpy_equal(get(blocks1, i), get(blocks2, j))

    def _loop(self, plan, waves, layouts, treedef, counts, run: _run.RunOptions, identity):
        """The estimates at each count (``(values, treedef)``), from :func:`_run.iterate`:
        boundaries, ``rtol``, commits and resume, the bar."""
        def finalize(state):
            means, _ = self._finalize(plan, waves, list(state.moments), layouts, treedef)
            if not run.stderr:
                return means
            errors, _ = self._finalize(plan, waves, list(state.moments), layouts, treedef,
                                       stat=_accumulate.stderr)
            estimate = lambda m, e: Estimate(m, e, state.done)
            return {name: jax.tree.map(estimate, means[name], errors[name]) for name in means}

        def on_failure(failures, state, committed):
            _sampler.raise_first_failure(failures, state.done, waves, plan, committed)

        groups = list(plan.groups().values())
        spec = _run.Run(waves, groups, self.key, counts, self.on_device, finalize, on_failure)
        if run.checkpoint_dir is None:
            return self._iterate(spec, run, None, treedef)
        like = _run.canonical_like(waves, groups, run.stderr)
        fingerprint = self._fingerprint(identity, waves, like, run)
        open_store = lambda: _checkpoint.Store(run.checkpoint_dir, fingerprint,
                                               jax.tree.leaves(like), counts)
        store = open_store()
        try:  # refuse another computation's checkpoint now, not at the first estimate
            _run.preflight(store, counts)
        finally:
            store.close()
        return self._iterate(spec, run, open_store, treedef)

    @staticmethod
    def _iterate(spec, run, open_store, treedef):
        """Runs :func:`_run.iterate` with a store opened for the run (closed after)."""
        store = None if open_store is None else open_store()
        try:
            for values, _ in _run.iterate(spec, run, store):
                yield values, treedef
        finally:
            if store is not None:
                store.close()

    def _fingerprint(self, identity, waves, like, run) -> _checkpoint.Fingerprint:
        """What the run estimates, for :mod:`mcntk._checkpoint`: the settings, key,
        inputs, parameter structure and state shapes exactly, and a probe (the first
        sample's kernels on the first block, which tell apart models of the same
        parameter structure)."""
        call, names, params_struct, blocks1, batch_size = identity
        key = self.key
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        key_part = (_run.key_data(key), str(jax.random.key_impl(key)) if typed else "raw",
                    jax.config.jax_threefry_partitionable)
        settings = (sorted(names), repr(self.spec.axes), repr(self.spec.vmap_axes),
                    batch_size, run.stderr, jax.config.jax_enable_x64)

        def side(s):
            if s is None:
                return "x2=None"
            return (str(jax.tree.structure(s.x)), jax.tree.leaves(s.x), s.names, list(s.dyn))

        inputs = (side(call.side1), side(call.side2), repr(call.static))
        structure = lambda t: (str(jax.tree.structure(t)),
                               [(v.shape, str(v.dtype)) for v in jax.tree.leaves(t)])
        probe = lambda: _checkpoint.probe_values(
            _run.probe(waves, self.key, run.stderr, self.on_device))
        return _checkpoint.Fingerprint(
            {"format": str(_checkpoint.FORMAT),
             "settings": _checkpoint.digest(settings),
             "key": _checkpoint.digest(key_part),
             "inputs": _checkpoint.digest(inputs),
             "model": _checkpoint.digest(structure(params_struct)),
             "state": _checkpoint.digest(structure(like))}, probe)

    def _finalize(self, plan, waves, states, layouts, treedef, stat=_accumulate.mean):
        """``({name: kernel pytree}, treedef)`` from the waves' moments: on the devices
        used, laid out by :func:`_placement.output_sharding` (one compiled program,
        no kernel-sized copy on every device), or NumPy arrays on every process."""
        if self.on_device:
            key = (stat, plan.n1, plan.n2, plan.b1, plan.b2, plan.symmetric, plan.mirror,
                   plan.diagonal, tuple(layouts), jax.tree.structure(states),
                   tuple((tuple(w.pairs), w.program.placement,
                          tuple(jax.tree.leaves(w.program.kernel_shapes)),
                          jax.tree.structure(w.program.kernel_shapes)) for w in waves))
            cache = self._assemblers
            if key not in cache:
                assemble = lambda states: _assemble(jnp, plan, waves, states, layouts, stat)
                shapes = jax.eval_shape(assemble, states)
                out_shardings = jax.tree.map(
                    lambda s: _placement.output_sharding(self.devices, s.shape), shapes)
                if len(cache) >= 16:
                    cache.clear()
                cache[key] = jax.jit(assemble, out_shardings=out_shardings)
            out = cache[key](states)
            if waves[0].program.placement.one_at_a_time:
                jax.block_until_ready(out)
        else:
            with jax.default_device(_placement.host_device()):
                out = _assemble(np, plan, waves, states, layouts, stat)
        return {name: jax.tree.unflatten(treedef, leaves) for name, leaves in out.items()}, treedef


class _Wave(NamedTuple):
    """One call of a program: its inputs and the block of each stacked position."""

    program: _sampler.Program
    inputs: _sampler.ProgramInputs
    pairs: list  # (i, j) per stacked position, None for padding

    def moments_sharding(self):
        p = self.program.placement
        return p.sharding(_placement.SAMPLES, _placement.BLOCKS)


def _assemble(xp, plan: _grid.GridPlan, waves, states, layouts,
              stat=_accumulate.mean) -> dict[str, list]:
    """``{name: [kernel leaf]}``: ``stat`` (the mean, or the standard error) of each
    block, assembled with ``xp`` (jnp inside a jit, or NumPy from host moments)."""
    means, position, offset = [], {}, 0
    for wave, moments in zip(waves, states):
        position.update({pair: offset + pos for pos, pair in enumerate(wave.pairs)
                         if pair is not None})
        offset += len(wave.pairs)
        m = stat(_accumulate.merge_axis(moments, 0), wave.program.kernel_shapes)
        means.append(m if xp is jnp else jax.device_get(m))
    means = jax.tree.map(lambda *v: xp.concatenate(v), *means)
    order = np.asarray([position[pair] for pair in plan.pairs()])
    out = {}
    for name, kernels in means.items():
        out[name] = [leaf[order[0]] if where is None else plan.assemble(xp, leaf[order], where)
                     for leaf, where in zip(jax.tree.leaves(kernels), layouts)]
    return out
