"""Block sizes chosen, or checked, against a memory budget (``memory_budget``).

The estimate for blocks of ``b`` examples is XLA's memory analysis of the compiled
one-sample kernel program of one block (its arguments, among them one sample's
parameters, its outputs and its temporaries), plus the accumulators of the whole
kernel (kept on the device with ``store_on_device=True``; counted in any case, so
the estimate errs on the safe side). The program is compiled for the estimate only:
a few seconds per size tried, once per call signature.

With ``batch_size=0`` the first size that fits among one block of all ``n`` examples,
then ``n/2``, ``n/4``, ... (rounded up) is taken; with ``batch_size > 0`` that size is
checked, and a size over the budget is an error that names one that fits.

Samples per loop step (:func:`samples_per_step`): on GPUs and TPUs a device draws and
computes several samples together (vmapped), as many as fit in the budget next to the
accumulators, counting each sample at the one-sample program's estimate; the budget is
``memory_budget``, or without one a fraction of the memory the device reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from mcntk import _accumulate


class BlockChoice(NamedTuple):
    """The block size used under a memory budget.

    Attributes:
      batch_size: the block size (0: one block holding every example).
      peak_bytes: its estimated peak memory per device.
      budget: ``memory_budget``, in bytes.
    """

    batch_size: int
    peak_bytes: int
    budget: int

    def __str__(self) -> str:
        return (f"batch_size={self.batch_size}: about {_mib(self.peak_bytes)} per device "
                f"(estimated), within memory_budget={_mib(self.budget)}")


def check_budget(memory_budget: Any) -> int | None:
    """``memory_budget`` as a positive int of bytes, or None."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(
            memory_budget, (int, float, np.integer, np.floating)):
        raise TypeError(f"`memory_budget` must be a number of bytes (e.g. 4 * 2**30 or 4e9) "
                        f"or None, got {memory_budget!r}.")
    if not np.isfinite(memory_budget) or memory_budget < 1:
        raise ValueError(f"`memory_budget` must be a positive number of bytes, got "
                         f"{memory_budget!r}.")
    return int(memory_budget)


def peak_bytes(memory: Any) -> int:
    """Arguments + outputs + temporaries of XLA's ``CompiledMemoryStats`` (or its peak,
    if larger; on CPU the reported peak leaves the temporaries out)."""
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return int(max(total, getattr(memory, "peak_memory_in_bytes", 0) or 0))


def choose(estimate: Callable[[int], int], n: int | None, batch_size: int,
           budget: int) -> BlockChoice:
    """The block size to use for ``n`` examples (None: unknown, no splitting).

    ``estimate(b)`` is the peak bytes with blocks of ``b`` (0: one block).
    """
    if batch_size or n is None:
        peak = estimate(batch_size)
        if peak <= budget:
            return BlockChoice(batch_size, peak, budget)
        if n is None:
            raise ValueError(
                f"one block of all examples needs about {_mib(peak)} per device (estimated), "
                f"over `memory_budget`={budget} ({_mib(budget)}), and these inputs cannot be "
                f"cut into smaller blocks: their leaves do not hold the same number of "
                f"examples on their batch axes.")
        fits = _largest_fitting(estimate, (batch_size or n or 2) // 2, budget)
        hint = (f"`batch_size`={fits.batch_size} fits (about {_mib(fits.peak_bytes)})"
                if fits else "not even blocks of 1 example fit")
        raise ValueError(
            f"`batch_size`={batch_size} needs about {_mib(peak)} per device (estimated), over "
            f"`memory_budget`={budget} ({_mib(budget)}); {hint}. Pass a smaller "
            f"`batch_size`, or `batch_size`=0 to let `memory_budget` choose.")
    fits = _largest_fitting(estimate, n, budget, whole=n)
    if fits is None:
        raise ValueError(
            f"`memory_budget`={budget} ({_mib(budget)}) is too small: even blocks of 1 "
            f"example need about {_mib(estimate(1))} per device (estimated).")
    return fits


MOST_PER_STEP = 16  # samples per step, at most: the step's program adds them one by one
DEVICE_FRACTION = 0.5  # of a device's reported memory limit, without `memory_budget`


def device_budget(device: Any) -> int | None:
    """A budget for samples per step on ``device`` without ``memory_budget``: a fraction
    of the memory limit it reports (None where it reports none, as CPUs do, and with
    several processes, whose programs must agree)."""
    if jax.process_count() > 1:
        return None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit * DEVICE_FRACTION) if limit else None


def samples_per_step(sample_bytes: int, fixed_bytes: int, budget: int | None,
                     samples: int) -> int:
    """Samples a device draws and computes together per loop step.

    As many as fit in ``budget`` next to ``fixed_bytes`` (the accumulators) at
    ``sample_bytes`` each (one sample's program: its parameters, inputs, outputs and
    temporaries, all counted again per sample, which errs on the safe side); at most
    ``samples`` (the device's share of the run) and :data:`MOST_PER_STEP`; at least 1.
    """
    if budget is None or sample_bytes <= 0:
        return 1
    fits = (budget - fixed_bytes) // sample_bytes
    return int(max(1, min(fits, samples, MOST_PER_STEP)))


def program_bytes(fn: Callable, args: tuple) -> tuple[int, int]:
    """``(peak bytes of the compiled program fn(*args), bytes of accumulators for its
    outputs)``: for one block's one-sample kernels."""
    memory = jax.jit(fn).lower(*args).compile().memory_analysis()
    accumulators = sum(
        math.prod(v.shape) * _accumulate.accumulator_dtype(v.dtype).itemsize
        for v in jax.tree.leaves(jax.eval_shape(fn, *args)))
    return peak_bytes(memory), accumulators


def _largest_fitting(estimate, start: int, budget: int, whole: int | None = None
                     ) -> BlockChoice | None:
    """The first of ``start``, ``start / 2``, ... 1 (rounded up) that fits."""
    b = max(start, 1)
    while True:
        size = 0 if whole is not None and b >= whole else b
        peak = estimate(size)
        if peak <= budget:
            return BlockChoice(size, peak, budget)
        if b == 1:
            return None
        b = (b + 1) // 2


def _mib(n: int) -> str:
    """A byte count for a message: exact, and in MiB."""
    return f"{n:,} bytes = {n / 2**20:.2f} MiB"
