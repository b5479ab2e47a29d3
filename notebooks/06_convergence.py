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
# # Convergence, standard errors and kernel regression
#
# A Monte Carlo estimate converges to the *expected* kernel of the finite network at
# rate `1/sqrt(n_samples)`. With `stderr=True` mcntk says how far along it is: each
# kernel comes back as an `mcntk.Estimate(mean, stderr, n_samples)` with a standard
# error per entry. For a ReLU network in NTK parameterisation the infinite-width kernels
# are known in closed form (the arc-cosine kernels), so this notebook can check the
# estimate and its error bars against the truth, see where finite width shows, stop at a
# target accuracy, and use the kernel for regression.
#
# The network and its exact kernels are those of `mcntk demo` (which writes the same
# network in Flax, `mcntk.demo.flax_relu_network`; here its stax form
# `mcntk.demo.relu_network`, with `mcntk.demo.arccos_kernels`): layers
# `sqrt(2) * x @ W / sqrt(fan_in) + 0.1 * b` with standard normal `W` and `b`.

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

import mcntk
from mcntk import demo

data = demo.load_data("spirals", train=120, test=80, seed=0)
x = data.x_train[:40]  # 40 points in the plane
exact_nngp, exact_ntk = demo.arccos_kernels(x.astype(np.float64), depth=1)

# %% [markdown]
# ## Standard errors
#
# With one hidden layer the expected kernel of a network of *any* width is the
# infinite-width one (the hidden pre-activations are exactly Gaussian), so the error of
# the estimate is Monte Carlo error only, and the standard errors should describe it.

# %%
counts = [4, 16, 64, 256, 1024]
init_fn, apply_fn = demo.relu_network(width=256, depth=1, out=4)
fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), counts, vmap_axes=0,
                                 stderr=True, progress=False)
estimates = list(fn(x, None, "ntk"))
assert isinstance(estimates[-1], mcntk.Estimate)
assert [e.n_samples for e in estimates] == counts

norm = np.linalg.norm(exact_ntk)
error = np.array([np.linalg.norm(np.asarray(e.mean) - exact_ntk) / norm for e in estimates])
spread = np.array([np.linalg.norm(e.stderr) / norm for e in estimates])
for n, err, se in zip(counts, error, spread):
    print(f"{n:>5} samples: error {err:.4f}, standard error {se:.4f} (relative, Frobenius)")
assert np.all(error < 4 * spread)  # the error is within a few standard errors
assert spread[-1] < spread[0] / 10  # 1/sqrt(n): 256x the samples, 1/16 the error bars

last = estimates[-1]
upper = np.triu_indices(len(x))  # the kernel is symmetric: count each pair once
z = ((np.asarray(last.mean) - exact_ntk) / np.asarray(last.stderr))[upper]
coverage = float(np.mean(np.abs(z) <= 1.96))
print(f"95% intervals (mean +- 1.96 stderr) cover the exact kernel for {coverage:.0%} of "
      f"entries; z-scores have standard deviation {z.std():.2f}")
assert 0.8 <= coverage <= 1.0 and 0.5 < z.std() < 1.5

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
ax0.loglog(counts, error, "o-", label="error: ||mean - exact||_F / ||exact||_F")
ax0.loglog(counts, spread, "s--", label="||stderr||_F / ||exact||_F")
ax0.set_xlabel("n_samples")
ax0.legend()
ax0.set_title("NTK of a width-256 ReLU network")
ax1.hist(z, bins=40, density=True, alpha=0.7, label="(mean - exact) / stderr, per entry")
grid = np.linspace(-4, 4, 200)
ax1.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k", label="standard normal")
ax1.set_title(f"{counts[-1]} samples: the error bars are honest")
ax1.legend(fontsize="small")
plt.show()

# %% [markdown]
# ## Finite width
#
# With two hidden layers the second layer's inputs are no longer Gaussian at finite
# width, and the expected kernel differs from the infinite-width one by `O(1/width)`.
# The standard error measures only the Monte Carlo part, so it is the tool to tell the
# two apart: a narrow network's estimate settles (small error bars) away from the
# infinite-width kernel.

# %%
exact_ntk2 = demo.arccos_kernels(x.astype(np.float64), depth=2)[1]
widths, samples = [4, 16, 64], [4096, 2048, 1024]  # narrow networks are cheap to sample
finite = []
for width, n in zip(widths, samples):
    fn = mcntk.monte_carlo_kernel_fn(*demo.relu_network(width, 2, 4), jax.random.PRNGKey(1),
                                     n, vmap_axes=0, stderr=True, progress=False)
    est = fn(x, None, "ntk")
    scale = np.linalg.norm(exact_ntk2)
    finite.append((np.linalg.norm(np.asarray(est.mean) - exact_ntk2) / scale,
                   np.linalg.norm(est.stderr) / scale))
    print(f"width {width:>4}, {n} samples: distance to the infinite-width NTK "
          f"{finite[-1][0]:.4f}, standard error {finite[-1][1]:.4f}")
finite = np.array(finite)
assert finite[0, 0] > 2.5 * finite[0, 1]  # width 4: a bias the error bars cannot explain
assert finite[-1, 0] < finite[0, 0] / 4  # it shrinks with width

fig, ax = plt.subplots(figsize=(5.5, 3.5), layout="constrained")
ax.loglog(widths, finite[:, 0], "o-", label="||mean - infinite-width||_F, relative")
ax.loglog(widths, finite[:, 1], "s--", label="||stderr||_F, relative")
ax.loglog(widths, finite[0, 0] * widths[0] / np.array(widths), ":", color="gray",
          label="1/width")
ax.set_xlabel("width (2 hidden layers)")
ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# ## Stop at a target accuracy: `rtol`
#
# `rtol=r` (with `stderr=True`) stops at the first boundary (every `checkpoint_every`
# samples) where `max(stderr) <= r * max(|mean|)` holds for every kernel returned;
# `n_samples` is the ceiling, and the result says how many samples were used.

# %%
fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(2), 100_000,
                                 vmap_axes=0, stderr=True, rtol=0.01, checkpoint_every=64,
                                 progress=False)
stopped = fn(x, None, "ntk")
achieved = float(np.max(stopped.stderr) / np.max(np.abs(stopped.mean)))
print(f"stopped after {stopped.n_samples} samples: max(stderr) / max|mean| = {achieved:.4f}")
assert stopped.n_samples < 100_000 and stopped.n_samples % 64 == 0 and achieved <= 0.01

# %% [markdown]
# ## Kernel regression
#
# The NTK's use: kernel ridge regression with it predicts what an infinitely wide
# network trained by gradient descent on the training set predicts (notebook 7 checks
# that on finite networks). Here, classification of the spirals by regression on
# one-hot targets, with the Monte Carlo NTK and with the exact one, over a grid of the
# plane.

# %%
side = np.linspace(-2.2, 2.2, 24, dtype=np.float32)
plane = np.stack(np.meshgrid(side, side), axis=-1).reshape(-1, 2)
inputs = np.concatenate([data.x_train, data.x_test, plane])
fn = mcntk.monte_carlo_kernel_fn(*demo.relu_network(256, 2, 4), jax.random.PRNGKey(3), 64,
                                 vmap_axes=0, progress=False)
k_mc = np.asarray(fn(inputs, data.x_train, "ntk"))  # every point against the training set
k_exact = demo.arccos_kernels(inputs.astype(np.float64), depth=2)[1][:, :len(data.x_train)]
n_train, n_test = len(data.x_train), len(data.x_test)

mc = demo.kernel_regression(k_mc[:n_train], k_mc[n_train:], data.y_train, data.classes)
ex = demo.kernel_regression(k_exact[:n_train], k_exact[n_train:], data.y_train, data.classes)
mc_accuracy = float((mc[:n_test] == data.y_test).mean())
exact_accuracy = float((ex[:n_test] == data.y_test).mean())
agreement = float((mc == ex).mean())
print(f"test accuracy: Monte Carlo NTK {mc_accuracy:.1%}, exact NTK {exact_accuracy:.1%}; "
      f"the two predict the same class at {agreement:.1%} of the points")
assert agreement > 0.9 and abs(mc_accuracy - exact_accuracy) <= 0.05
assert mc_accuracy > 0.6  # chance is 1/3

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), layout="constrained")
for ax, (title, labels) in zip(axes, [("Monte Carlo NTK, 64 samples", mc),
                                      ("infinite-width NTK", ex)]):
    ax.contourf(side, side, labels[n_test:].reshape(24, 24), levels=[-0.5, 0.5, 1.5, 2.5],
                cmap="Pastel1", alpha=0.9)
    ax.scatter(*data.x_train.T, c=data.y_train, cmap="Set1", vmin=0, vmax=8, s=14,
               edgecolors="k", linewidths=0.3)
    ax.set_title(title)
    ax.set_aspect("equal")
plt.show()
