"""Times mcntk on the workloads of issue 2 and writes benchmarks/RESULTS.md.

W1: stax MLP 32->512->512->10, x1 = x2 of shape (64, 32), n_samples=16,
    get=('nngp', 'ntk'), vmap_axes 0 and None.
W2: Conv(32)-Relu-Conv(64)-Relu-Conv(64)-Flatten-Dense(10) (3x3, SAME),
    x of shape (8, 8, 8, 3), n_samples=4, vmap_axes=0.

Each configuration is timed after compilation (the median of --repeats calls of a
kernel function that has already run once). Usage:

    python benchmarks/run.py [--repeats 3] [--only W1] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import jax
from jax.example_libraries import stax

import mcntk

IMPLS = {"JC": 1, "VP": 2, "AUTO": 0}

REFERENCE = (
    "Reference (figures from the issue, not re-measured here: neural-tangents 0.6.5 no longer "
    "imports on current JAX): on this kind of machine neural-tangents' JACOBIAN_CONTRACTION "
    "took about 19 s and its NTK_VECTOR_PRODUCTS about 14 s on W1 with vmap_axes=0."
)


def w1():
    init_fn, apply_fn = stax.serial(stax.Dense(512), stax.Relu, stax.Dense(512), stax.Relu,
                                    stax.Dense(10))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 32))
    return init_fn, apply_fn, x, 16, [0, None]


def w2():
    conv = lambda c: stax.Conv(c, (3, 3), padding="SAME")
    init_fn, apply_fn = stax.serial(conv(32), stax.Relu, conv(64), stax.Relu, conv(64),
                                    stax.Flatten, stax.Dense(10))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
    return init_fn, apply_fn, x, 4, [0]


WORKLOADS = {"W1": w1, "W2": w2}


def time_config(init_fn, apply_fn, x, n, vmap_axes, impl, repeats):
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), n,
                                            vmap_axes=vmap_axes, implementation=impl)
    start = time.perf_counter()
    jax.block_until_ready(kernel_fn(x, x, ("nngp", "ntk")))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(kernel_fn(x, x, ("nngp", "ntk")))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {jax.default_backend()} backend, "
            f"jax {jax.__version__}, mcntk {mcntk.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    rows = []
    for name, make in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        init_fn, apply_fn, x, n, vmaps = make()
        for vmap_axes in vmaps:
            for impl_name, impl in IMPLS.items():
                first, warm = time_config(init_fn, apply_fn, x, n, vmap_axes, impl, args.repeats)
                row = (name, str(vmap_axes), impl_name, f"{warm:.2f}", f"{first:.2f}")
                print(" | ".join(row), flush=True)
                rows.append(row)
    lines = [
        "# mcntk benchmarks",
        "",
        f"Machine: {machine()}.",
        "",
        f"Command: `python benchmarks/run.py --repeats {args.repeats}"
        + (f" --only {args.only}" if args.only else "") + "`",
        "",
        "Seconds for one `kernel_fn(x, x, ('nngp', 'ntk'))` call: median of the calls after the "
        "first (compiled), and the first call (compilation included).",
        "",
        "| workload | vmap_axes | implementation | seconds (compiled) | first call |",
        "|---|---|---|---|---|",
    ] + ["| " + " | ".join(r) + " |" for r in rows] + ["", REFERENCE]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
