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
# # Haiku models
#
# Pass `hk.transform(f)` or `hk.transform_with_state(f)` (or their `without_apply_rng`
# forms) to `monte_carlo_kernel_fn` in place of `init_fn, apply_fn`. Each sample's
# parameters come from `init` with the sample's key; `apply` gets the sample's dropout
# key as Haiku's `rng`; Haiku *state* (BatchNorm's moving averages) is initialised and
# held fixed. Details: [adapters](../docs/adapters.md).

# %%
import haiku as hk
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import mcntk

x1 = jax.random.normal(jax.random.PRNGKey(1), (10, 16))
key = jax.random.PRNGKey(0)

# %% [markdown]
# ## `hk.transform`

# %%
def mlp(x):
    return hk.nets.MLP([256, 256, 4])(x)


kernel_fn = mcntk.monte_carlo_kernel_fn(hk.transform(mlp), key=key, n_samples=16, vmap_axes=0,
                                        progress=False)
k = kernel_fn(x1, None, ("nngp", "ntk"))
print(k.nngp.shape, k.ntk.shape)
assert k.ntk.shape == (10, 10)
# without_apply_rng changes only how apply is called, not the parameters drawn
k_no_rng = mcntk.monte_carlo_kernel_fn(hk.without_apply_rng(hk.transform(mlp)), key=key,
                                       n_samples=16, vmap_axes=0, progress=False)(x1, None, "ntk")
np.testing.assert_allclose(k_no_rng, k.ntk, rtol=1e-5)

# %% [markdown]
# ## Dropout
#
# A function with dropout calls `hk.next_rng_key()`; mcntk passes each sample's dropout
# key as the `rng` of `apply`, so the masks are random across samples and the estimate
# is reproducible from `key`. Keyword arguments of the kernel call (here `is_training`)
# reach the function.

# %%
def mlp_dropout(x, is_training):
    x = jax.nn.relu(hk.Linear(256)(x))
    if is_training:
        x = hk.dropout(hk.next_rng_key(), 0.5, x)
    return hk.Linear(4)(x)


dropout_fn = mcntk.monte_carlo_kernel_fn(hk.transform(mlp_dropout), key=key, n_samples=64,
                                         progress=False)
k_train = np.asarray(dropout_fn(x1, None, "nngp", is_training=True))
k_again = np.asarray(dropout_fn(x1, None, "nngp", is_training=True))
k_eval = np.asarray(dropout_fn(x1, None, "nngp", is_training=False))
np.testing.assert_array_equal(k_train, k_again)  # same key, same masks
# inverted dropout keeps the expected product of two *different* examples' features
# but doubles (1 / keep rate) the expected square of one example's features
diag_ratio = np.diag(k_train).mean() / np.diag(k_eval).mean()
off = ~np.eye(10, dtype=bool)
off_ratio = k_train[off].mean() / k_eval[off].mean()
print(f"training / inference NNGP: diagonal {diag_ratio:.2f}, off-diagonal {off_ratio:.2f}")
assert 1.6 < diag_ratio < 2.4 and 0.7 < off_ratio < 1.3

# %% [markdown]
# ## `hk.transform_with_state` and the BatchNorm caveat
#
# `hk.BatchNorm` creates its moving averages only in training mode, from the batch `init`
# sees, and mcntk's `init` feeds it zeros: identical examples, variance 0. Used in
# inference mode right after `init`, every feature is then divided by `sqrt(eps)` and
# the kernels come out about `1/eps` times too large, *without an error*. The three
# options below show the trap and the two ways out that docs/adapters.md recommends.

# %%
def bn_net(x, is_training):
    x = hk.Linear(256)(x)
    x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(
        x, is_training=is_training)
    return hk.Linear(4)(jax.nn.relu(x))


net = hk.transform_with_state(bn_net)

# (a) the trap: init in training mode, kernel in inference mode
trap = mcntk.adapters.as_model(net, init_kwargs={"is_training": True})
k_trap = mcntk.monte_carlo_kernel_fn(*trap, key, 16, progress=False)(
    x1, None, "nngp", is_training=False)

# (b) the kernel in training mode: each batch normalised by its own statistics
train_mode = mcntk.adapters.as_model(net, mutable=True)
k_batch = mcntk.monte_carlo_kernel_fn(*train_mode, key, 16, progress=False)(
    x1, None, "nngp", is_training=True)


# (c) inference mode with the statistics set in an init of our own (Flax's start:
#     running mean 0, running variance 1)
def flax_start(name, s):
    if not name.endswith(("mean_ema", "var_ema")):
        return s
    fill = jnp.ones_like if name.endswith("var_ema") else jnp.zeros_like
    return {**s, "average": fill(s["average"])}


def init_with_start(key, input_shape):
    shape, params = trap.init(key, input_shape)
    return shape, {**params, "state": {n: flax_start(n, s) for n, s in params["state"].items()}}


k_fixed = mcntk.monte_carlo_kernel_fn(init_with_start, trap.apply, key, 16, progress=False)(
    x1, None, "nngp", is_training=False)

# a reference without BatchNorm, for scale
k_plain = mcntk.monte_carlo_kernel_fn(
    hk.transform(lambda x: hk.Linear(4)(jax.nn.relu(hk.Linear(256)(x)))), key=key,
    n_samples=16, progress=False)(x1, None, "nngp")

scales = {name: float(np.abs(np.diag(np.asarray(k))).mean())
          for name, k in [("(a) inference right after init", k_trap),
                          ("(b) training mode, mutable=True", k_batch),
                          ("(c) inference, statistics set", k_fixed),
                          ("no BatchNorm", k_plain)]}
for name, s in scales.items():
    print(f"{name:>32}: mean diagonal NNGP {s:.3g}")
values = list(scales.values())
assert values[0] > 1e3 * max(values[1:])  # the trap: ~1/eps too large
assert all(0.05 < v / values[3] < 20 for v in values[1:3])  # both fixes: a sane scale

# %%
fig, ax = plt.subplots(figsize=(8, 2.8), layout="constrained")
ax.barh(list(scales), values, color=["tab:red", "tab:green", "tab:green", "tab:gray"])
ax.set_xscale("log")
ax.invert_yaxis()
ax.set_xlabel("mean diagonal of the NNGP (log scale)")
ax.set_title("hk.BatchNorm: inference mode right after init inflates kernels ~1/eps")
plt.show()
