"""Parameter draws on CPU with the threefry hash unrolled (mcntk/_draws.py) against JAX's
own compilation of the same draw; appends a "Parameter draws" section to RESULTS.md.

For the parameters of W1 and W3 (benchmarks/run.py) under both settings of
``jax_threefry_partitionable``: seconds for one jitted draw ``init_fn(key, shape)``
as JAX compiles it and through ``mcntk._draws.unrolled`` (the bits are checked equal),
and seconds per ``kernel_fn(x1, x2, ('nngp', 'ntk'))`` with mcntk's default settings,
with and without the unrolled draw. Each figure is the best of --repeats calls after a
compiling one. Each setting runs in its own process (the setting is read at tracing).

    python benchmarks/draws.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## Parameter draws (issue 8)"


def best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(partitionable: bool, repeats: int) -> dict:
    import jax
    jax.config.update("jax_threefry_partitionable", partitionable)
    sys.path.insert(0, HERE)
    return {name: _workload(name, repeats) for name in ("W1", "W3")}


def _workload(name: str, repeats: int) -> dict:
    import jax
    import numpy as np
    from run import workload

    import mcntk
    from mcntk import _draws

    init_fn, apply_fn, x1, x2, n, vmap_axes = workload(name)
    init = lambda k: init_fn(k, x1.shape)[1]
    key = jax.random.PRNGKey(0)
    plain, fast = jax.jit(init), jax.jit(_draws.unrolled(init))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain(key)),
                                                     jax.tree.leaves(fast(key))))
    row = {"params": sum(v.size for v in jax.tree.leaves(plain(key))), "same": same,
           "draw_jax": best(lambda: jax.block_until_ready(plain(key)), repeats),
           "draw_unrolled": best(lambda: jax.block_until_ready(fast(key)), repeats)}
    unrolled = _draws.unrolled
    for label, wrap in (("call_unrolled", unrolled), ("call_jax", lambda f: f)):
        _draws.unrolled = wrap
        try:
            kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, n, vmap_axes=vmap_axes)
            row[label] = best(lambda kf=kf: jax.block_until_ready(kf(x1, x2, ("nngp", "ntk"))),
                              repeats)
        finally:
            _draws.unrolled = unrolled
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--_child", choices=["0", "1"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child is not None:
        print(json.dumps(measure(args._child == "1", args.repeats)))
        return
    import jax
    results = {}
    for setting in ("0", "1"):
        child = subprocess.run([sys.executable, __file__, "--_child", setting, "--repeats",
                                str(args.repeats)], check=True, capture_output=True, text=True)
        results[setting] = json.loads(child.stdout.strip().splitlines()[-1])
    lines = [SECTION, "",
             f"Machine: {platform.processor() or platform.machine()}, `nproc` = {os.cpu_count()}, "
             f"{jax.default_backend()} backend, jax {jax.__version__}.", "",
             f"Command: `python benchmarks/draws.py --repeats {args.repeats}`", "",
             "Seconds, best of the repeats after a compiling call. Draw: one jitted "
             "`init_fn(key, shape)` of the workload's parameters; call: "
             "`kernel_fn(x1, x2, ('nngp', 'ntk'))` with mcntk's defaults (W1: 16 samples, "
             "W3: 1).", "",
             "| workload | partitionable | params | draw, JAX | draw, unrolled | same bits | "
             "call, JAX's draw | call, unrolled draw |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, rows in results.items():
        for name, r in rows.items():
            lines.append(f"| {name} | {setting == '1'} | {r['params']} | {r['draw_jax']:.4f} | "
                         f"{r['draw_unrolled']:.4f} | {r['same']} | {r['call_jax']:.4f} | "
                         f"{r['call_unrolled']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out) as f:
        old = f.read()
    if SECTION in old:
        start = old.index(SECTION)
        end = old.find("\n## ", start + 1)
        old = old[:start] + (old[end + 1:] if end != -1 else "")
    with open(args.out, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
