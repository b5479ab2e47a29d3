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
# # Flax models: linen and NNX
#
# A Flax model goes to `monte_carlo_kernel_fn` as it is: a linen `Module` instance, or an
# NNX module factory wrapped in `mcntk.adapters.nnx_model`. The adapter
# ([adapters](../docs/adapters.md)) turns it into a pair of pure functions: `init` draws fresh
# parameters from each sample's key, `apply` differentiates the `params` collection
# (NNX: `nnx.Param` state) and holds every other collection fixed.
#
# This notebook covers call flags (`train=False`), BatchNorm, dropout, integer token ids,
# and checks that a linen and an NNX version of one network estimate the same kernel.

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import mcntk
from mcntk.adapters import StateMutationError, nnx_model

x1 = jax.random.normal(jax.random.PRNGKey(1), (12, 16))
x2 = jax.random.normal(jax.random.PRNGKey(2), (8, 16))
key = jax.random.PRNGKey(0)

# %% [markdown]
# ## A linen module, passed directly
#
# Omit `apply_fn` and pass the module; keyword-only `key=` and `n_samples=` read well.
# `vmap_axes=0` says the model treats examples independently along axis 0, which makes
# the NTK much cheaper for batches of examples.

# %%
class Mlp(nn.Module):
    width: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(4)(x)


kernel_fn = mcntk.monte_carlo_kernel_fn(Mlp(), key=key, n_samples=16, vmap_axes=0,
                                        progress=False)
k = kernel_fn(x1, x2, ("nngp", "ntk"))
print(k.nngp.shape, k.ntk.shape)
assert k.nngp.shape == k.ntk.shape == (12, 8)

# %% [markdown]
# ## Flags, BatchNorm and dropout
#
# Keyword arguments of the kernel call go to the model, and to `init` as well, so a
# module whose `__call__` requires a `train` flag just works. In inference mode
# (`train=False`) BatchNorm uses its running statistics, which Flax starts at mean 0 and
# variance 1, and dropout is off.

# %%
class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, train):  # no default: the flag must be passed
        x = nn.Dense(256)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        return nn.Dense(4)(x)


classifier_fn = mcntk.monte_carlo_kernel_fn(Classifier(), key=key, n_samples=16,
                                            vmap_axes=0, progress=False)
k_eval = classifier_fn(x1, None, "ntk", train=False)
print(k_eval.shape)
assert k_eval.shape == (12, 12) and np.isfinite(k_eval).all()

# %% [markdown]
# In training mode BatchNorm would update its statistics: a kernel of such a model is not
# per example (the examples of a batch interact) and the update would be thrown away, so
# the adapter refuses it with an error that says what to do.

# %%
try:
    classifier_fn(x1, None, "ntk", train=True)
    raise AssertionError("expected a StateMutationError")
except StateMutationError as e:
    print(e)

# %% [markdown]
# To take the kernel in training mode anyway, opt in with `mutable=` (the updates are
# discarded), leave `vmap_axes=None` because examples interact, and each sample's
# dropout masks come from the estimator's key: the same key gives the same estimate.

# %%
train_model = mcntk.adapters.as_model(Classifier(), mutable=["batch_stats"])
train_fn = mcntk.monte_carlo_kernel_fn(*train_model, key, 16, progress=False)
k_train_1 = train_fn(x1, None, "ntk", train=True)
k_train_2 = train_fn(x1, None, "ntk", train=True)
np.testing.assert_array_equal(k_train_1, k_train_2)
print("relative difference, training vs inference mode:",
      float(np.linalg.norm(k_train_1 - k_eval) / np.linalg.norm(k_eval)))

# %% [markdown]
# ## Embeddings on integer token ids
#
# `init` is called with x1's shapes *and dtypes*, so `nn.Embed` sees int32 ids. Here a
# bag-of-words model: embed, average over the sequence, classify. The kernel compares
# sentences, not tokens: sentences sharing tokens get larger kernel values.

# %%
class BagOfWords(nn.Module):
    @nn.compact
    def __call__(self, ids):
        tokens = nn.Embed(num_embeddings=50, features=64)(ids)
        return nn.Dense(3)(nn.relu(nn.Dense(128)(tokens.mean(axis=-2))))


ids = jax.random.randint(jax.random.PRNGKey(3), (10, 7), 0, 50, dtype=jnp.int32)
ids = ids.at[1].set(ids[0]).at[2, :4].set(ids[0, :4])  # 1 repeats 0; 2 shares 4 tokens
bow_fn = mcntk.monte_carlo_kernel_fn(BagOfWords(), key=key, n_samples=32, vmap_axes=0,
                                     progress=False)
k_ids = np.asarray(bow_fn(ids, None, "ntk"))
print(k_ids.shape, "K[0, 0..3] =", np.round(k_ids[0, :4], 3))
assert k_ids.shape == (10, 10)
assert np.isclose(k_ids[0, 1], k_ids[0, 0], rtol=1e-5)  # identical sentences
assert k_ids[0, 2] > np.median(k_ids[0, 3:])  # shared tokens count

# %% [markdown]
# ## NNX
#
# NNX modules are built from an `nnx.Rngs`, so mcntk takes a *factory*
# `rngs -> module`, marked with `nnx_model`: it builds a fresh module from each sample's
# key. Below, the same two-layer network as `Mlp` in NNX: both draw `Dense`/`Linear`
# weights from LeCun normal and zero biases, so the two estimates target the same
# expected kernel. With `stderr=True` each estimate carries its standard error, and the
# two agree within it.

# %%
class NnxMlp(nnx.Module):
    def __init__(self, rngs, width=256):
        self.l1 = nnx.Linear(16, width, rngs=rngs)
        self.l2 = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


n = 128
linen_est = mcntk.monte_carlo_kernel_fn(Mlp(), key=jax.random.PRNGKey(10), n_samples=n,
                                        vmap_axes=0, stderr=True, progress=False)(x1, None, "ntk")
nnx_est = mcntk.monte_carlo_kernel_fn(nnx_model(lambda rngs: NnxMlp(rngs)),
                                      key=jax.random.PRNGKey(11), n_samples=n, vmap_axes=0,
                                      stderr=True, progress=False)(x1, None, "ntk")
assert isinstance(nnx_est, mcntk.Estimate) and nnx_est.n_samples == n
z = (np.asarray(linen_est.mean) - np.asarray(nnx_est.mean)) / np.hypot(linen_est.stderr,
                                                                       nnx_est.stderr)
print(f"|linen - NNX| / combined standard error: median {np.median(np.abs(z)):.2f}, "
      f"max {np.abs(z).max():.2f}")
assert np.abs(z).max() < 5  # 78 distinct entries; 5 standard errors

fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), layout="constrained")
for ax, (title, image) in zip(axes, [(f"linen NTK, {n} samples", linen_est.mean),
                                     (f"NNX NTK, {n} samples", nnx_est.mean),
                                     ("(linen - NNX) / standard error", z)]):
    colours = dict(cmap="RdBu_r", vmin=-5, vmax=5) if "error" in title else dict(cmap="viridis")
    shown = ax.imshow(image, **colours)
    fig.colorbar(shown, ax=ax)
    ax.set_title(title)
plt.show()
