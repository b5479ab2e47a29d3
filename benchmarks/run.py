"""mcntk against neural-tangents 0.6.5, side by side in one run (issue 8); writes the
"Structured derivatives" section of benchmarks/RESULTS.md.

Workloads (the same as benchmarks/nt065_side.py, which times neural-tangents in its own
venv, ~/.cache/nt065, as a subprocess of this script):

W1:  stax Dense(512)-Relu-Dense(512)-Relu-Dense(10), x1, x2 (64, 32), n_samples=16,
     vmap_axes=0
W1p: W1 with vmap_axes=None (neural-tangents' default; mcntk detects independence)
W2:  Conv(32)-Relu-Conv(64)-Relu-Conv(64)-Flatten-Dense(10) (3x3, SAME), x (8, 8, 8, 3),
     n_samples=4, vmap_axes=0
W3:  Dense(2048)-Relu x 3, Dense(8), x (16, 32), n_samples=1, vmap_axes=0 (the example of
     "Fast Finite Width Neural Tangent Kernel")

Every call is ``kernel_fn(x1, x2, ('nngp', 'ntk'))`` with x1 != x2, key PRNGKey(0),
``jax_threefry_partitionable=False``; the figure is the best of --repeats calls after a
first (compiling) call. Also measured: this machine's f32 matmul peak (a large ``jnp.dot``)
and the structured contraction's throughput on W3 (the FLOPs XLA counts in the one-sample
structured-derivatives kernel divided by its time), and the peak resident memory of a
4096x4096 NTK of a ~1M-parameter MLP (``/usr/bin/time -v`` around a subprocess).

    python benchmarks/run.py [--repeats 3] [--only W1 ...] [--no-nt] [--no-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NT_PYTHON = os.path.expanduser("~/.cache/nt065/bin/python")
IMPLS = {"AUTO": 0, "JC": 1, "VP": 2, "SD": 3}
WORKLOADS = ("W1", "W1p", "W2", "W3")
SECTION = "## Structured derivatives and a fast default (issue 8)"


def w3_params():
    """The number of W3's parameters."""
    import jax
    init_fn, _, x1, *_ = workload("W3")
    shapes = jax.eval_shape(lambda k: init_fn(k, x1.shape)[1], jax.random.PRNGKey(0))
    return sum(s.size for s in jax.tree.leaves(shapes))


def workload(name):
    """(init_fn, apply_fn, x1, x2, n_samples, vmap_axes): nt065_side.py's definitions, so
    that both libraries time the same models and inputs."""
    sys.path.insert(0, HERE)
    from nt065_side import _workload  # stax and jax.random only: imports on current JAX

    return _workload(name)


def time_mcntk(name, impl, repeats, limit):
    """{seconds, first, note} of one configuration (best of ``repeats`` after compiling)."""
    import jax

    import mcntk

    init_fn, apply_fn, x1, x2, n, vmap_axes = workload(name)
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), n,
                                            vmap_axes=vmap_axes, implementation=impl)

    def call():
        start = time.perf_counter()
        jax.block_until_ready(kernel_fn(x1, x2, ("nngp", "ntk")))
        return time.perf_counter() - start

    first = call()
    notes = [str(c.implementation.name) for c in kernel_fn.auto_choices.values()]
    notes += [("per example (detected)" if d.independent else "whole batch")
              for d in kernel_fn.independence.values()]
    out = {"first": first, "note": ", ".join(notes), "seconds": None}
    if first > limit:
        out["note"] += f" first call {first:.1f} s > {limit} s: not repeated"
        out["seconds"] = first
        return out, kernel_fn
    out["seconds"] = min(call() for _ in range(repeats))
    return out, kernel_fn


def time_in_child(name, label, repeats, limit):
    """:func:`time_mcntk` in a fresh process (no shared caches; a crash stays there)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, label,
           "--repeats", str(repeats), "--limit", str(limit)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=limit * (repeats + 1) + 300)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "first": None, "note": "timed out"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"seconds": None, "first": None, "note": f"failed: {tail[:200]}"}
    return json.loads(lines[-1])


def matmul_peak(size=2048, repeats=5):
    """f32 FLOP/s of the best of ``repeats`` ``jnp.dot`` of two ``size x size`` matrices."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def structured_flops(name, repeats=5):
    """(FLOPs XLA counts in one sample's structured-derivatives kernel of ``name``, the
    best time of that jitted kernel given the parameters)."""
    import jax

    import mcntk
    from mcntk.ntk import auto

    init_fn, apply_fn, x1, x2, _, vmap_axes = workload(name)
    params = init_fn(jax.random.PRNGKey(0), x1.shape)[1]
    ntk_fn = mcntk.empirical_kernel_fn(apply_fn, vmap_axes=vmap_axes, implementation=3)
    kernel = lambda p, a, b: ntk_fn(a, b, ("nngp", "ntk"), p)  # noqa: E731
    flops = auto.cost(kernel, params, x1, x2).flops
    jitted = jax.jit(kernel)
    jax.block_until_ready(jitted(params, x1, x2))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(params, x1, x2))
        best = min(best, time.perf_counter() - start)
    return flops, best


MEMORY_SCRIPT = """
import jax, mcntk
from jax.example_libraries import stax
init_fn, apply_fn = stax.serial(stax.Dense(960), stax.Relu, stax.Dense(960), stax.Relu,
                                stax.Dense(10))
x = jax.random.normal(jax.random.PRNGKey(1), ({n}, 128))
kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                        batch_size={b}, implementation={impl})
k = jax.block_until_ready(kernel_fn(x, None, "ntk"))
print("shape", k.shape, "params", sum(p.size for p in jax.tree.leaves(
    init_fn(jax.random.PRNGKey(0), x.shape)[1])), "choice",
    [str(c.implementation.name) for c in kernel_fn.auto_choices.values()])
"""


def peak_memory(n, batch_size, impl, timeout):
    """(peak resident GiB, seconds, stdout tail) of the memory script, or Nones."""
    code = MEMORY_SCRIPT.format(n=n, b=batch_size, impl=impl)
    start = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, None, f"timed out after {timeout} s"
    seconds = time.perf_counter() - start
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        return None, seconds, (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    return int(found.group(1)) / 2 ** 20, seconds, proc.stdout.strip()[-200:]


def run_nt(names, repeats, limit, skip):
    if not os.path.exists(NT_PYTHON):
        return {}, f"{NT_PYTHON} not found: neural-tangents not measured"
    cmd = [NT_PYTHON, os.path.join(HERE, "nt065_side.py"), "--json", "--repeats",
           str(repeats), "--limit", str(limit), "--skip", *skip]
    if len(names) == 1:
        cmd[2:2] = ["--only", names[0]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {}, f"neural-tangents run failed: {proc.stderr.strip()[-300:]}"
    return json.loads(lines[-1]), proc.stderr.strip()


def machine():
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                if ln.startswith("Model name")), platform.processor())
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return cpu, nproc


def load():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def write_section(path, text, section=SECTION):
    """Replaces ``section`` of the results file ``path`` (or appends it) with ``text``."""
    old = open(path).read() if os.path.exists(path) else "# mcntk benchmarks\n"
    start = old.find(section)
    if start >= 0:
        end = old.find("\n## ", start + len(section))
        old = old[:start].rstrip("\n") + ("\n\n" + old[end + 1:] if end >= 0 else "\n")
    with open(path, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=WORKLOADS)
    parser.add_argument("--limit", type=float, default=60.0,
                        help="a configuration whose first call exceeds this is not repeated")
    parser.add_argument("--no-nt", action="store_true", help="skip neural-tangents")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory run")
    parser.add_argument("--memory-n", type=int, default=4096)
    parser.add_argument("--memory-batch", type=int, default=512)
    parser.add_argument("--memory-timeout", type=float, default=300.0)
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--w3-jc", action="store_true",
                        help="also run JACOBIAN_CONTRACTION on W3 (~9 GB of Jacobians)")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import jax
    jax.config.update("jax_threefry_partitionable", False)
    if args._child:
        r, _ = time_mcntk(args._child[0], IMPLS[args._child[1]], args.repeats, args.limit)
        print(json.dumps(r), flush=True)
        return
    names = list(args.only or WORKLOADS)
    load_before = load()
    results = {}
    w3_sd = None
    for name in names:
        for label in IMPLS:
            if name == "W3" and label == "JC" and not args.w3_jc:
                results[(name, label)] = {"seconds": None, "note": "not run (--w3-jc)"}
                continue
            r = time_in_child(name, label, args.repeats, args.limit)
            results[(name, label)] = r
            if name == "W3" and label == "SD":
                w3_sd = r["seconds"]
            print(f"mcntk {name} {label}: {r['seconds']} s ({r['note']})", flush=True)
    peak = matmul_peak()
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    fraction = None
    if w3_sd:
        flops, kernel_s = structured_flops("W3")
        fraction = (flops / kernel_s / peak, flops, kernel_s, flops / w3_sd / peak)
        print(f"W3 SD: {flops:.3g} FLOPs in {kernel_s:.4f} s = {fraction[0]:.1%} of peak",
              flush=True)
    nt, nt_note = ({}, "not run (--no-nt)") if args.no_nt else run_nt(
        names, args.repeats, args.limit, [] if args.w3_jc else ["W3:1"])
    print(nt_note, file=sys.stderr)
    memory = None
    if not args.no_memory:
        memory = peak_memory(args.memory_n, args.memory_batch, 3, args.memory_timeout)
        print(f"memory: {memory}", flush=True)
    load_after = load()

    cpu, nproc = machine()
    cmd = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    lines = [SECTION, "",
             f"Machine: {cpu}, `nproc` = {nproc}, {jax.default_backend()} backend, jax "
             f"{jax.__version__}; neural-tangents 0.6.5 on jax 0.4.25 in its own venv "
             f"(benchmarks/nt065_side.py). The machine is shared with other processes: "
             f"`uptime` before: `{load_before}`; after: `{load_after}`.", "",
             f"Command: `{cmd.strip()}`", "",
             "Seconds per `kernel_fn(x1, x2, ('nngp', 'ntk'))` call, x1 != x2, best of "
             f"{args.repeats} after a first (compiling) call. neural-tangents' columns: its "
             "implementations 1 (JC), 2 (VP), 3 (SD); mcntk's: AUTO (default) and each "
             "implementation; in brackets AUTO's choice and whether the NTK was per example.",
             "",
             "| workload | nt JC | nt VP | nt SD | mcntk AUTO | mcntk JC | mcntk VP | mcntk SD "
             "| nt best / mcntk AUTO |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda s: "skipped" if s is None else f"{s:.3f}"  # noqa: E731
    for name in names:
        ntrow = nt.get(name, {})
        ntv = [ntrow.get(str(i)) for i in (1, 2, 3)]
        ours = [results[(name, lbl)] for lbl in IMPLS]
        best_nt = min((v for v in ntv if v is not None), default=None)
        ratio = (f"{best_nt / ours[0]['seconds']:.2f}" if best_nt and ours[0]["seconds"]
                 else "n/a")
        cells = [fmt(v) for v in ntv] + [f"{fmt(ours[0]['seconds'])} ({ours[0]['note']})"] + [
            fmt(o["seconds"]) for o in ours[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", f"f32 matmul peak (best of 5 `jnp.dot` of 2048x2048): {peak / 1e9:.1f} GFLOP/s."]
    if fraction:
        lines.append(f"Structured contraction on W3 (one sample's SD kernel, both kernels, "
                     f"jitted, given the parameters; best of 5): {fraction[1]:.3g} FLOPs "
                     f"(XLA's count) in {fraction[2]:.4f} s = {fraction[0]:.1%} of that peak. "
                     f"The whole Monte Carlo call ({w3_sd:.3f} s) also draws the "
                     f"{w3_params() / 1e6:.2f}M parameters (threefry; "
                     f"benchmarks/draws.py times the draw alone): "
                     f"{fraction[3]:.1%} of peak over the call.")
    if memory is not None:
        gib, secs, tail = memory
        what = (f"{gib:.2f} GiB peak resident" if gib is not None else f"not measured ({tail})")
        lines.append(f"Memory: {args.memory_n}x{args.memory_n} NTK (`x2=None`, one sample, "
                     f"STRUCTURED_DERIVATIVES, `batch_size={args.memory_batch}`) of stax MLP "
                     f"128-960-960-10 (~1.05M parameters): {what} (`/usr/bin/time -v`), "
                     f"{secs or 0:.0f} s wall. {tail if gib is not None else ''}")
    lines += ["", f"neural-tangents notes: {nt_note[-600:]}" if nt_note else ""]
    text = "\n".join(lines)
    print(text)
    write_section(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
