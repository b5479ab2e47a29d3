"""Time per sample and work per device on 1, 2, 4 and 8 simulated CPU devices.

Workload: stax MLP 8->64->64->1 (ReLU), x1 of shape (40, 8), x2 of shape (24, 8),
``get=('nngp', 'ntk')``, JACOBIAN_CONTRACTION, with ``batch_size=8`` (5 x 3 = 15
blocks: spread over block rows) and ``batch_size=0`` (one block: samples spread over
the devices). Each device count runs in its own subprocess
(``XLA_FLAGS=--xla_force_host_platform_device_count=D``); the time per sample is that
of the samples after the first call (compiled), from a generator of estimates at
``--warmup`` and ``--warmup + --samples`` samples.

Simulated devices share the machine's cores: the table shows that the work is
spread evenly, not a speed-up. Usage:

    python benchmarks/sharding.py [--samples 32] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

DEVICE_COUNTS = (1, 2, 4, 8)


def child(samples: int, warmup: int, batch_size: int) -> dict:
    """Runs in a subprocess with the device count set by XLA_FLAGS."""
    import jax
    from jax.example_libraries import stax

    import mcntk
    from mcntk import _placement

    init_fn, apply_fn = stax.serial(stax.Dense(64), stax.Relu, stax.Dense(64), stax.Relu,
                                    stax.Dense(1))
    x1 = jax.random.normal(jax.random.PRNGKey(1), (40, 8))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (24, 8))
    gen = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0),
                                      [warmup, warmup + samples], batch_size=batch_size,
                                      implementation=1)(x1, x2, ("nngp", "ntk"))
    start = time.perf_counter()
    jax.block_until_ready(next(gen))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(next(gen))
    steady = time.perf_counter() - start

    devices = _placement.select(-1)
    blocks = (40 // batch_size) * (24 // batch_size) if batch_size else 1
    placement = _placement.place(devices, blocks)
    _, valid = placement.layout(blocks)
    per_row = valid.reshape(placement.db, -1).sum(axis=1)  # blocks of each block row
    per_column = [len(range(c, samples, placement.ds)) for c in range(placement.ds)]
    work = [int(b) * s for b in per_row for s in per_column]  # block-samples per device
    return {"batch_size": batch_size, "devices": len(devices.devices), "db": placement.db,
            "ds": placement.ds,
            "blocks": blocks, "blocks_per_device": [int(per_row.min()), int(per_row.max())],
            "samples_per_device": [min(per_column), max(per_column)],
            "work": [min(work), max(work)], "even": blocks * samples / len(devices.devices),
            "first_s": first, "per_sample_ms": 1e3 * steady / samples,
            "platform": devices.platform, "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--append", help="append the results section to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.samples, args.warmup, args.batch_size)))
        return
    rows, load_start = [], os.getloadavg()
    for batch_size in (8, 0):
        for d in DEVICE_COUNTS:
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
                       JAX_PLATFORMS="cpu")
            out = subprocess.run([sys.executable, __file__, "--child", "--samples",
                                  str(args.samples), "--warmup", str(args.warmup),
                                  "--batch-size", str(batch_size)],
                                 env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    text = report(rows, args, load_start, os.getloadavg())
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


def report(rows: list[dict], args, load_start, load_end) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    r0 = rows[0]
    spread = lambda v: f"{v[0]}" if v[0] == v[1] else f"{v[0]}-{v[1]}"
    lines = [
        "## Sharding: work per device (issue 7)", "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {r0['platform']} backend, jax {r0['jax']}; "
        f"1-minute load average {load_start[0]:.1f} when the run started, {load_end[0]:.1f} "
        f"when it ended (the machine is shared: other processes ran meanwhile).", "",
        f"Command: `python benchmarks/sharding.py --samples {args.samples}`", "",
        f"stax MLP 8-64-64-1, x1 (40, 8), x2 (24, 8), `get=('nngp', 'ntk')`, "
        f"JACOBIAN_CONTRACTION; `batch_size=8` (15 blocks) and `batch_size=0` (1 block); "
        f"{args.samples} samples timed after the first {args.warmup} (compiled). "
        "Simulated CPU devices share the same cores, so the time per sample measures the "
        "overhead of spreading, not a speed-up; the point is that every device gets an "
        "equal share of blocks x samples (`work`, in block-samples; `even` = total / "
        "devices).", "",
        "| batch_size | devices | block rows x sample columns | blocks per device "
        "| samples per device | work per device | even | ms per sample | first call (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['devices']} | {r['db']} x {r['ds']} | "
            f"{spread(r['blocks_per_device'])} | "
            f"{spread(r['samples_per_device'])} | {spread(r['work'])} | {r['even']:.0f} | "
            f"{r['per_sample_ms']:.1f} | {r['first_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
