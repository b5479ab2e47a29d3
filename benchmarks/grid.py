"""Work done once in a grid of blocks: mirrored blocks of ``x2=None`` and x1's part of a
block computed once per grid row (docs/implementations.md, "Grids of blocks").

Each configuration runs with mcntk's defaults and with the mechanism switched off
(by replacing, in this process only, the decision that enables it), so the two columns
are the same code but for that mechanism:

* mirror off: the model is treated as if its outputs read its ``rng`` (every block
  of ``x2=None`` computed);
* reuse off: no block program is split into stages (x1's part computed per block).

Workloads (one Monte Carlo sample, ``get='ntk'``, ``vmap_axes=0``, best of
``--repeats`` calls after a compiling one):

* SD: stax MLP 128-960-960-10 (~1.05M parameters, the memory workload of
  benchmarks/run.py), STRUCTURED_DERIVATIVES, 2048 examples in blocks of 512;
* JC: stax MLP 32-256-256-10 (~76k parameters), JACOBIAN_CONTRACTION, 512 examples
  in blocks of 128.

Each with ``x2=None`` and with an x2 of half as many examples. Usage:

    python benchmarks/grid.py [--repeats 3] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import time

import jax
import numpy as np
from jax.example_libraries import stax

import mcntk
from mcntk import _planning, _staging

WORKLOADS = {
    "SD": (128, 960, 2048, 512, mcntk.NtkImplementation.STRUCTURED_DERIVATIVES),
    "JC": (32, 256, 512, 128, mcntk.NtkImplementation.JACOBIAN_CONTRACTION),
}


@contextlib.contextmanager
def switched_off(mirror: bool, reuse: bool):
    reads, split = _planning._reads_rng, _staging.split
    if not mirror:
        _planning._reads_rng = lambda *args: True
    if not reuse:
        _staging.split = lambda *args: None
    try:
        yield
    finally:
        _planning._reads_rng, _staging.split = reads, split


def seconds(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = np.asarray(jax.block_until_ready(fn()))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append", help="append the table to this markdown file")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    for name, (d, width, n, b, impl) in WORKLOADS.items():
        init_fn, apply_fn = stax.serial(stax.Dense(width), stax.Relu, stax.Dense(width),
                                        stax.Relu, stax.Dense(10))
        x = jax.random.normal(jax.random.PRNGKey(1), (n, d))
        for x2, what in ((None, "x2=None"), (x[: n // 2], f"x2 of {n // 2}")):
            times, outs = {}, {}
            for mirror, reuse in ((True, True), (False, True), (True, False), (False, False)):
                with switched_off(mirror, reuse):
                    kernel_fn = mcntk.monte_carlo_kernel_fn(
                        init_fn, apply_fn, jax.random.PRNGKey(0), 1, batch_size=b,
                        implementation=impl, vmap_axes=0)
                    call = functools.partial(kernel_fn, x, x2, "ntk")
                    times[mirror, reuse], outs[mirror, reuse] = seconds(call, args.repeats)
            ref = outs[True, True]
            diff = max(float(np.abs(o - ref).max() / np.abs(ref).max()) for o in outs.values())
            rows.append((name, what, n, b, times, diff))
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    lines = [
        "",
        "## Grids of blocks: work done once (issue 8)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, `nproc` = {os.cpu_count()}, "
        f"{jax.default_backend()} backend, jax {jax.__version__}; 1-minute load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (the machine is shared).",
        "",
        f"Command: `python benchmarks/grid.py --repeats {args.repeats}`",
        "",
        "Seconds per `kernel_fn(x1, x2, 'ntk')` call (one sample, `vmap_axes=0`), best of "
        f"{args.repeats} after a compiling call. SD: stax MLP 128-960-960-10, "
        "STRUCTURED_DERIVATIVES; JC: stax MLP 32-256-256-10, JACOBIAN_CONTRACTION. 'mirror "
        "off': every block of `x2=None` computed; 'reuse off': x1's part computed per block. "
        "The last column is the largest difference between the four estimates, relative to "
        "the largest entry.",
        "",
        "| workload | x2 | examples, block | default | mirror off | reuse off | both off "
        "| max rel. difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, what, n, b, t, diff in rows:
        lines.append(f"| {name} | {what} | {n}, {b} | {t[True, True]:.3f} | "
                     f"{t[False, True]:.3f} | {t[True, False]:.3f} | {t[False, False]:.3f} "
                     f"| {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
