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
# # The output axes: `trace_axes`, `diagonal_axes`, `vmap_axes`
#
# A kernel compares every output entry of `f(x1)` with every output entry of `f(x2)`.
# For an output with several axes that is a large object; `trace_axes` and
# `diagonal_axes` say which pairs to keep. The rule, stated once in
# [the axes page](../docs/axes.md): for each output axis `i`,
#
# * `i` in `trace_axes`: the axis is summed over, and divided by its size (a mean);
# * `i` in `diagonal_axes`: only equal indices are kept, one axis in the kernel;
# * otherwise the pair `(n1_i, n2_i)` of axes.
#
# This notebook computes the shapes for a convolutional network whose output has shape
# `(N, H, W, C)`, draws one such kernel, and shows what `vmap_axes` changes (speed) and
# does not change (the numbers).

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np
from jax.example_libraries import stax

import mcntk

# %% [markdown]
# A fully convolutional network: two 3x3 convolutions, output `(N, H=5, W=6, C=3)`.

# %%
init_fn, apply_fn = stax.serial(stax.Conv(16, (3, 3), padding="SAME"), stax.Relu,
                                stax.Conv(3, (3, 3), padding="SAME"))
x1 = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 4))
x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 6, 4))
abstract_params = jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0), x1.shape)[1])
print("output shape:", jax.eval_shape(apply_fn, abstract_params, x1).shape)


def kernel(trace_axes, diagonal_axes, x2=x2, n=2):
    fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), n,
                                     trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                                     progress=False)
    return fn(x1, x2, "ntk")


# %% [markdown]
# ## The shapes
#
# Every mcntk function that takes these arguments applies the same rule, so the shapes
# can be planned before anything runs: `jax.eval_shape` traces the one-sample kernel of
# `mcntk.empirical_kernel_fn` with abstract parameters and computes nothing (useful to
# check that a kernel fits in memory). Each row is compared with the shape the rule
# predicts.

# %%
def kernel_shape(trace_axes, diagonal_axes, second):
    fn = mcntk.empirical_kernel_fn(apply_fn, trace_axes, diagonal_axes)
    return jax.eval_shape(lambda p: fn(x1, second, "ntk", p), abstract_params).shape


cases = [  # trace_axes, diagonal_axes, x2, the shape the rule predicts
    ((-1,), (), x2, (2, 3, 5, 5, 6, 6)),
    ((), (), x2, (2, 3, 5, 5, 6, 6, 3, 3)),
    ((-1,), (1,), x2, (2, 3, 5, 6, 6)),
    ((1, 2), (), x2, (2, 3, 3, 3)),
    ((1, 2, 3), (), x2, (2, 3)),
    ((), (-1,), x2, (2, 3, 5, 5, 6, 6, 3)),
    ((-1,), (0,), None, (2, 5, 5, 6, 6)),
    ((-1,), (1, 2), x2, (2, 3, 5, 6)),
]
rows = ["| `trace_axes` | `diagonal_axes` | `x2` | kernel shape |", "|---|---|---|---|"]
for trace_axes, diagonal_axes, second, expected in cases:
    shape = kernel_shape(trace_axes, diagonal_axes, second)
    assert shape == expected, (trace_axes, diagonal_axes, shape, expected)
    rows.append(f"| `{trace_axes}` | `{diagonal_axes}` | "
                f"{'`None`' if second is None else '3 examples'} | `{shape}` |")
table = "\n".join(rows)
print(table)  # as text: readable when the notebook runs as a plain script too

# %% [markdown]
# ## A picture of one kernel
#
# The Monte Carlo estimator returns the same shapes. With `x2=None`, `diagonal_axes=(0,)`
# keeps one example at a time (each example with itself) and `trace_axes=(-1,)` averages
# the channels: `K[n, h, h', w, w']` says how output pixel `(h, w)` co-varies with pixel
# `(h', w')` for example `n`. Seen as a 30 x 30 matrix over pixels it is a covariance:
# symmetric, positive semi-definite, and largest near its diagonal, where the two pixels'
# receptive fields overlap most.

# %%
fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 32,
                                 trace_axes=(-1,), diagonal_axes=(0,), progress=False)
k = fn(x1, None, ("nngp", "ntk"))
print(k.nngp.shape, k.ntk.shape)
assert k.nngp.shape == k.ntk.shape == cases[6][3]
nngp = np.asarray(k.nngp[0]).transpose(0, 2, 1, 3).reshape(30, 30)  # (h, w) x (h', w')
ntk = np.asarray(k.ntk[0]).transpose(0, 2, 1, 3).reshape(30, 30)
for matrix in (nngp, ntk):
    np.testing.assert_allclose(matrix, matrix.T, rtol=1e-4, atol=1e-6)
    eigenvalues = np.linalg.eigvalsh(matrix.astype(np.float64))
    assert eigenvalues.min() > -1e-4 * eigenvalues.max()
h, w = np.divmod(np.arange(30), 6)
distance = np.maximum(np.abs(h[:, None] - h[None]), np.abs(w[:, None] - w[None]))
assert ntk[distance == 0].mean() > ntk[distance == 1].mean() > ntk[distance >= 3].mean()

fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
for ax, (name, image) in zip(axes, [("NNGP", nngp), ("NTK", ntk)]):
    shown = ax.imshow(image, cmap="viridis")
    fig.colorbar(shown, ax=ax)
    ax.set_title(f"{name} of example 0: pixel (h, w) vs pixel (h', w')")
    ax.set_xlabel("h' * 6 + w'")
    ax.set_ylabel("h * 6 + w")
plt.show()

# %% [markdown]
# ## Traces and diagonals are views of the full kernel
#
# The same key draws the same parameters whatever the axes, so the kernel above is a view
# of the full one (`trace_axes=()`: every pair of output entries): its example diagonal,
# with the channel pairs `(c, c)` averaged.

# %%
full = np.asarray(kernel((), (), x2=None, n=32))  # (N, N, H, H', W, W', C, C')
print(full.shape)
assert full.shape == (2, 2, 5, 5, 6, 6, 3, 3)
view = np.einsum("nnhgwvcc->nhgwv", full) / 3
np.testing.assert_allclose(np.asarray(k.ntk), view, rtol=1e-4, atol=1e-6)

# %% [markdown]
# ## `vmap_axes`: the same numbers
#
# `vmap_axes=0` declares that the model treats the examples along axis 0 independently
# (`(in_axes, out_axes, kwargs_axes)` for other layouts). The NTK can then be built from
# per-example derivatives, which is often much cheaper for large batches (`benchmarks/`
# measures both). The estimate does not change. With `vmap_axes=None` mcntk tries to prove
# that independence itself (`detect_vmap_axes=True`, the default; see
# [the axes page](../docs/axes.md)) and computes the NTK of the whole batch when it cannot,
# as for BatchNorm in training mode. Below, the per-example path against the whole-batch
# one (`detect_vmap_axes=False`).

# %%
xs = jax.random.normal(jax.random.PRNGKey(3), (8, 5, 6, 4))
results = {}
for vmap_axes in (None, 0):
    fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2,
                                     vmap_axes=vmap_axes, detect_vmap_axes=False,
                                     progress=False)
    results[vmap_axes] = np.asarray(fn(xs, None, "ntk"))
difference = np.abs(results[0] - results[None]).max() / np.abs(results[None]).max()
print(f"largest difference, per example (vmap_axes=0) vs whole batch: {difference:.1e} "
      "(relative)")
assert results[0].shape == (8, 8, 5, 5, 6, 6) and difference < 1e-5

# %% [markdown]
# ## Pytree outputs
#
# A model returning several outputs gets one kernel per output leaf, nested as
# neural-tangents nests them: a tuple of names gives the output's structure holding one
# namedtuple per leaf.

# %%
def two_heads(params, x, **kwargs):
    features = apply_fn(params, x)  # (N, H, W, C)
    return {"features": features, "pooled": features.mean(axis=(1, 2))}


fn = mcntk.monte_carlo_kernel_fn(init_fn, two_heads, jax.random.PRNGKey(0), 2, progress=False)
r = fn(x1, x2, ("nngp", "ntk"))
print({name: (leaf.nngp.shape, leaf.ntk.shape) for name, leaf in r.items()})
assert r["pooled"].ntk.shape == (2, 3) and r["features"].ntk.shape == (2, 3, 5, 5, 6, 6)
assert type(r["pooled"]).__name__ == "MonteCarloKernel"
