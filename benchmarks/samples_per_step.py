"""Samples per loop step on a CPU: one at a time (mcntk's choice on CPUs) against 2, 4
and 8 drawn and computed together, vmapped (the choice on GPUs and TPUs, where a memory
budget sets it: mcntk._budget.samples_per_step); writes the "Samples per step" section
of benchmarks/RESULTS.md.

For W1, W2 and W3 of benchmarks/run.py (``jax_threefry_partitionable=False``), the
seconds per ``kernel_fn(x1, x2, ('nngp', 'ntk'))`` with mcntk's defaults and the given
samples per step (forced through the estimator's platform rule), best of --repeats
calls after a compiling one. W3 runs 2 samples instead of its 1, and only 1 or 2 per
step (mcntk never takes more per step than a device's share).

    python benchmarks/samples_per_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## Samples per step (issue 8)"
STEPS = (1, 2, 4, 8)


def seconds(name: str, per_step: int, repeats: int) -> float | None:
    import jax
    from draws import best
    from run import workload

    import mcntk
    from mcntk import _budget, monte_carlo

    init_fn, apply_fn, x1, x2, n, vmap_axes = workload(name)
    n = max(n, 2) if name == "W3" else n
    if per_step > n:
        return None
    monte_carlo._Estimator._vmaps_samples = lambda self: per_step > 1
    _budget.samples_per_step = lambda *args: per_step
    fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), n,
                                     vmap_axes=vmap_axes, memory_budget=2**40)
    elapsed = best(lambda: jax.block_until_ready(fn(x1, x2, ("nngp", "ntk"))), repeats)
    assert set(fn.samples_per_step.values()) == {per_step}, fn.samples_per_step
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    import jax
    jax.config.update("jax_threefry_partitionable", False)
    from run import load, machine, write_section

    before = load()
    rows = {name: [seconds(name, c, args.repeats) for c in STEPS]
            for name in ("W1", "W2", "W3")}
    cpu, nproc = machine()
    lines = [SECTION, "",
             f"Machine: {cpu}, `nproc` = {nproc}, jax {jax.__version__}. Load before: "
             f"`{before}`; after: `{load()}`.", "",
             f"Command: `python benchmarks/samples_per_step.py --repeats {args.repeats}`", "",
             "Seconds per `kernel_fn(x1, x2, ('nngp', 'ntk'))`, best of the repeats (W1 16 "
             "samples, W2 4, W3 2). On this CPU more samples per step is not faster, so "
             "mcntk takes one at a time on CPUs.", "",
             "| workload | " + " | ".join(f"{c} per step" for c in STEPS) + " |",
             "|---|" + "---|" * len(STEPS)]
    for name, times in rows.items():
        lines.append(f"| {name} | " + " | ".join("-" if t is None else f"{t:.4f}"
                                                 for t in times) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(args.out, text, SECTION)


if __name__ == "__main__":
    main()
