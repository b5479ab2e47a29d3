"""The sampler: the key schedule and the compiled program that adds samples to the
moments of a set of blocks, spread over a placement's devices.

Sample ``s`` (0-based) of a run started from ``key`` uses::

    key, split = jax.random.split(key)              # advanced once per sample
    init_key, dropout_key = jax.random.split(split)
    params = init_fn(init_key, input_shape)[1]

and ``dropout_key`` is the ``rng`` of ``f(x1)`` (``f(x2)`` follows the rule of
:mod:`mcntk._apply`). This is neural-tangents' schedule, so the same key gives the
same estimate. ``advance(moments, key, n, ...)`` adds samples ``0 .. n-1`` counted
from ``key``, with ``n`` traced: one compilation serves any number of samples, and
a run continues from the key it returns. Inside, each device loops over its
samples (``s % ds`` is its sample column) and, per sample, over its blocks, so
the parameters of a sample are drawn once for all of its blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.sharding import SingleDeviceSharding

from mcntk import _accumulate, _grid, _staging
from mcntk._apply import second_key
from mcntk._placement import BLOCKS, SAMPLES, Placement, fetch
from mcntk._types import PyTree
from mcntk.errors import NonFiniteSampleError, NotYetImplementedError

NO_FAILURE = jnp.iinfo(jnp.int32).max

# (params, key1, key2, block1, block2_or_None) -> dict of one-sample kernels
OneSample = Callable[[PyTree, Any, Any, Any, Any], dict]


def materialized_params(init: Callable, init_key: Any, init_args: Any, live: Any) -> PyTree:
    """``init(init_key, init_args)`` (the params), computed behind a conditional.

    ``live`` is a traced bool that is always true. Without the conditional, XLA may
    fuse the element-wise tail of parameter sampling (e.g. the inverse error
    function of a normal draw) into the huge Jacobian fusions downstream and
    recompute it for every Jacobian entry: 2-3x slower on CPU. A conditional's
    result is materialised once.
    """
    draw = lambda: init(init_key, init_args)
    shapes = jax.eval_shape(draw)
    return jax.lax.cond(live, draw,
                        lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def or_one_per_step(advance: Callable, one_per_step: Callable[[], Callable],
                    fell_back: Callable[[], None]) -> Callable:
    """``advance`` (several samples per step), or, if JAX cannot trace it (a
    NotImplementedError from a batching rule: a plain convolution's Jacobian under
    vmaps of samples and examples, as of JAX 0.10.2), the program of one sample per
    step, built by ``one_per_step()`` and used from then on. Tracing fails before
    anything runs, so the call is simply made again."""
    current = [advance]

    def call(*args):
        if current[0] is advance:
            try:
                return advance(*args)
            except NotImplementedError:
                current[0] = one_per_step()
                fell_back()
        return current[0](*args)
    return call


def then_fetch(advance: Callable) -> Callable:
    """``advance`` whose moments come back as NumPy arrays on every process."""
    def run(*args):
        moments, failure, key = advance(*args)
        return fetch(moments), failure, key
    return run


def split_chain(key: Any, n: Any) -> Any:
    """``key`` advanced by ``n`` samples of the schedule."""
    return jax.lax.fori_loop(0, n, lambda i, k: jax.random.split(k)[0], key)


class Failure(NamedTuple):
    """The first non-finite sample: its number within the call, the position of its
    block in the stacked blocks and the kernel leaf index (``NO_FAILURE`` in all
    three if none). Scalars, replicated, so every process can read them."""

    sample: Any
    block: Any
    leaf: Any


class Program(NamedTuple):
    """``advance(moments, key, n, inputs) -> (moments, failure, next_key)``, compiled
    once; ``failure`` and ``next_key`` are replicated.

    ``inputs`` is a :class:`ProgramInputs`; ``moments`` have leading axes
    ``(ds, db * q)``, sharded over the placement's ``(samples, blocks)`` axes.
    """

    advance: Callable
    placement: Placement
    kernel_shapes: PyTree


class ProgramInputs(NamedTuple):
    """The arrays of one call of a program.

    Attributes:
      pairs: ``(db * q, 2)`` int32 block indices ``(i, j)``, laid out by block row.
      valid: ``(db * q,)`` bool, False for padding.
      same: ``(db * q,)`` bool: f(x2) gets x1's dropout key (equal blocks).
      blocks1, blocks2: the stacked sides' leaves (``blocks2`` None: symmetric).
      init_args: what ``init`` needs besides its key (x1's keyword arrays).
    """

    pairs: Any
    valid: Any
    same: Any
    blocks1: list
    blocks2: list | None
    init_args: Any


def make_program(init: Callable, one_sample: OneSample, placement: Placement,
                 blocks1: _grid.Blocks, blocks2: _grid.Blocks | None, per_row: int,
                 init_args: Any, per_step: int = 1, stepped: bool = False,
                 grouped: bool = False, reuse: bool = False,
                 key_like: Any = None) -> Program:
    """Builds the program for blocks shaped like ``blocks1`` x ``blocks2``.

    Args:
      init: ``init(key, init_args) -> params``.
      one_sample: the kernels of one sample for one block pair.
      placement: the devices' ``(blocks, samples)`` mesh.
      blocks1, blocks2: the stacked sides (``blocks2`` None: the block's own f(x1)
        serves both sides).
      per_row: blocks per block row (``q``).
      per_step: samples drawn and computed together (vmapped) per loop step on each
        device: more parallelism, ``per_step`` times the memory of one sample.
      init_args: an example of ``init``'s second argument.
      stepped: loop over samples and blocks on the host, one compiled call per
        sample's draw and per block (one device, ``per_step`` 1 only), instead of
        inside one program; see :func:`_stepped`.
      grouped: the model has a grouped convolution and the NTK is wanted: JAX's
        NotImplementedError for its gradient over a mesh is explained.
      reuse: blocks of one block row follow each other on a device (two-sided blocks
        only): what a block computes from x1's block alone is computed once per row
        and sample (:mod:`mcntk._staging`), ``per_step`` 1 only.
      key_like: the shape and dtype of the run's dropout keys (for ``reuse``).
    """
    ds = placement.ds
    symmetric = blocks2 is None
    params_shapes = jax.eval_shape(lambda k, a: init(k, a), jax.random.PRNGKey(0), init_args)
    flat = _two_sided(one_sample, blocks1, blocks2)
    stages = None
    if reuse and not symmetric and per_step == 1:
        stages = block_stages(one_sample, params_shapes, blocks1, blocks2, key_like)

    def early_args(params, dropout_key, i, leaves1):
        return params, dropout_key, blocks1._replace(leaves=leaves1).block_leaves(i)

    def late_args(dropout_key, same, j, leaves2):
        return (second_key(dropout_key, same),
                blocks2._replace(leaves=leaves2).block_leaves(j))

    def kernels(params, dropout_key, same, i, j, leaves1, leaves2, residuals=None):
        """One block's kernels (``residuals``: its row's early stage, if staged)."""
        if symmetric:
            b1 = blocks1._replace(leaves=leaves1).block(i)
            return one_sample(params, dropout_key, dropout_key, b1, None)
        early = early_args(params, dropout_key, i, leaves1)
        late = late_args(dropout_key, same, j, leaves2)
        if residuals is None:
            return flat(early, late)
        return stages.late(early, late, residuals)

    def shapes():
        first2 = None if symmetric else blocks2.first_leaves()

        def one(p, k, leaves1, leaves2):
            b2 = None if symmetric else blocks2.rebuild(leaves2)
            return one_sample(p, k, k, blocks1.rebuild(leaves1), b2)

        return jax.eval_shape(one, params_shapes, jax.random.PRNGKey(0),
                              blocks1.first_leaves(), first2)

    kernel_shapes = shapes()
    if stepped:
        if placement.db * placement.ds != 1 or per_step != 1:
            raise ValueError("a stepped program runs on one device, one sample at a time")
        early = None if stages is None else (
            lambda *a: stages.early(early_args(*a)))
        return Program(_stepped(init, kernels, per_row, early), placement, kernel_shapes)

    def draw(chain, r, c):
        """The splits of this device's next ``c`` samples, and the chain after them."""
        if ds == 1 and c == 1:
            chain, split = jax.random.split(chain)
            return chain, split[None]
        chain, splits = jax.lax.scan(lambda k, _: tuple(jax.random.split(k)), chain, None,
                                     length=ds * c)
        return chain, splits[r + ds * jnp.arange(c)]

    def sample_params(init_keys, init_args, live, c):
        if c == 1:
            return jax.tree.map(lambda v: v[None],
                                materialized_params(init, init_keys[0], init_args, live[0]))
        batch = lambda ks: jax.vmap(lambda k: init(k, init_args))(ks)
        shapes = jax.eval_shape(batch, init_keys)
        return jax.lax.cond(jnp.any(live), batch,
                            lambda ks: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype),
                                                    shapes), init_keys)

    def device(moments, key, n, pairs, valid, same, leaves1, leaves2, init_args):
        """One device: its ``q`` blocks; its samples ``r, r + ds, ...`` of ``0 .. n-1``,
        ``per_step`` at a time, the rest one at a time."""
        moments = jax.tree.map(lambda v: v[0], moments)
        r = placement.index(SAMPLES)
        row = placement.index(BLOCKS)  # this device's blocks are row * per_row + p
        local = jnp.maximum(n - r + ds - 1, 0) // ds

        def stepper(c, offset):
            """A loop step of ``c`` samples, from this device's sample ``offset`` on."""

            def step(u, carry):
                chain, moments, failure = carry
                chain, splits = draw(chain, r, c)
                keys = jax.vmap(jax.random.split)(splits)
                init_keys, dropout_keys = keys[:, 0], keys[:, 1]
                index = offset + u * c + jnp.arange(c)  # this device's sample numbers
                live = index < local
                params = sample_params(init_keys, init_args, live, c)
                t = index * ds + r  # sample numbers within the step

                def add(p, state, ks):
                    """Block ``p``'s kernels (leading axis: the step's samples) added."""
                    moments, failure = state
                    mine = jax.tree.map(lambda v: v[p], moments)
                    for s in range(c):  # in sample order, as a sequential run adds them
                        k = jax.tree.map(lambda v, s=s: v[s], ks)
                        ok, failure = _failure_update(failure, k, live[s], t[s], row * per_row + p)
                        mine = _accumulate.update(mine, k, ok & live[s])
                    return jax.tree.map(lambda v, w: v.at[p].set(w), moments, mine), failure

                if stages is not None:  # c == 1: per block row, x1's part, then its blocks
                    one = jax.tree.map(lambda v: v[0], params)
                    first = dropout_keys[0]
                    # this device's valid blocks are a prefix; a row starts where i changes
                    starts = valid & jnp.concatenate(
                        [jnp.ones((1,), bool), pairs[1:, 0] != pairs[:-1, 0]])
                    count = jnp.sum(valid.astype(jnp.int32))
                    bounds = jnp.append(jnp.nonzero(starts, size=per_row, fill_value=count)[0],
                                        count)

                    def block_row(u, state):
                        lo, hi = bounds[u], bounds[u + 1]
                        residuals = stages.early(early_args(one, first, pairs[lo, 0], leaves1))

                        def block(p, state):
                            ks = kernels(one, first, same[p], pairs[p, 0], pairs[p, 1], leaves1,
                                         leaves2, residuals)
                            return add(p, state, jax.tree.map(lambda v: v[None], ks))

                        return jax.lax.fori_loop(lo, hi, block, state)

                    moments, failure = jax.lax.fori_loop(0, jnp.sum(starts.astype(jnp.int32)),
                                                         block_row, (moments, failure))
                    return chain, moments, failure

                def block(p, state):
                    def compute(state):
                        args = (same[p], pairs[p, 0], pairs[p, 1], leaves1, leaves2)
                        if c == 1:
                            ks = jax.tree.map(lambda v: v[None], kernels(
                                jax.tree.map(lambda v: v[0], params), dropout_keys[0], *args))
                        else:
                            ks = jax.vmap(lambda pr, dk: kernels(pr, dk, *args))(params,
                                                                                dropout_keys)
                        return add(p, state, ks)

                    return jax.lax.cond(valid[p], compute, lambda s: s, state)

                moments, failure = jax.lax.fori_loop(0, per_row, block, (moments, failure))
                return chain, moments, failure

            return step

        none = jnp.asarray(NO_FAILURE, jnp.int32)
        failure = Failure(none, none, none)
        full = local // per_step
        carry = jax.lax.fori_loop(0, full, stepper(per_step, 0), (key, moments, failure))
        if per_step > 1:  # the rest one at a time: a call's last step computes no surplus
            carry = jax.lax.fori_loop(0, local - full * per_step, stepper(1, full * per_step),
                                      carry)
        _, moments, failure = carry
        moments = jax.tree.map(lambda v: v[None], moments)
        failure = jax.tree.map(lambda v: jnp.reshape(v, (1, 1)), failure)
        return moments, failure

    rows = placement.sharding(SAMPLES, BLOCKS)
    by_block = placement.spec(BLOCKS)
    rep = placement.replicated()
    # check_vma=False: a sample's params are drawn inside, the same on every block row
    # (not varying over the block axes). Under varying-axis checks, differentiating
    # with respect to such values transposes an implicit pvary into a psum: the NTK's
    # VJPs would sum Jacobians over the rows (JAX 0.10.2 rejects this program instead).
    # tests/eight_devices.py::test_no_cross_device_jacobian_sum guards it.
    sharded = jax.shard_map(
        device, mesh=placement.mesh,
        in_specs=(rows.spec, rep.spec, rep.spec, by_block, by_block, by_block, rep.spec,
                  rep.spec, rep.spec),
        out_specs=(rows.spec, rows.spec), check_vma=False)

    def advance(moments, key, n, inputs: ProgramInputs):
        moments, failure = sharded(moments, key, n, inputs.pairs, inputs.valid, inputs.same,
                                   inputs.blocks1, inputs.blocks2, inputs.init_args)
        first = jnp.argmin(failure.sample.ravel())  # the earliest sample, any device
        failure = jax.tree.map(lambda v: v.ravel()[first], failure)
        return moments, failure, split_chain(key, n)

    compiled = jax.jit(advance, out_shardings=(rows, rep, rep))
    if not grouped:
        return Program(compiled, placement, kernel_shapes)

    def checked(*args):
        try:
            return compiled(*args)
        except NotImplementedError as e:
            raise NotYetImplementedError(
                f"this model has a grouped or depthwise convolution (feature_group_count > 1), "
                f"and JAX cannot batch its gradient when the operands carry a mesh sharding, "
                f"as they do on {placement.db * placement.ds} devices "
                f"({type(e).__name__}{': ' + str(e) if str(e) else ''}). For the NTK of such "
                f"a model use one device: device_count=0 without a mesh, or a mesh of one "
                f"device; mcntk then runs it without a mesh sharding.") from e

    return Program(checked, placement, kernel_shapes)


def _two_sided(one_sample: OneSample, blocks1: _grid.Blocks, blocks2: _grid.Blocks | None):
    """A two-sided block's kernels as ``fn(early, late)``: ``early`` = (params, f(x1)'s
    key, x1's block leaves), ``late`` = (f(x2)'s key, x2's block leaves)."""
    def flat(early, late):
        (params, k1, leaves1), (k2, leaves2) = early, late
        return one_sample(params, k1, k2, blocks1.rebuild(leaves1), blocks2.rebuild(leaves2))
    return flat


def dropout_key_like(key: Any) -> jax.ShapeDtypeStruct:
    """The shape and dtype of the dropout keys that a run from ``key`` passes."""
    return jax.eval_shape(lambda k: jax.random.split(jax.random.split(k)[1])[1], key)


def block_stages(one_sample: OneSample, params_shapes: PyTree, blocks1: _grid.Blocks,
                 blocks2: _grid.Blocks, key: Any) -> _staging.Stages | None:
    """The two-sided block program split into x1's part and the rest (or None), traced
    with dropout keys like ``key`` (:func:`dropout_key_like`)."""
    return _staging.split(_two_sided(one_sample, blocks1, blocks2),
                          (params_shapes, key, blocks1.first_leaves()),
                          (key, blocks2.first_leaves()))


def has_convolution(closed: Any, grouped: bool = False) -> bool:
    """Whether a closed jaxpr (or any program inside it) has a convolution; with
    ``grouped``, one with ``feature_group_count`` or ``batch_group_count`` above 1."""
    def walk(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated" and (not grouped or max(
                    eqn.params["feature_group_count"], eqn.params["batch_group_count"]) > 1):
                return True
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if isinstance(inner, jcore.Jaxpr) and walk(inner):
                        return True
        return False
    return walk(closed.jaxpr)


def _failure_update(failure: Failure, ks: PyTree, live: Any, t: Any, block: Any):
    """``(ok, failure)``: whether the kernels ``ks`` of sample ``t`` are finite, and
    ``failure`` updated if this is the earliest non-finite one."""
    finite = jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(ks)])
    ok = jnp.all(finite)
    first = (~ok) & live & (t < failure.sample)
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # int64 under x64
    return ok, Failure(jnp.where(first, i32(t), failure.sample),
                       jnp.where(first, i32(block), failure.block),
                       jnp.where(first, i32(jnp.argmin(finite)), failure.leaf))


def _stepped(init: Callable, kernels: Callable, per_row: int,
             early: Callable | None = None) -> Callable:
    """``advance`` for one device as a host loop: per sample, one compiled call
    draws the parameters and one compiled call per block adds that block's
    kernels, in the order of the in-program loop (same numbers). With ``early``
    (``(params, dropout_key, i, leaves1) -> residuals``), one more call per block
    row computes the row's residuals for its blocks.

    Why: XLA's CPU compiler leaves convolutions inside loop or conditional bodies
    in the layout the program gives them, and a convolution that is not in its
    preferred layout (e.g. the transpose that gives a kernel's gradient, which
    Jacobians and VJPs contain) then runs on a slow generic path (JAX issue
    #12868): measured 30-70x slower than the same program without control flow.
    Each call here has no control flow around the kernel. The arrays are given
    to it on the device without the mesh's sharding, which also lets JAX
    differentiate grouped (e.g. depthwise) convolutions per example.
    """
    def draw(chain, init_args):
        chain, split = jax.random.split(chain)
        init_key, dropout_key = jax.random.split(split)
        return chain, init(init_key, init_args), dropout_key

    def block(moments, failure, params, dropout_key, t, p, pairs, same, leaves1, leaves2,
              residuals):
        ks = kernels(params, dropout_key, same[p], pairs[p, 0], pairs[p, 1], leaves1, leaves2,
                     residuals)
        mine = jax.tree.map(lambda v: v[0, p], moments)
        ok, failure = _failure_update(failure, ks, True, t, p)
        mine = _accumulate.update(mine, ks, ok)
        return jax.tree.map(lambda v, w: v.at[0, p].set(w), moments, mine), failure

    draw = jax.jit(draw)
    block = jax.jit(block, donate_argnums=(0,))
    early = None if early is None else jax.jit(early)
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # the caller keeps its input

    def advance(moments, key, n, inputs: ProgramInputs):
        # plain single-device arrays: under a mesh sharding, JAX cannot batch the
        # gradient of a grouped convolution (its batching rule raises NotImplementedError)
        device = next(iter(inputs.pairs.devices()))
        sharding = jax.tree.map(lambda v: v.sharding, moments)
        moments, key, inputs = jax.device_put((moments, key, inputs), SingleDeviceSharding(device))
        valid = np.asarray(fetch(inputs.valid))
        rows = np.asarray(fetch(inputs.pairs))[:, 0]
        none = jnp.asarray(NO_FAILURE, jnp.int32)
        failure = Failure(none, none, none)
        moments, chain = copy(moments), key
        for t in range(int(fetch(n))):
            chain, params, dropout_key = draw(chain, inputs.init_args)
            step = np.int32(t)
            row, residuals = None, None
            for p in range(per_row):
                if not valid[p]:
                    continue
                if early is not None and rows[p] != row:
                    row = rows[p]
                    residuals = early(params, dropout_key, row, inputs.blocks1)
                moments, failure = block(moments, failure, params, dropout_key, step,
                                         np.int32(p), inputs.pairs, inputs.same,
                                         inputs.blocks1, inputs.blocks2, residuals)
        return jax.device_put(moments, sharding), failure, chain

    return advance


def raise_first_failure(failures, done, waves, plan, committed) -> None:
    """Raises :class:`NonFiniteSampleError` for the first non-finite sample the waves
    met in a call that started at sample ``done``."""
    first = None
    for wave, failure in zip(waves, failures):
        sample = np.asarray(fetch(failure.sample))
        if (sample == NO_FAILURE).all():
            continue
        where = np.unravel_index(np.argmin(sample), sample.shape)
        if first is None or sample[where] < first[0]:
            first = (int(sample[where]), wave, failure, where)
    if first is None:
        return
    t, wave, failure, where = first
    block = wave.pairs[int(np.asarray(fetch(failure.block))[where])]
    leaf = int(np.asarray(fetch(failure.leaf))[where])
    path = jax.tree_util.tree_flatten_with_path(wave.program.kernel_shapes)[0][leaf][0]
    kernel = path[0].key + jax.tree_util.keystr(tuple(path[1:]))
    i, j = block
    rows = lambda k, b, n: f"{k * b}..{min((k + 1) * b, n) - 1}"
    other = "x1" if plan.symmetric else "x2"
    saved = ("" if committed is None else
             " Nothing had been committed to `checkpoint_dir` yet." if committed == 0 else
             f" The last commit in `checkpoint_dir` ({committed} samples) is intact.")
    raise NonFiniteSampleError(
        f"sample {done + t} (0-based) gave a non-finite '{kernel}' kernel (NaN or Inf) in "
        f"block {block} of the grid (x1 examples {rows(i, plan.b1, plan.n1)}, {other} "
        f"examples {rows(j, plan.b2, plan.n2)}); it was not added to the estimate.{saved} "
        f"See mcntk.errors.NonFiniteSampleError.",
        done + t, kernel, block, committed)
