"""Regenerate tests/data/nt065_dropout.npz and tests/data/nt065_cnn.npz with neural-tangents 0.6.5.

NOT part of the test suite and not run by pytest or CI: it imports neural_tangents, which only
imports on JAX <= 0.4.25. Run it inside the separate neural-tangents venv (recipe in
tests/data/README.md):

    python3 -m venv ~/.cache/nt065 && ~/.cache/nt065/bin/pip install -q "neural-tangents==0.6.5" \\
      "jax==0.4.25" "jaxlib==0.4.25" "tf2jax==0.3.6" "numpy==1.26.4" "ml_dtypes==0.5.1"
    cd tests/data && ~/.cache/nt065/bin/python make_goldens.py [--out DIR]

The models come from jax.example_libraries.stax (not neural_tangents.stax), so the same
parameters can be rebuilt on current JAX with jax_threefry_partitionable=False. Every array the
script stores, and every configuration neural-tangents refuses, is listed in tests/data/README.md.
The script prints, for each configuration, the array names it stored or the error it got.
"""

import argparse
import os

import jax

jax.config.update("jax_threefry_partitionable", False)  # JAX 0.4.25's default; explicit here
jax.config.update("jax_enable_x64", False)

import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from jax import random  # noqa: E402
from jax.example_libraries import stax  # noqa: E402

GET = ("nngp", "ntk")


def _run(store, refused, name, init_fn, apply_fn, key, n, x1, x2, **kw):
    """Store kernel_fn(x1, x2, ('nngp', 'ntk')) as nngp_<name>, ntk_<name> (or record a refusal)."""
    try:
        kernel_fn = nt.monte_carlo_kernel_fn(init_fn, apply_fn, key, n, **kw)
        nngp, ntk = kernel_fn(x1, x2, GET)
        nngp, ntk = np.asarray(nngp, np.float32), np.asarray(ntk, np.float32)
    except Exception as e:  # noqa: BLE001 -- any refusal is recorded, not fatal
        refused[name] = f"{type(e).__name__}: {e}"
        print(f"  {name:24s} REFUSED {refused[name][:300]}")
        return
    store[f"nngp_{name}"] = nngp
    store[f"ntk_{name}"] = ntk
    print(f"  {name:24s} nngp {nngp.shape} ntk {ntk.shape} kw={kw}")


def dropout_goldens():
    init_fn, apply_fn = stax.serial(stax.Dense(64), stax.Relu,
                                    stax.Dropout(0.8, mode="train"), stax.Dense(3))
    kx1, kx2 = random.split(random.PRNGKey(7))
    x1 = random.normal(kx1, (6, 5))
    x2 = random.normal(kx2, (4, 5))
    x1_copy = np.array(x1).copy()  # equal values, distinct array
    key = random.PRNGKey(42)
    n = 4
    store = {"x1": np.asarray(x1), "x2": np.asarray(x2), "key": np.asarray(key)}
    refused = {}
    args = (store, refused)
    model = (init_fn, apply_fn, key, n)
    _run(*args, "x2", *model, x1, x2)                                        # (i)
    _run(*args, "x2none", *model, x1, None)                                  # (ii)
    _run(*args, "x2copy", *model, x1, x1_copy)                               # (iii)
    _run(*args, "batched2_x2", *model, x1, x2, batch_size=2)                 # (iv)
    _run(*args, "batched2_x2none", *model, x1, None, batch_size=2)           # (v)
    _run(*args, "vmap0_x2", *model, x1, x2, vmap_axes=0)                     # (vi)
    _run(*args, "full_x2none", *model, x1, None, trace_axes=())              # (vii)
    for impl in (1, 2, 3):                                                   # (viii)
        _run(*args, f"impl{impl}_x2", *model, x1, x2, implementation=impl)
    return store, refused


def cnn_goldens():
    conv = lambda c: stax.Conv(c, (3, 3), padding="SAME")  # noqa: E731
    init_fn, apply_fn = stax.serial(conv(8), stax.Relu, conv(8), stax.Relu,
                                    stax.Flatten, stax.Dense(3))
    kx1, kx2 = random.split(random.PRNGKey(11))
    x1 = random.normal(kx1, (3, 6, 6, 2))
    x2 = random.normal(kx2, (2, 6, 6, 2))
    key = random.PRNGKey(5)
    n = 3
    store = {"x1": np.asarray(x1), "x2": np.asarray(x2), "key": np.asarray(key)}
    refused = {}
    args = (store, refused)
    for impl in (1, 2, 3):
        for vmap_axes, tag in ((0, "vmap0"), (None, "vmapnone")):
            _run(*args, f"impl{impl}_{tag}", init_fn, apply_fn, key, n, x1, x2,
                 vmap_axes=vmap_axes, implementation=impl)

    # Fully convolutional: output (N, 6, 6, 3); trace the channel axis, diagonal over axis 1.
    fcn_init, fcn_apply = stax.serial(conv(4), stax.Relu, conv(3))
    for impl in (3, 1):
        _run(*args, f"fcn_impl{impl}", fcn_init, fcn_apply, key, n, x1, x2,
             trace_axes=(-1,), diagonal_axes=(1,), implementation=impl)
    return store, refused


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    print(f"jax {jax.__version__}, neural-tangents {nt.__version__}, "
          f"threefry_partitionable={jax.config.jax_threefry_partitionable}")
    for fname, make in (("nt065_dropout.npz", dropout_goldens), ("nt065_cnn.npz", cnn_goldens)):
        print(fname)
        store, refused = make()
        np.savez(os.path.join(args.out, fname), **store)
        for name, err in refused.items():
            print(f"  refused: {name}: {err[:300]}")


if __name__ == "__main__":
    main()
