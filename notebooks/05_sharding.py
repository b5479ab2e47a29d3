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
# # Sharding over a mesh
#
# An estimate is a grid of kernel blocks (`batch_size` examples each way) times a number
# of samples; mcntk spreads both over devices with `jax.jit` and `jax.sharding`. Sample
# `s` always uses the `s`-th split of the key, so the estimate does not depend on the
# devices (up to the order of floating-point sums).
#
# This notebook runs on a laptop: XLA can pretend the CPU is 8 devices. The flag must be
# set before JAX starts, so it is the first thing the notebook does.

# %%
import os

# 8 CPU devices; flags set earlier (e.g. by the docs build) are kept
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"])

import jax  # noqa: E402  (after the flag above)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jax.example_libraries import stax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import mcntk  # noqa: E402

print(jax.devices())
assert jax.device_count() == 8

# %%
init_fn, apply_fn = stax.serial(stax.Dense(128), stax.Relu, stax.Dense(128), stax.Relu,
                                stax.Dense(4))
x1 = jax.random.normal(jax.random.PRNGKey(1), (24, 16))
x2 = jax.random.normal(jax.random.PRNGKey(2), (16, 16))
key = jax.random.PRNGKey(0)


def estimate(**options):
    fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 16, vmap_axes=0, progress=False,
                                     **options)
    return fn(x1, x2, "ntk")


# %% [markdown]
# ## `device_count`
#
# `device_count` keeps neural-tangents' meaning: `0` one device, `k` the first `k`
# devices, `-1` (the default) all of them. With one block (`batch_size=0`), the devices
# split the samples. The result is a `jax.Array` laid out over the devices used.

# %%
reference = estimate(device_count=0)
results = {0: reference}
for count in (2, -1):
    results[count] = estimate(device_count=count)
    print(f"device_count={count:>2}: {len(results[count].sharding.device_set)} devices, "
          f"{results[count].sharding}")
for k in results.values():
    np.testing.assert_allclose(np.asarray(k), np.asarray(reference), rtol=1e-5, atol=1e-6)
assert len(results[-1].sharding.device_set) == 8

# %% [markdown]
# ## Your own mesh
#
# `mesh=` takes any `jax.sharding.Mesh`: the one your training code already uses, any
# shape, any axis names. By default mcntk puts blocks of the kernel grid on as many
# devices as there are blocks and samples on the rest; `sample_axes=` names the mesh axes
# that split samples (blocks go over the others). Here a 2 x 4 mesh; `batch_size=8`
# cuts x1 (24 examples) and x2 (16) into a 3 x 2 grid of blocks, which go over the
# `"data"` axis, and samples over the `"model"` axis.

# %%
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
on_mesh = estimate(mesh=mesh, batch_size=8, sample_axes="model")
print(on_mesh.sharding)
np.testing.assert_allclose(np.asarray(on_mesh), np.asarray(reference), rtol=1e-5, atol=1e-6)
assert on_mesh.sharding.device_set == set(mesh.devices.flat)

# %% [markdown]
# Which device holds which piece of the result? Whatever split the computation used, the
# kernel comes back split over the devices used along its axes, as far as their sizes
# allow (24 x 16 entries on 8 devices: 8 bands of 3 rows), with a mesh in the mesh's
# device order. Each entry of the picture is coloured by the device that stores it
# (`kernel.addressable_shards`); a piece on several devices (replicated) shows the first.

# %%
def owner_map(array):
    owners = np.full(array.shape, -1)
    for shard in sorted(array.addressable_shards, key=lambda s: -s.device.id):
        owners[shard.index] = shard.device.id
    return owners


fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
for ax, (title, array) in zip(axes, [("device_count=2", results[2]),
                                     ("2 x 4 mesh, batch_size=8", on_mesh)]):
    owners = owner_map(array)
    assert (owners >= 0).all() and len(np.unique(owners)) == len(array.sharding.device_set)
    ax.imshow(owners, cmap="tab10", vmin=0, vmax=9)
    for shard in array.addressable_shards:  # label each piece with its device
        rows, cols = (range(*s.indices(n)) for s, n in zip(shard.index, array.shape))
        i, j = rows[len(rows) // 2], cols[len(cols) // 2]
        if owners[i, j] == shard.device.id:
            ax.text(j, i, shard.device.id, ha="center", va="center")
    ax.set_title(f"{title}:\ndevice of each kernel entry")
    ax.set_xlabel("x2 example")
    ax.set_ylabel("x1 example")
plt.show()

# %% [markdown]
# ## Results on the devices, or on the host
#
# By default (`store_on_device=True`) a result stays laid out over the devices used. With
# `store_on_device=False` the blocks go to host memory as they finish and the
# result is a NumPy array. Results from different device sets combine on the host
# (`np.asarray`) or after `jax.device_put(a, b.sharding)`.

# %%
on_host = estimate(device_count=-1, store_on_device=False, batch_size=8)
assert isinstance(on_host, np.ndarray)
np.testing.assert_allclose(on_host, np.asarray(reference), rtol=1e-5, atol=1e-6)
moved = jax.device_put(reference, results[-1].sharding)
print(float(np.abs(np.asarray(results[-1] - moved)).max()))

# %% [markdown]
# ## A pod
#
# The same call runs on a pod after `jax.distributed.initialize()`: every process runs the
# same script with the same inputs and key, and the result is a global `jax.Array` over
# every chip. The recipe (one script, N hosts), what each process gets back and what
# happens when a host dies are in [devices, meshes and processes](../docs/sharding.md).
