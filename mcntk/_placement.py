"""Placement: which devices compute an estimate, and how its blocks and samples are
spread over them. Knows nothing of kernels or models.

The devices come from ``device_count`` (-1: all, 0: one device, k: the first k of
``jax.devices()``) or from a user's ``mesh`` (all its devices). For each program
(a set of blocks of equal shapes) the devices are arranged in an internal 2-D mesh
``(blocks, samples)``:

* by default, blocks are spread over as many devices as there are blocks (the
  largest divisor ``db`` of the device count that is at most the number of
  blocks) and samples over the remaining factor ``ds``: 8 devices and 3 blocks give
  ``db = 2`` block rows, each with ``ds = 4`` devices splitting the samples; one
  block (``batch_size=0``) puts every device on samples;
* with ``sample_axes=`` naming axes of a user's mesh, samples go over those mesh
  axes and blocks over the others.

Block ``p`` of a program goes to block row ``p % db`` (so rows get equal shares,
plus or minus one) and sample ``s`` of a step to sample column ``s % ds``. The key
schedule does not depend on the placement, so the estimate does not either (up to
the order of floating-point sums).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BLOCKS, SAMPLES = "blocks", "samples"


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
    return Devices(tuple(mesh.devices.flat), mesh, sample_axes)


class Placement(NamedTuple):
    """The internal ``(blocks, samples)`` mesh of one program.

    Attributes:
      mesh: a Mesh with axes ``('blocks', 'samples')`` of shape ``(db, ds)``.
    """

    mesh: Mesh

    @property
    def db(self) -> int:
        return self.mesh.shape[BLOCKS]

    @property
    def ds(self) -> int:
        return self.mesh.shape[SAMPLES]

    def sharding(self, *spec: Any) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def replicated(self) -> NamedSharding:
        return self.sharding()

    def layout(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(order, valid)`` for ``count`` blocks: position ``r * q + u`` of the stacked
        blocks (block row ``r``, its ``u``-th block) holds block ``order[...]``;
        ``valid`` is False for padding."""
        q = max(1, math.ceil(count / self.db))
        order = np.array([u * self.db + r for r in range(self.db) for u in range(q)])
        valid = order < count
        return np.where(valid, order, 0).astype(np.int32), valid


def place(devices: Devices, n_blocks: int) -> Placement:
    """The placement of a program of ``n_blocks`` blocks on ``devices``."""
    d = devices.count
    if devices.mesh is not None and devices.sample_axes is not None:
        mesh = devices.mesh
        block_axes = [a for a in mesh.axis_names if a not in devices.sample_axes]
        order = [mesh.axis_names.index(a) for a in block_axes + list(devices.sample_axes)]
        arr = np.transpose(mesh.devices, order)
        ds = math.prod(mesh.shape[a] for a in devices.sample_axes)
        return Placement(Mesh(arr.reshape(d // ds, ds), (BLOCKS, SAMPLES)))
    db = max(k for k in range(1, d + 1) if d % k == 0 and k <= max(1, n_blocks))
    arr = np.array(devices.devices, dtype=object).reshape(db, d // db)
    return Placement(Mesh(arr, (BLOCKS, SAMPLES)))


def output_sharding(devices: Devices, shape: tuple[int, ...]) -> NamedSharding:
    """A sharding of an array of ``shape`` over all ``devices``: along the largest axis
    whose size the device count divides, else replicated."""
    mesh = Mesh(np.array(devices.devices, dtype=object), ("devices",))
    d = devices.count
    candidates = [i for i, n in enumerate(shape) if n % d == 0 and n >= d]
    if d == 1 or not candidates:
        return NamedSharding(mesh, PartitionSpec())
    axis = max(candidates, key=lambda i: shape[i])
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), "devices"))


def put(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` placed with ``sharding`` (every leaf)."""
    return jax.device_put(tree, sharding)
