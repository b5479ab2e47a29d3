"""Placement: which devices compute an estimate, how its blocks and samples are
spread over them, and how arrays get onto and off them (one process or many).
Knows nothing of kernels or models. The user-facing account is docs/sharding.md.

The devices come from ``device_count`` (-1: all, 0: one device, k: the first k of
``jax.devices()``) or from a user's ``mesh`` (all its devices). For each program
(a set of equally shaped blocks) the devices are arranged in an internal 2-D mesh
``(blocks, samples)`` of shape ``(db, ds)``:

* by default (:func:`block_rows`), ``db`` is the largest divisor of the device
  count that keeps every device's work within 10% of an even split; samples go
  over the remaining factor ``ds``. One block (``batch_size=0``) puts every
  device on samples; 16 blocks on 8 devices give each device 2 blocks and all
  samples; 3 blocks on 8 devices give every device the 3 blocks and 1/8 of the
  samples;
* with ``sample_axes=`` naming axes of a user's mesh, samples go over those mesh
  axes and blocks over the others.

Block ``p`` of a program goes to block row ``p % db`` (rows get equal shares,
plus or minus one) and sample ``s`` of a step to sample column ``s % ds``. The key
schedule does not depend on the placement, so the estimate does not either (up to
the order of floating-point sums).

With several processes (``jax.distributed.initialize``), the devices are global and
must include devices of every process, since every process runs the same program.
Host data (the inputs, the key) must be the same on every process; :func:`put`
builds global arrays from it without a collective, :func:`check_same` verifies
it once per call, and :func:`fetch` brings a global array to every process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BLOCKS, SAMPLES = "blocks", "samples"

# the busiest block row may hold this much more than an even share of the blocks
_BALANCE = 1.1


def check_device_count(device_count: Any) -> int:
    if isinstance(device_count, bool) or not isinstance(device_count, (int, np.integer)):
        raise TypeError(f"`device_count` must be an int (-1: all devices, 0: one device, k: "
                        f"k devices), got {device_count!r}.")
    if device_count < -1:
        raise ValueError(f"`device_count` must be -1 (all devices), 0 or positive, "
                         f"got {device_count}.")
    return int(device_count)


class Devices(NamedTuple):
    """The devices of an estimator and, for a user mesh, how to use its axes.

    Attributes:
      devices: the devices used (global, in order).
      mesh: the user's mesh, or None.
      sample_axes: names of the user mesh's axes that split samples, or None for the
        default rule.
    """

    devices: tuple
    mesh: Mesh | None
    sample_axes: tuple[str, ...] | None

    @property
    def count(self) -> int:
        return len(self.devices)

    @property
    def platform(self) -> str:
        return self.devices[0].platform


def select(device_count: Any, mesh: Any = None, sample_axes: Any = None) -> Devices:
    """Validates ``device_count``, ``mesh`` and ``sample_axes``; the devices to use."""
    device_count = check_device_count(device_count)
    if mesh is None:
        if sample_axes is not None:
            raise ValueError(f"`sample_axes`={sample_axes!r} names axes of a mesh, but no "
                             f"`mesh` was given.")
        available = jax.devices()
        if device_count > len(available):
            raise ValueError(f"`device_count`={device_count} exceeds the {len(available)} "
                             f"available device(s).")
        if device_count == 0:
            chosen = [available[0]]
        elif device_count == -1:
            chosen = list(available)
        else:
            chosen = list(available[:device_count])
        _check_processes(chosen, f"`device_count`={device_count}")
        return Devices(tuple(chosen), None, None)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {mesh!r}.")
    if device_count not in (-1, mesh.size):
        raise ValueError(f"`device_count`={device_count} disagrees with `mesh` of "
                         f"{mesh.size} devices; leave device_count at -1 with a mesh.")
    if sample_axes is not None:
        if isinstance(sample_axes, str):
            sample_axes = (sample_axes,)
        if (not isinstance(sample_axes, Sequence)
                or not all(isinstance(a, str) for a in sample_axes)):
            raise TypeError(f"`sample_axes` must be a mesh axis name or a sequence of names, "
                            f"got {sample_axes!r}.")
        unknown = [a for a in sample_axes if a not in mesh.axis_names]
        if unknown or len(set(sample_axes)) != len(sample_axes):
            raise ValueError(f"`sample_axes`={tuple(sample_axes)!r} must name distinct axes "
                             f"of the mesh, whose axes are {mesh.axis_names}.")
        sample_axes = tuple(sample_axes)
    _check_processes(list(mesh.devices.flat), "`mesh`")
    return Devices(tuple(mesh.devices.flat), mesh, sample_axes)


def _check_processes(devices: list, what: str) -> None:
    """Every process runs the estimator's programs, so each needs a device in them."""
    if jax.process_count() == 1:
        return
    have = {d.process_index for d in devices}
    missing = sorted(set(range(jax.process_count())) - have)
    if missing:
        raise ValueError(
            f"{what} selects devices of processes {sorted(have)} only, but this is a run of "
            f"{jax.process_count()} processes and every process runs the estimate, so the "
            f"devices must include devices of every process (missing: {missing}). Use "
            f"`device_count`=-1 or a `mesh` over jax.devices().")


class Placement(NamedTuple):
    """The devices of one program as a ``(blocks, samples)`` grid of ``db x ds``.

    Attributes:
      mesh: the mesh: an internal one with axes ``('blocks', 'samples')``, or the
        user's mesh.
      blocks: the mesh axes over which blocks are split (``db`` = their product).
      samples: the mesh axes over which samples are split (``ds`` = their product).
    """

    mesh: Mesh
    blocks: tuple[str, ...] = (BLOCKS,)
    samples: tuple[str, ...] = (SAMPLES,)

    @property
    def db(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.blocks)

    @property
    def ds(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.samples)

    def spec(self, *parts: str | None) -> PartitionSpec:
        """A PartitionSpec whose entries ``BLOCKS``/``SAMPLES`` stand for those axes."""
        axes = {BLOCKS: self.blocks, SAMPLES: self.samples, None: ()}
        return PartitionSpec(*(axes[p] or None for p in parts))

    def sharding(self, *parts: str | None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(*parts))

    def replicated(self) -> NamedSharding:
        return self.sharding()

    @property
    def one_at_a_time(self) -> bool:
        """Whether this placement's programs must finish before the next is dispatched.

        XLA's CPU runtime runs each device's part of a program as a task on one thread
        pool, and a collective blocks its task until every device's part arrives. With
        several multi-device programs in flight, the pool's threads can all be taken by
        parts that wait for a part that gets no thread: a deadlock. It was seen on 2
        cores under load, with 2 and 4 simulated devices, when eager operations on
        sample-sharded moments were dispatched back to back (those now run on the
        host). Accelerators run a device's programs in dispatch order."""
        return self.mesh.size > 1 and self.mesh.devices.flat[0].platform == "cpu"

    def index(self, part: str) -> Any:
        """Inside ``shard_map``: this device's block row (``BLOCKS``) or sample
        column (``SAMPLES``)."""
        axes = self.blocks if part == BLOCKS else self.samples
        return jax.lax.axis_index(axes) if axes else 0

    def layout(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(order, valid)`` for ``count`` blocks: position ``r * q + u`` of the stacked
        blocks (block row ``r``, its ``u``-th block) holds block ``order[...]``;
        ``valid`` is False for padding. Block rows get consecutive blocks (so blocks of
        one grid row stay together: their x1 part is computed once, :mod:`_staging`),
        as many as the others or one fewer."""
        q = max(1, math.ceil(count / self.db))
        sizes = [count // self.db + (r < count % self.db) for r in range(self.db)]
        starts = np.cumsum([0] + sizes[:-1])
        order = np.array([starts[r] + u for r in range(self.db) for u in range(q)])
        valid = np.array([u < sizes[r] for r in range(self.db) for u in range(q)])
        return np.where(valid, order, 0).astype(np.int32), valid


def block_rows(n_devices: int, n_blocks: int) -> int:
    """The default number of block rows ``db`` (a divisor of ``n_devices``).

    A device's work is ``ceil(n_blocks / db)`` blocks times ``1 / ds`` of the
    samples, i.e. proportional to ``ceil(n_blocks / db) * db``, which is smallest
    (``n_blocks``) when ``db`` divides ``n_blocks``. Among the divisors within
    :data:`_BALANCE` of that, the largest wins: more block rows means fewer blocks
    (moments in memory) per device.
    """
    n_blocks = max(1, n_blocks)
    divisors = [k for k in range(1, n_devices + 1) if n_devices % k == 0]
    work = {k: math.ceil(n_blocks / k) * k for k in divisors}
    return max(k for k in divisors if work[k] <= _BALANCE * n_blocks or k == 1)


def place(devices: Devices, n_blocks: int) -> Placement:
    """The placement of a program of ``n_blocks`` blocks on ``devices``."""
    mesh = devices.mesh
    if mesh is not None and devices.sample_axes is not None:
        # the user's mesh as it is (its device order), so results combine with its arrays
        blocks = tuple(a for a in mesh.axis_names if a not in devices.sample_axes)
        return Placement(mesh, blocks, devices.sample_axes)
    d = devices.count
    db = block_rows(d, n_blocks)
    arr = np.array(devices.devices, dtype=object).reshape(db, d // db)
    return Placement(Mesh(arr, (BLOCKS, SAMPLES)))


def output_sharding(devices: Devices, shape: tuple[int, ...]) -> NamedSharding:
    """A sharding of an array of ``shape`` over all ``devices``.

    The device count ``d`` is factored over the array's axes, each factor dividing
    its axis, so that as many devices as possible hold distinct pieces; what is
    left of ``d`` replicates them (e.g. ``(6, 5)`` on 8 devices: 2 pieces along
    axis 0, each on 4 devices). Among equally good splits, fewer split axes and
    then the larger axes win.
    """
    d = devices.count
    factors = _factor(d, tuple(shape))
    split = [i for i, f in enumerate(factors) if f > 1]
    names = tuple(f"a{i}" for i in split) + ("rest",)
    sizes = tuple(factors[i] for i in split) + (d // math.prod(factors),)
    mesh = Mesh(np.array(devices.devices, dtype=object).reshape(sizes), names)
    spec = [f"a{i}" if factors[i] > 1 else None for i in range(len(shape))]
    return NamedSharding(mesh, PartitionSpec(*spec))


def _factor(d: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-axis factors ``f_i | shape[i]`` with ``prod f_i | d``: the most devices
    with distinct pieces, then the fewest split axes, then the largest, then the
    first."""
    best: tuple = ()
    best_score: tuple = ()

    def search(i: int, left: int, chosen: tuple) -> None:
        nonlocal best, best_score
        if i == len(shape):
            split = [shape[j] for j, f in enumerate(chosen) if f > 1]
            score = (math.prod(chosen), -len(split), sorted(split, reverse=True))
            if not best or score > best_score:
                best, best_score = chosen, score
            return
        for f in range(left, 0, -1):
            if left % f == 0 and shape[i] % f == 0:
                search(i + 1, left // f, chosen + (f,))

    search(0, d, ())
    return best


# --- moving data ----------------------------------------------------------------------


def put(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` placed with ``sharding`` (every leaf).

    Host data (NumPy arrays, arrays on one local device) must be the same on every
    process when ``sharding`` spans several; it is not re-checked here (see
    :func:`check_same`), so no collective runs.
    """
    return jax.tree.map(lambda v: _put_leaf(v, sharding), tree)


def _put_leaf(value: Any, sharding: NamedSharding) -> Any:
    global_array = isinstance(value, jax.Array) and not value.is_fully_addressable
    if global_array or sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = _put_leaf(jax.random.key_data(value), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fetch(tree: Any) -> Any:
    """``tree`` as NumPy arrays, in full, on every process.

    One process: ``jax.device_get``. Several: arrays spanning other processes'
    devices are all-gathered (every device receives the whole array, then each
    process copies one replica to host memory).
    """
    def one(v):
        if isinstance(v, jax.Array) and not v.is_fully_addressable:
            return multihost_utils.process_allgather(v, tiled=True)
        return jax.device_get(v)
    return jax.tree.map(one, tree)


def check_same(tree: Any, what: str) -> None:
    """Raises ValueError unless ``tree`` (host data) is equal on every process.

    Compares a digest of the bytes, so the collective moves 16 bytes, not the data.
    """
    if jax.process_count() == 1:
        return
    digest = hashlib.blake2b(digest_size=16)
    for leaf in jax.tree.leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            continue  # already global: one value by construction
        host = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{host.dtype}{host.shape}".encode())
        digest.update(host.tobytes())
    mine = np.frombuffer(digest.digest(), np.uint32)
    everyone = multihost_utils.process_allgather(mine)
    if not (everyone == mine).all():
        raise ValueError(
            f"{what} differ between processes. In a multi-process run every process calls "
            f"kernel_fn with the same values (the same x1, x2, keyword arrays and key), "
            f"e.g. loaded from the same file or drawn from the same seed.")


def host_device() -> Any:
    """A local CPU device for work on host data, or None (the default device)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None
