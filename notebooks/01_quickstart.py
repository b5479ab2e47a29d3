# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart, and migrating from neural-tangents
#
# A finite network's **NNGP** kernel is the average over random initialisations of
# `f(x1) f(x2)ᵀ`; its **NTK** the average of `J(x1) J(x2)ᵀ`, with `J` the Jacobian of the
# outputs with respect to the parameters. mcntk estimates both by Monte Carlo: draw
# `n_samples` parameter sets, compute each one's kernel, average. It is the successor of
# `neural_tangents.monte_carlo_kernel_fn`: same arguments, and for the same key the same
# numbers.
#
# This notebook builds a kernel function, reads the shapes it returns, and then checks
# mcntk against numbers computed by neural-tangents 0.6.5 itself.

# %%
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.example_libraries import stax

import mcntk

# %% [markdown]
# ## A kernel function
#
# `monte_carlo_kernel_fn(init_fn, apply_fn, key, n_samples)` returns
# `kernel_fn(x1, x2=None, get=None)`. `get` names the kernels: one name gives an array, a
# tuple of names a namedtuple.

# %%
init_fn, apply_fn = stax.serial(stax.Dense(256), stax.Relu, stax.Dense(10))
kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), n_samples=32,
                                        progress=False)

x1 = jax.random.normal(jax.random.PRNGKey(1), (20, 8))
x2 = jax.random.normal(jax.random.PRNGKey(2), (30, 8))
k = kernel_fn(x1, x2, ("nngp", "ntk"))
ntk_11 = kernel_fn(x1, None, "ntk")  # x2=None means x2 = x1
print(type(k).__name__, k.nngp.shape, k.ntk.shape, ntk_11.shape)
assert k.nngp.shape == k.ntk.shape == (20, 30) and ntk_11.shape == (20, 20)

# %% [markdown]
# The 10 outputs of the last layer are averaged (`trace_axes=(-1,)`, the default; notebook
# 4 explains the axes). With `x2=None` the kernel is symmetric and positive
# semi-definite: every sample's `J Jᵀ` is.

# %%
np.testing.assert_allclose(ntk_11, ntk_11.T, rtol=1e-5)
eigenvalues = np.linalg.eigvalsh(np.asarray(ntk_11, np.float64))
print(f"NTK eigenvalues: {eigenvalues.min():.3g} ... {eigenvalues.max():.3g}")
assert eigenvalues.min() > -1e-4 * eigenvalues.max()

# %% [markdown]
# An iterable `n_samples` makes `kernel_fn` a generator: it yields the estimate at each
# count, computing each sample once. Each count's estimate is the one a plain call with
# that count returns, so one run shows how the estimate settles.

# %%
counts = [1, 2, 4, 8, 16, 32, 64, 128]
generator = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), counts,
                                        progress=False)
estimates = [np.asarray(e) for e in generator(x1, None, "ntk")]
np.testing.assert_allclose(estimates[counts.index(32)], ntk_11, rtol=1e-5)

final = estimates[-1]
change = [np.linalg.norm(e - final) / np.linalg.norm(final) for e in estimates[:-1]]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
ax0.loglog(counts[:-1], change, "o-")
ax0.set_xlabel("n_samples")
ax0.set_ylabel("||K_n - K_128||_F / ||K_128||_F")
ax0.set_title("the estimate settles as samples accumulate")
image = ax1.imshow(final)
fig.colorbar(image, ax=ax1)
ax1.set_title("NTK of x1, 128 samples")
plt.show()
assert change[-1] < change[0] / 4

# %% [markdown]
# ## Same arguments, same numbers as neural-tangents 0.6.5
#
# `tests/data/nt065_mlp.npz` holds estimates that neural-tangents 0.6.5 computed (on JAX
# 0.4.25) for a small stax MLP; `tests/data/README.md` lists the exact calls. To reproduce
# them, mcntk only needs the random-number setting JAX used then:
# `jax_threefry_partitionable=False` (current JAX defaults to `True`, which draws other
# parameters from the same key).

# %%
found = [p / "tests" / "data" / "nt065_mlp.npz" for p in [Path.cwd(), *Path.cwd().parents]
         if (p / "tests" / "data" / "nt065_mlp.npz").exists()]
if not found:
    raise FileNotFoundError("tests/data/nt065_mlp.npz ships with the repository, not with the "
                            "package: run this notebook from inside a checkout of mcntk")
golden_path = found[0]
golden = dict(np.load(golden_path))
g_init, g_apply = stax.serial(stax.Dense(64), stax.Relu, stax.Dense(3))
g_key, g_x1, g_x2 = jnp.asarray(golden["key"]), golden["x1"], golden["x2"]


def relative_error(actual, expected):
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


# %% [markdown]
# The calls below are the neural-tangents calls with `nt.` replaced by `mcntk.`: the
# three NTK implementations with `vmap_axes=0`, the full output kernel (`trace_axes=()`),
# a batched grid (`batch_size=2`) and the generator form.

# %%
previous = jax.config.jax_threefry_partitionable
jax.config.update("jax_threefry_partitionable", False)
try:
    errors = {}
    for impl in (1, 2, 3):
        k = mcntk.monte_carlo_kernel_fn(g_init, g_apply, g_key, 4, vmap_axes=0,
                                        implementation=impl)(g_x1, g_x2, ("nngp", "ntk"))
        errors[f"implementation={impl}"] = max(relative_error(k.nngp, golden[f"nngp_impl{impl}"]),
                                               relative_error(k.ntk, golden[f"ntk_impl{impl}"]))
    k = mcntk.monte_carlo_kernel_fn(g_init, g_apply, g_key, 4, trace_axes=())(
        g_x1, None, ("nngp", "ntk"))
    errors["trace_axes=(), x2=None"] = max(relative_error(k.nngp, golden["nngp_full_x2none"]),
                                           relative_error(k.ntk, golden["ntk_full_x2none"]))
    k = mcntk.monte_carlo_kernel_fn(g_init, g_apply, g_key, 4, batch_size=2)(
        g_x1, g_x2, ("nngp", "ntk"))
    errors["batch_size=2"] = max(relative_error(k.nngp, golden["nngp_batched2"]),
                                 relative_error(k.ntk, golden["ntk_batched2"]))
    for n, est in zip((1, 2, 4), mcntk.monte_carlo_kernel_fn(g_init, g_apply, g_key,
                                                             [1, 2, 4])(g_x1, g_x2, "ntk")):
        errors[f"generator, n={n}"] = relative_error(est, golden[f"ntk_gen_{n}"])
finally:
    jax.config.update("jax_threefry_partitionable", previous)

for name, err in errors.items():
    print(f"{name:>24}: max|mcntk - nt| / max|nt| = {err:.1e}")
assert max(errors.values()) <= 1e-5

# %%
fig, ax = plt.subplots(figsize=(8, 3), layout="constrained")
ax.barh(list(errors), [max(e, 1e-9) for e in errors.values()])
ax.axvline(1e-5, color="k", ls="--", label="bound asserted above (float32 rounding)")
ax.set_xscale("log")
ax.set_xlabel("largest difference from neural-tangents 0.6.5, relative")
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# ## What changes when you port code
#
# | | neural-tangents 0.6.5 | mcntk |
# |---|---|---|
# | import | `import neural_tangents as nt` | `import mcntk` |
# | Monte Carlo kernels | `nt.monte_carlo_kernel_fn(init_fn, apply_fn, key, n_samples, batch_size, device_count, store_on_device, trace_axes, diagonal_axes, vmap_axes, implementation)` | the same call, same meanings, same numbers for the same key |
# | one sample's kernels | `nt.empirical_kernel_fn`, `empirical_nngp_fn`, `empirical_ntk_fn` | same names: `mcntk.empirical_kernel_fn`, ... |
# | default `implementation` | `JACOBIAN_CONTRACTION` | `AUTO`: the cheapest of the three by XLA's cost model (same numbers up to rounding) |
# | pytree outputs | the output's structure, one namedtuple per leaf | the same nesting |
# | models | stax pairs | stax pairs, plus Flax linen/NNX, Haiku and Equinox models passed directly ([adapters](../docs/adapters.md), notebooks 2 and 3) |
# | devices | `device_count` (pmap) | `device_count`, or `mesh=` / `sample_axes=` over a `jax.sharding.Mesh`, one process or many (notebook 5) |
# | accuracy | none | `stderr=True` returns `mcntk.Estimate(mean, stderr, n_samples)`; `rtol=` stops early (notebook 6) |
# | long runs | none | `checkpoint_dir=` (resume after a crash), `progress=` (a tqdm bar) |
# | private knobs | `_j_rules`, `_s_rules`, `_fwd` | gone |
#
# The only setting to remember is the PRNG one above, and only to reproduce numbers
# computed on JAX 0.4.25: new runs on current JAX use the current default.
