"""The state of a Monte Carlo run and the pure functions that produce and consume it.

A run is one explicit value, :class:`RunState`: the samples done, the key of the
next sample and the moments of every wave (a call of a compiled program over a set
of blocks, :mod:`mcntk._sampler`). :func:`start` makes it, :func:`advance` adds
samples, :func:`canonical` turns it into a form that does not depend on the
devices (the moments of each block, merged over devices) and :func:`restore` turns
that form back into a state for any placement. Checkpoints store the canonical
form, the generator and ``rtol`` read the state: one state, three users.

Boundaries (:func:`boundaries`) are where a run may commit, test ``rtol`` and
report: the requested counts, plus every multiple of ``checkpoint_every`` when a
checkpoint, ``rtol`` or a running standard error is wanted.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcntk import _accumulate, _checkpoint, _placement, _progress
from mcntk._accumulate import Moments


class RunOptions(NamedTuple):
    """The long-run options of ``monte_carlo_kernel_fn``, validated.

    Attributes:
      stderr: return :class:`mcntk.Estimate` values (tracks second moments).
      rtol: stop when every kernel has ``max(stderr) <= rtol * max(|mean|)``, or None.
      checkpoint_dir: absolute path of the checkpoint directory, or None.
      checkpoint_every: samples between boundaries (commits, ``rtol`` tests).
      progress: None (a bar if someone watches), True or False.
    """

    stderr: bool = False
    rtol: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 64
    progress: bool | None = None


def check_options(stderr: Any, rtol: Any, checkpoint_dir: Any, checkpoint_every: Any,
                  progress: Any) -> RunOptions:
    """Validates the long-run options; a checkpoint directory is created and tested."""
    if not isinstance(stderr, (bool, np.bool_)):
        raise TypeError(f"`stderr` must be a bool, got {stderr!r}.")
    if rtol is not None:
        if isinstance(rtol, (bool, np.bool_)) or not isinstance(rtol, (int, float, np.number)):
            raise TypeError(f"`rtol` must be None or a positive float, got {rtol!r}.")
        if not (math.isfinite(float(rtol)) and rtol > 0):
            raise ValueError(f"`rtol` must be None or a positive float, got {rtol!r}.")
        if not stderr:
            raise ValueError(f"`rtol`={rtol!r} stops on standard errors and reports the "
                             f"samples used in mcntk.Estimate: pass `stderr`=True with it.")
        rtol = float(rtol)
    every = _checkpoint.check_checkpoint_every(checkpoint_every)
    progress = _progress.check_progress(progress)
    directory = _checkpoint.check_dir(checkpoint_dir)
    return RunOptions(bool(stderr), rtol, directory, every, progress)


class RunState(NamedTuple):
    """A run after ``done`` samples.

    Attributes:
      done: samples added to every block.
      key: the key of sample ``done`` in the schedule (:mod:`mcntk._sampler`).
      moments: per wave, its :class:`~mcntk._accumulate.Moments` with leading axes
        ``(ds, positions)`` (host NumPy arrays when blocks are not kept on device).
    """

    done: int
    key: Any
    moments: tuple


def _zeros(wave: Any, stderr: bool) -> Moments:
    p = wave.program.placement
    shapes = wave.program.kernel_shapes
    return jax.tree.map(np.array, _accumulate.init(shapes, stderr, (p.ds, len(wave.pairs))))


def _place(moments: Moments, wave: Any, on_device: bool) -> Moments:
    return _placement.put(moments, wave.moments_sharding()) if on_device else moments


def start(waves: list, key: Any, stderr: bool) -> RunState:
    """The state before any sample: empty moments made on the devices, where
    :func:`advance` needs them (no host copy)."""
    def zeros(wave):
        p = wave.program.placement
        shapes = _accumulate.shapes_of(wave.program.kernel_shapes, stderr,
                                       (p.ds, len(wave.pairs)))
        sharding = wave.moments_sharding()
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=sharding), shapes)

    return RunState(0, key, tuple(zeros(w) for w in waves))


def advance(state: RunState, waves: list, n: int, on_device: bool) -> tuple[RunState, list]:
    """``state`` with samples ``done .. done + n - 1`` added, and each wave's
    :class:`~mcntk._sampler.Failure` (sample indices relative to ``state.done``)."""
    count = jnp.asarray(n, jnp.int32)
    moments, failures, key = [], [], state.key
    for wave, m in zip(waves, state.moments):
        if not on_device:
            m = _placement.put(m, wave.moments_sharding())
        rep = wave.program.placement.replicated()
        m, failure, key = wave.program.advance(m, _placement.put(state.key, rep),
                                               _placement.put(count, rep), wave.inputs)
        if wave.program.placement.one_at_a_time:
            jax.block_until_ready((m, failure, key))
        moments.append(m if on_device else _placement.fetch(m))
        failures.append(failure)
    return RunState(state.done + n, key, tuple(moments)), failures


def probe(waves: list, key: Any, stderr: bool, on_device: bool) -> Any:
    """The kernels of sample 0 on the first block of the first wave (a fingerprint of
    the model), computed by the run's own compiled program."""
    wave = waves[0]
    state = start(waves[:1], key, stderr)
    state, _ = advance(state, waves[:1], 1, on_device)
    total = _placement.fetch(state.moments[0].total)
    position = next(p for p, pair in enumerate(wave.pairs) if pair is not None)
    return jax.tree.map(lambda v: np.asarray(v)[0, position], total)


def _where(groups: list) -> dict:
    return {pair: (g, r) for g, pairs in enumerate(groups) for r, pair in enumerate(pairs)}


def canonical(state: RunState, waves: list, groups: list) -> list[Moments]:
    """Per group of the plan (one program each), the moments of its blocks in the
    group's order, merged over the devices that split samples: host arrays with one
    leading axis, whatever the placement."""
    where = _where(groups)
    out: list[Any] = [None] * len(groups)
    for wave, moments in zip(waves, state.moments):
        # merged on the host: eager operations on sample-sharded arrays would each be
        # a program with a collective, dispatched back to back (see
        # Placement.one_at_a_time)
        with jax.default_device(_placement.host_device()):
            merged = _placement.fetch(_accumulate.merge_axis(_placement.fetch(moments), 0))
        positions = [p for p, pair in enumerate(wave.pairs) if pair is not None]
        g = where[wave.pairs[positions[0]]][0]
        rows = [where[wave.pairs[p]][1] for p in positions]
        if out[g] is None:
            out[g] = jax.tree.map(lambda v, g=g: np.zeros((len(groups[g]),) + v.shape[1:],
                                                          v.dtype), merged)

        def put_rows(dst, src, rows=rows, positions=positions):
            dst[rows] = np.asarray(src)[positions]
            return dst

        out[g] = jax.tree.map(put_rows, out[g], merged)
    return out


def restore(canon: list[Moments], done: int, key: Any, waves: list, groups: list,
            stderr: bool, on_device: bool) -> RunState:
    """The state of :func:`canonical`'s form for these waves: each block's moments
    in the first sample slot of its position, the other slots empty. The estimate
    continues with the same samples in the same order: bitwise the uninterrupted one on
    one device; with samples split over devices the merged sums are grouped otherwise,
    which changes the result in the order of floating-point rounding."""
    where = _where(groups)
    moments = []
    for wave in waves:
        m = _zeros(wave, stderr)
        positions = [p for p, pair in enumerate(wave.pairs) if pair is not None]
        g = where[wave.pairs[positions[0]]][0]
        rows = [where[wave.pairs[p]][1] for p in positions]

        def fill(dst, src, rows=rows, positions=positions):
            dst[0, positions] = src[rows]
            return dst

        m = jax.tree.map(fill, m, canon[g])
        moments.append(_place(m, wave, on_device))
    return RunState(done, key, tuple(moments))


def canonical_like(waves: list, groups: list, stderr: bool) -> list[Moments]:
    """The shapes (ShapeDtypeStructs) of :func:`canonical`'s result."""
    where = _where(groups)
    out: list[Any] = [None] * len(groups)
    for wave in waves:
        g = where[next(p for p in wave.pairs if p is not None)][0]
        if out[g] is None:
            out[g] = _accumulate.shapes_of(wave.program.kernel_shapes, stderr,
                                           (len(groups[g]),))
    return out


def boundaries(done: int, counts: tuple[int, ...], every: int | None) -> list[int]:
    """The boundaries after ``done`` up to the largest count: the counts, and the
    multiples of ``every`` (None: counts only)."""
    ceiling = counts[-1]
    points = {c for c in counts if c > done}
    if every:
        points.update(range((done // every + 1) * every, ceiling, every))
    return sorted(points)


def accuracy(values: dict, rtol: float | None) -> tuple[bool, float]:
    """``(stop, worst)`` for estimates ``values`` (``{name: pytree of Estimate}``):
    whether every kernel has ``max(stderr) <= rtol * max(|mean|)``, and the largest
    ``max(stderr) / max(|mean|)`` over kernels (shown by the progress bar)."""
    from mcntk._types import Estimate

    stop, worst = True, 0.0
    is_estimate = lambda v: isinstance(v, Estimate)
    for tree in values.values():
        for est in jax.tree.leaves(tree, is_leaf=is_estimate):
            xp = np if isinstance(est.mean, np.ndarray) else jnp
            se = float(xp.max(est.stderr)) if np.size(est.stderr) else 0.0
            scale = float(xp.max(xp.abs(est.mean))) if np.size(est.mean) else 0.0
            ratio = se / scale if scale > 0 else (0.0 if se == 0 else math.inf)
            worst = math.nan if math.isnan(ratio) or math.isnan(worst) else max(worst, ratio)
            if rtol is None or not se <= rtol * scale:
                stop = False
    return stop, worst


def key_data(key: Any) -> np.ndarray:
    """The raw ``uint32`` data of a legacy or typed key, on the host."""
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(_placement.fetch(key))


def key_from_data(data: np.ndarray, like: Any) -> Any:
    """A key like ``like`` (legacy or typed, same implementation) from its data."""
    if jax.dtypes.issubdtype(getattr(like, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(like))
    return jnp.asarray(data, jnp.uint32)


class Run(NamedTuple):
    """Everything :func:`iterate` needs besides the options.

    Attributes:
      waves: the program calls of the grid, in order.
      groups: the blocks of each program of the grid plan (``plan.groups()``).
      key: the run's key.
      counts: the requested sample counts, ascending.
      on_device: moments stay on the devices between calls.
      finalize: ``finalize(state) -> {name: pytree}``, the estimates (Estimates when
        standard errors are tracked).
      on_failure: ``on_failure(failures, state, committed)``: raises if a wave met a
        non-finite sample.
    """

    waves: list
    groups: list
    key: Any
    counts: tuple
    on_device: bool
    finalize: Any
    on_failure: Any


def _resumed(run: Run, store: Any, options: RunOptions) -> tuple[RunState, list[int]]:
    """The newest commit that loads whole (or a fresh state), and the usable steps."""
    usable = store.check() if store is not None else []
    treedef = jax.tree.structure(canonical_like(run.waves, run.groups, options.stderr))
    for step in usable:
        commit = store.load(step)
        if commit is not None:
            return _from_commit(commit, treedef, run, options), usable
    return start(run.waves, run.key, options.stderr), usable


def _from_commit(commit: Any, treedef: Any, run: Run, options: RunOptions) -> RunState:
    canon = jax.tree.unflatten(treedef, commit.leaves)
    return restore(canon, commit.done, key_from_data(commit.key_data, run.key), run.waves,
                   run.groups, options.stderr, run.on_device)


def _replayed(run: Run, store: Any, state: RunState, usable: list[int], options: RunOptions):
    """``(values, n)`` for the requested counts the resumed state has passed, read from
    their commits; the last item tells whether ``rtol`` stopped the run there."""
    treedef = jax.tree.structure(canonical_like(run.waves, run.groups, options.stderr))
    passed = [c for c in run.counts if c <= state.done]
    if state.done and state.done not in run.counts and options.rtol is not None:
        passed.append(state.done)  # a run that rtol stopped early
    for c in passed:
        commit = store.load(c) if c != state.done and c in usable else None
        if c != state.done and commit is None:
            raise _missing_commit(store, state.done, c, usable)
        values = run.finalize(state if commit is None else _from_commit(commit, treedef, run,
                                                                        options))
        stop = options.rtol is not None and accuracy(values, options.rtol)[0]
        if c in run.counts or stop:
            yield values, c, stop
        if stop:
            return


def _missing_commit(store: Any, done: int, count: int, usable: list[int]):
    from mcntk.errors import CheckpointMismatchError

    return CheckpointMismatchError(
        f"`checkpoint_dir`={store.directory!r} holds a run of {done} samples that has no "
        f"commit at `n_samples`={count} (commits: {sorted(usable)}): the estimate at "
        f"{count} samples cannot be given. Ask for counts it holds or more samples, or "
        f"pass another `checkpoint_dir`.")


def preflight(store: Any, counts: tuple) -> None:
    """Raises :class:`~mcntk.errors.CheckpointMismatchError` now if ``store`` holds
    another computation, or no commit for a requested count below its newest."""
    usable = store.check()
    store.fingerprint.probe  # noqa: B018 - computed now, before the run's state is allocated
    if usable:
        for c in counts:
            if c < usable[0] and c not in usable:
                raise _missing_commit(store, usable[0], c, usable)


def iterate(run: Run, options: RunOptions, store: Any = None):
    """Runs to each requested count, yielding ``(values, n)``; stops early when
    ``rtol`` is met; commits to ``store`` and resumes from it.

    Boundaries are the requested counts, plus every multiple of
    ``options.checkpoint_every`` when there is a store, an ``rtol``, or a bar showing
    the standard error. Between boundaries a bar is updated every ~0.5 s
    (:class:`mcntk._progress.Pacer`), without changing the estimate.
    """
    state, usable = _resumed(run, store, options)
    committed = None if store is None else state.done
    for values, n, stop in _replayed(run, store, state, usable, options):
        yield values, n
        if stop:
            return
    if state.done >= run.counts[-1]:
        return
    blocks = sum(len(g) for g in run.groups)
    bar = _progress.bar(options.progress, run.counts[-1], state.done, blocks)
    try:
        show_se = bar is not None and options.stderr
        chunked = store is not None or options.rtol is not None or show_se
        every = options.checkpoint_every if chunked else None
        pacer = None
        if bar is not None:
            pacer = _progress.Pacer(_progress.lcm([w.program.placement.ds for w in run.waves]))
        for b in boundaries(state.done, run.counts, every):
            while state.done < b:
                n = b - state.done if pacer is None else pacer.next(b - state.done)
                new, failures = advance(state, run.waves, n, run.on_device)
                run.on_failure(failures, state, committed)
                state = new
                if pacer is not None:
                    pacer.done()
                    bar.update(state.done)
            wanted = b in run.counts
            values = run.finalize(state) if wanted or options.rtol or show_se else None
            stop, worst = False, None
            if values is not None and options.stderr:
                stop, worst = accuracy(values, options.rtol)
            if store is not None and (b % options.checkpoint_every == 0 or wanted or stop):
                canon = canonical(state, run.waves, run.groups)
                store.save(b, key_data(state.key), jax.tree.leaves(canon))
                committed = b
            if bar is not None:
                bar.update(b, worst)
            if wanted or stop:
                yield values, b
            if stop:
                return
    finally:
        if bar is not None:
            bar.close()
