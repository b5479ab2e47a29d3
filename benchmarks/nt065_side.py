"""Times neural-tangents 0.6.5's monte_carlo_kernel_fn on the benchmark workloads.

Runs ONLY inside the separate neural-tangents venv (neural-tangents 0.6.5 imports only on
JAX <= 0.4.25), never in the project's environment, and does not import mcntk:

    python3 -m venv ~/.cache/nt065 && ~/.cache/nt065/bin/pip install -q "neural-tangents==0.6.5" \\
      "jax==0.4.25" "jaxlib==0.4.25" "tf2jax==0.3.6" "numpy==1.26.4" "ml_dtypes==0.5.1"
    ~/.cache/nt065/bin/python benchmarks/nt065_side.py [--only W1] [--repeats 3] [--json]

benchmarks/run.py calls it as a subprocess (with --json) when ~/.cache/nt065/bin/python exists,
so both libraries are timed in the same benchmark run.

Models are built with jax.example_libraries.stax (all three implementations, including 3,
structured derivatives, accept them). Every call is kernel_fn(x1, x2, ('nngp', 'ntk')) with two
different random inputs of the same shape, key PRNGKey(0), jax_threefry_partitionable=False.

W1:  Dense(512)-Relu-Dense(512)-Relu-Dense(10), x (64, 32), n_samples=16, vmap_axes=0
W1p: W1 with vmap_axes=None
W2:  Conv(32)-Relu-Conv(64)-Relu-Conv(64)-Flatten-Dense(10) (3x3, SAME), x (8, 8, 8, 3),
     n_samples=4, vmap_axes=0
W3:  Dense(2048)-Relu x 3 then Dense(8), x (16, 32), n_samples=1, vmap_axes=0 (the example of
     the "Fast Finite Width Neural Tangent Kernel" paper)

Each (workload, implementation) runs in its own child process: one warm-up call (compilation),
then the best (minimum) of --repeats timed calls. A configuration whose single call takes more
than --limit seconds (default 60) is not repeated and is reported as skipped (null); a child
that has not finished after --limit * (repeats + 1) + 120 s is killed and reported as skipped.
With --json, stdout is one JSON object {workload: {implementation: seconds or null}}; notes
(skips, errors) go to stderr. Without it, a table is printed.
"""

import argparse
import json
import os
import subprocess
import sys
import time

IMPLS = (1, 2, 3)
WORKLOADS = ("W1", "W1p", "W2", "W3")


def _workload(name):
    """(init_fn, apply_fn, x1, x2, n_samples, vmap_axes) of a workload."""
    from jax import random
    from jax.example_libraries import stax

    k1, k2 = random.split(random.PRNGKey(1))
    if name in ("W1", "W1p"):
        init_fn, apply_fn = stax.serial(stax.Dense(512), stax.Relu, stax.Dense(512), stax.Relu,
                                        stax.Dense(10))
        shape, n, vmap_axes = (64, 32), 16, (0 if name == "W1" else None)
    elif name == "W2":
        conv = lambda c: stax.Conv(c, (3, 3), padding="SAME")  # noqa: E731
        init_fn, apply_fn = stax.serial(conv(32), stax.Relu, conv(64), stax.Relu, conv(64),
                                        stax.Flatten, stax.Dense(10))
        shape, n, vmap_axes = (8, 8, 8, 3), 4, 0
    elif name == "W3":
        init_fn, apply_fn = stax.serial(stax.Dense(2048), stax.Relu, stax.Dense(2048), stax.Relu,
                                        stax.Dense(2048), stax.Relu, stax.Dense(8))
        shape, n, vmap_axes = (16, 32), 1, 0
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    return init_fn, apply_fn, random.normal(k1, shape), random.normal(k2, shape), n, vmap_axes


def _child(name, impl, repeats, limit):
    """Times one configuration in this process; prints {"seconds": s or None, "note": ...}."""
    import jax
    jax.config.update("jax_threefry_partitionable", False)
    import neural_tangents as nt
    from jax import random

    init_fn, apply_fn, x1, x2, n, vmap_axes = _workload(name)
    kernel_fn = nt.monte_carlo_kernel_fn(init_fn, apply_fn, random.PRNGKey(0), n,
                                         vmap_axes=vmap_axes, implementation=impl)

    def call():
        start = time.perf_counter()
        jax.block_until_ready(kernel_fn(x1, x2, ("nngp", "ntk")))
        return time.perf_counter() - start

    first = call()
    if first > limit:
        return {"seconds": None, "note": f"warm-up call took {first:.1f} s > {limit} s; skipped"}
    best = None
    for _ in range(repeats):
        t = call()
        best = t if best is None else min(best, t)
        if t > limit:
            return {"seconds": None, "note": f"a timed call took {t:.1f} s > {limit} s; skipped"}
    return {"seconds": best, "note": f"warm-up {first:.2f} s"}


def _run_config(name, impl, repeats, limit):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, str(impl),
           "--repeats", str(repeats), "--limit", str(limit)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=limit * (repeats + 1) + 120)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "note": "child process timed out; skipped"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"seconds": None, "note": f"failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=WORKLOADS, help="run one workload")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the best counts")
    parser.add_argument("--limit", type=float, default=60.0,
                        help="skip a configuration whose single call exceeds this many seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--skip", nargs="*", default=[], metavar="WORKLOAD:IMPL",
                        help="configurations not to run (reported as null), e.g. W3:1")
    parser.add_argument("--_child", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    if args._child:
        name, impl = args._child
        print(json.dumps(_child(name, int(impl), args.repeats, args.limit)), flush=True)
        return

    results = {}
    for name in ([args.only] if args.only else WORKLOADS):
        results[name] = {}
        for impl in IMPLS:
            if f"{name}:{impl}" in args.skip:
                results[name][str(impl)] = None
                print(f"{name} impl {impl}: not run (--skip)", file=sys.stderr, flush=True)
                continue
            r = _run_config(name, impl, args.repeats, args.limit)
            results[name][str(impl)] = r["seconds"]
            shown = "skipped" if r["seconds"] is None else f"{r['seconds']:.3f} s"
            print(f"{name} impl {impl}: {shown} ({r['note']})", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'workload':8s}" + "".join(f"{'impl ' + str(i):>12s}" for i in IMPLS))
        for name, row in results.items():
            cells = ("skipped" if row[str(i)] is None else f"{row[str(i)]:.3f}" for i in IMPLS)
            print(f"{name:8s}" + "".join(f"{c:>12s}" for c in cells))


if __name__ == "__main__":
    main()
