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
# # Training a wide network is kernel regression with its NTK
#
# The classic experiment behind the neural tangent kernel (Jacot, Gabriel and Hongler,
# 2018): as a network gets wider, gradient descent on a squared loss moves its parameters
# less and less, its NTK stays at its initial value, and the trained network's
# predictions become those of a kernel method with the NTK. Here we train the same ReLU
# network at several widths with optax (full-batch gradient descent on the mean squared
# error) and compare its test predictions with the prediction computed from the
# **Monte Carlo NTK**, without training anything.
#
# Two details make the comparison exact in the limit:
#
# * we train the *centred* network `g(x) = f(x; θ) - f(x; θ₀)`, which starts at 0, so the
#   random function at initialisation does not enter (it would add a random term that
#   does not shrink with width);
# * gradient descent runs a fixed number of steps `T`, so the kernel prediction is the one
#   at step `T`, not at convergence: with `K` the NTK of the `n` training points, step
#   size `η` and loss `½ mean((g - y)²)`, the linearised network predicts
#   `g_T(x) = K(x, X) K⁻¹ (I - (I - η K / n)^T) y`.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import mcntk
from mcntk import demo

# %% [markdown]
# Points on a circle (an angle `t` as the input `1.5 (cos t, sin t)`) and a smooth target.

# %%
def on_circle(t):
    return (1.5 * np.stack([np.cos(t), np.sin(t)], axis=1)).astype(np.float32)


def target(t):
    return np.sin(2 * t) + 0.5 * np.cos(3 * t)


rng = np.random.default_rng(0)
t_train = np.sort(rng.uniform(0, 2 * np.pi, 16))
t_test = np.linspace(0, 2 * np.pi, 150, endpoint=False)
x_train, x_test = on_circle(t_train), on_circle(t_test)
y_train = target(t_train)[:, None]

# %% [markdown]
# ## The kernel prediction, from the Monte Carlo NTK
#
# The network is `mcntk.demo.relu_network`: one hidden ReLU layer in NTK parameterisation.
# With one hidden layer its expected NTK does not depend on the width, so one estimate
# serves every width (and can be checked against the closed form).

# %%
def network(width):
    return demo.relu_network(width, depth=1, out=1)


fn = mcntk.monte_carlo_kernel_fn(*network(1024), jax.random.PRNGKey(0), 512, vmap_axes=0,
                                 stderr=True, progress=False)
k = fn(np.concatenate([x_train, x_test]), x_train, "ntk")  # (16 + 150, 16)
k_mean, k_se = np.asarray(k.mean, np.float64), np.asarray(k.stderr, np.float64)
exact = demo.arccos_kernels(np.concatenate([x_train, x_test]).astype(np.float64), 1)[1][:, :16]
z = np.abs(k_mean - exact) / k_se
print(f"{k.n_samples} samples; largest |estimate - closed form| / stderr: {z.max():.2f}")
assert z.max() < 5

n = len(x_train)
k_train, k_test = k_mean[:n], k_mean[n:]
steps = 400
eta = n / np.linalg.eigvalsh(k_train).max()  # the largest stable step is 2 n / λ_max


def kernel_prediction(k_train, k_test, steps):
    values, vectors = np.linalg.eigh(k_train)
    decay = 1 - (1 - eta * values / n) ** steps  # per eigen-direction, after `steps` steps
    coefficients = vectors @ ((decay / values)[:, None] * (vectors.T @ y_train))
    return k_test @ coefficients


kernel_test = kernel_prediction(k_train, k_test, steps)
exact_test = kernel_prediction(exact[:n], exact[n:], steps)
print("Monte Carlo vs closed-form kernel prediction, relative RMS difference:",
      f"{np.sqrt(np.mean((kernel_test - exact_test) ** 2) / np.mean(exact_test ** 2)):.4f}")

# %% [markdown]
# ## Training with optax
#
# Full-batch gradient descent (`optax.sgd`) with the step size above and the same number
# of steps for every width; eight random initialisations per width, trained at once with
# `jax.vmap`.

# %%
def train(width, seeds):
    init_fn, apply_fn = network(width)
    optimizer = optax.sgd(eta)

    def one(key):
        params0 = init_fn(key, x_train.shape)[1]

        def centred(params, x):
            return apply_fn(params, x) - apply_fn(params0, x)

        def loss(params):
            return 0.5 * jnp.mean((centred(params, x_train) - y_train) ** 2)

        def step(carry, _):
            params, state = carry
            updates, state = optimizer.update(jax.grad(loss)(params), state)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params0, optimizer.init(params0)), length=steps)
        return centred(params, x_test), loss(params)

    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds))
    predictions, losses = jax.jit(jax.vmap(one))(keys)
    return np.asarray(predictions), np.asarray(losses)


widths = [64, 256, 1024, 4096]
trained, distance = {}, {}
for width in widths:
    predictions, losses = train(width, seeds=8)
    trained[width] = predictions[0]
    gaps = np.sqrt(np.mean((predictions - kernel_test) ** 2, axis=(1, 2))
                   / np.mean(kernel_test ** 2))
    distance[width] = float(np.median(gaps))
    print(f"width {width:>5}: training loss {np.median(losses):.1e}, test predictions vs "
          f"kernel prediction: {distance[width]:.4f} (relative RMS, median of 8)")

d = np.array([distance[w] for w in widths])
assert np.all(np.diff(d) < 0)  # closer with every increase of the width
assert d[-1] < d[0] / 3  # 64x the width: 8x closer in theory (1 / sqrt(width))

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
ax0.plot(t_test, kernel_test, "k", lw=2.5, label="kernel prediction (Monte Carlo NTK)")
for width, color in ((64, "tab:red"), (4096, "tab:blue")):
    ax0.plot(t_test, trained[width], "--", color=color, label=f"trained network, width {width}")
ax0.plot(t_train, y_train, "o", color="k", label="training points")
ax0.set_xlabel("angle t of the input 1.5 (cos t, sin t)")
ax0.legend(fontsize="small")
ax0.set_title(f"after {steps} steps of gradient descent")
ax1.loglog(widths, d, "o-", label="trained vs kernel prediction (median of 8)")
ax1.loglog(widths, d[0] * np.sqrt(widths[0] / np.array(widths)), ":", color="gray",
           label="1 / sqrt(width)")
ax1.set_xlabel("width")
ax1.set_ylabel("relative RMS difference on the test points")
ax1.legend(fontsize="small")
plt.show()
