"""Sharded estimates on 8 simulated CPU devices equal the single-device ones.

Needs 8 devices, so the default (one-device) session does not collect this file (its
name does not start with ``test_``); tests/test_sharding.py::test_eight_devices runs it
in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. By hand:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/eight_devices.py

The oracle is the same estimator on one device (``device_count=0``): a different
placement, program and assembly, the same key schedule.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mcntk_reference import depthwise_network, stax_serial

import mcntk
from mcntk import _placement

if jax.device_count() < 8:
    raise RuntimeError("tests/eight_devices.py needs 8 devices: run it with "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8")

DEVICES = tuple(jax.devices()[:8])
KEY = jax.random.PRNGKey(0)
N = 5


def _x(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


X1, X2 = _x(1, (5, 3)), _x(2, (3, 3))  # 5 and 3 examples: neither divides 2, 4 or 8
MLP = stax_serial(stax.Dense(8), stax.Relu, stax.Dense(2))
CONV = stax_serial(stax.Conv(2, (3, 3), padding="SAME"), stax.Relu,
                   stax.Conv(2, (3, 3), padding="SAME"))
DROPOUT = stax_serial(stax.Dense(8), stax.Relu, stax.Dropout(0.5), stax.Dense(2))
C1, C2 = _x(3, (5, 4, 4, 1)), _x(4, (5, 4, 4, 1))


def estimate(model, x1, x2, n=N, get=("nngp", "ntk"), **kwargs):
    kwargs.setdefault("implementation", 1)
    return mcntk.monte_carlo_kernel_fn(*model, KEY, n, **kwargs)(x1, x2, get)


def reference(model_name, inputs, n=N, **kwargs):
    """The single-device estimate (computed once per configuration)."""
    return _reference(model_name, inputs, n, tuple(sorted({"implementation": 1,
                                                            **kwargs}.items())))


@functools.cache
def _reference(model_name, inputs, n, kwargs):
    out = estimate(CASES[model_name], *INPUTS[inputs], n, device_count=0, **dict(kwargs))
    check_placed(out, DEVICES[:1])
    return out


CASES = {"mlp": MLP, "conv": CONV, "dropout": DROPOUT}
INPUTS = {"x2": (X1, X2), "none": (X1, None), "same_count": (X1, _x(5, (5, 3))),
          "conv": (C1, C2)}


def close(actual, expected, rtol=1e-6):
    """Equal up to the order of float32 sums, relative to the kernel's scale."""
    actual, expected = (jax.tree.map(np.asarray, t) for t in (actual, expected))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        chex.assert_trees_all_close(a, e, rtol=rtol, atol=rtol * float(np.abs(e).max()))
    chex.assert_trees_all_equal_structs(actual, expected)


def check_placed(result, devices):
    """Every kernel is a jax.Array laid out over exactly ``devices`` (in order)."""
    for leaf in jax.tree.leaves(result):
        assert isinstance(leaf, jax.Array), type(leaf)
        chex.assert_equal(leaf.sharding.device_set, set(devices))
    if len(devices) > 1:
        chex.assert_tree_is_sharded(result, devices=tuple(devices))
    else:
        chex.assert_tree_is_on_device(result, device=devices[0])


@pytest.mark.parametrize("device_count,batch_size", [
    (1, 2), (2, 2), (4, 2), (8, 2), (-1, 2), (8, 0)])
def test_device_count(device_count, batch_size):
    out = estimate(MLP, X1, X2, device_count=device_count, batch_size=batch_size)
    close(out, reference("mlp", "x2", batch_size=batch_size))
    check_placed(out, DEVICES if device_count == -1 else DEVICES[:device_count])


MESHES = [  # (shape, axis names, sample_axes, devices reversed)
    ((1, 8), ("x", "y"), None, False),
    ((1, 8), ("x", "y"), "x", True),  # samples over a size-1 axis: blocks over all 8
    ((2, 4), ("data", "model"), None, True),
    ((2, 4), ("data", "model"), "model", False),
    ((4, 2), ("p", "q"), None, False),
    ((4, 2), ("p", "q"), ("q", "p"), True),  # every axis splits samples
    ((8, 1), ("data", "replica"), None, True),
    ((8, 1), ("data", "replica"), "data", False),
]


@pytest.mark.parametrize("shape,names,sample_axes,reverse", MESHES)
def test_user_mesh(shape, names, sample_axes, reverse):
    devices = DEVICES[::-1] if reverse else DEVICES
    mesh = Mesh(np.array(devices).reshape(shape), names)
    out = estimate(MLP, X1, X2, batch_size=2, mesh=mesh, sample_axes=sample_axes)
    close(out, reference("mlp", "x2", batch_size=2))
    check_placed(out, tuple(mesh.devices.flat))
    # the result combines with the user's arrays on the same mesh, whatever its order
    ones = jax.device_put(np.ones(out.ntk.shape, np.float32),
                          NamedSharding(mesh, PartitionSpec()))
    total = jax.jit(lambda a, b: a + b)(out.ntk, ones)
    close(total, np.asarray(out.ntk) + 1)


def test_x2_none():
    out = estimate(MLP, X1, None, batch_size=2)  # diagonal blocks, then the others
    close(out, reference("mlp", "none", batch_size=2))
    check_placed(out, DEVICES)


@pytest.mark.parametrize("model,inputs,trace_axes,diagonal_axes", [
    ("mlp", "same_count", (-1,), (0,)),  # diagonal over examples: only blocks (i, i)
    ("conv", "conv", (-1,), (1, 2)),  # spatial diagonal
    ("conv", "conv", (1, 2, 3), ()),  # spatial and channel trace
])
def test_axes_variants(model, inputs, trace_axes, diagonal_axes):
    kw = dict(batch_size=2, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    out = estimate(CASES[model], *INPUTS[inputs], **kw)
    close(out, reference(model, inputs, **kw))
    check_placed(out, DEVICES)


def test_pytree_outputs():
    init_fn, apply_fn = MLP

    def tree_apply(params, x, **kwargs):
        y = apply_fn(params, x, **kwargs)
        return {"a": y, "b": (jnp.tanh(y), y[:, :1])}

    model = (init_fn, tree_apply)
    out = estimate(model, X1, X2, batch_size=2)
    ref = estimate(model, X1, X2, batch_size=2, device_count=0)
    chex.assert_equal(len(jax.tree.leaves(out)), 6)
    close(out, ref)
    check_placed(out, DEVICES)


def test_dropout():
    """Blocks get neural-tangents' dropout keys (per block: equal blocks share one)."""
    out = estimate(DROPOUT, X1, X2, batch_size=2)
    ref = reference("dropout", "x2", batch_size=2)
    close(out, ref)
    # the estimate depends on the dropout keys: a model without dropout differs
    assert not np.allclose(np.asarray(ref.ntk),
                           np.asarray(reference("mlp", "x2", batch_size=2).ntk))


def test_generator():
    counts = [2, 5]
    sharded = estimate(MLP, X1, X2, counts, batch_size=2)
    single = estimate(MLP, X1, X2, counts, batch_size=2, device_count=0)
    pairs = list(zip(sharded, single))
    chex.assert_equal(len(pairs), 2)
    for out, ref in pairs:
        close(out, ref)
        check_placed(out, DEVICES)
    close(pairs[1][0], reference("mlp", "x2", batch_size=2))


@pytest.mark.parametrize("batch_size,sample_axes", [(0, None), (2, "s")])
def test_store_on_host(batch_size, sample_axes):
    mesh = Mesh(np.array(DEVICES).reshape(2, 4), ("b", "s"))
    out = estimate(MLP, X1, X2, batch_size=batch_size, store_on_device=False,
                   mesh=mesh if sample_axes else None, sample_axes=sample_axes)
    assert all(type(v) is np.ndarray for v in jax.tree.leaves(out))
    close(out, reference("mlp", "x2", batch_size=batch_size))


def test_result_is_spread():
    """A kernel whose size the device count divides is split, not replicated."""
    x1, x2 = _x(6, (8, 3)), _x(7, (4, 3))
    out = estimate(MLP, x1, x2, get="ntk", batch_size=2)
    chex.assert_shape(out, (8, 4))
    shards = out.addressable_shards
    chex.assert_equal(sorted(s.device.id for s in shards), sorted(d.id for d in DEVICES))
    for s in shards:
        chex.assert_shape(s.data, (1, 4))


@pytest.mark.parametrize("implementation", [1, 2, 3])
def test_no_cross_device_jacobian_sum(implementation):
    """The shard_map/VJP trap: parameters drawn once per sample are shared by the
    block rows of the mesh; had the VJPs summed their cotangents over the rows (what
    varying-axis checks do to values that do not vary over an axis), every NTK block
    would mix the Jacobians of the other rows' blocks, an O(1) change. 6 blocks on 8
    devices: 2 block rows of 4 devices. Each implementation (JC, NTK-VP, SD) sharded
    against JC on one device, to the precision at which the implementations agree."""
    assert _placement.place(_placement.select(-1), 6).db == 2
    out = estimate(MLP, X1, X2, batch_size=2, implementation=implementation)
    close(out, reference("mlp", "x2", batch_size=2), rtol=1e-6 if implementation == 1 else 1e-5)


def test_failure_names_the_block():
    """Non-finite kernels are reported with the block they came from, whichever
    device computed it (block rows hold positions row * q + u)."""
    init_fn, apply_fn = MLP

    def bad_apply(params, x, **kwargs):  # example 3 of x1 (its first feature is 3.0)
        return apply_fn(params, x, **kwargs) / (x[:, :1] - 3.0)

    x1 = jnp.arange(15.0).reshape(5, 3) / 3.0
    with pytest.raises(FloatingPointError, match=r"in block \(1, [01]\)"):
        estimate((init_fn, bad_apply), x1, X2, batch_size=2)


# --- each device gets its share ------------------------------------------------------


def _counting_model(axes, records):
    """A linear model whose every call reports (device position on ``axes``, first
    example id, a parameter identifying the sample) from inside the program."""
    def init_fn(key, shape):
        return shape[:-1] + (2,), {"w": jax.random.normal(key, (shape[-1], 2))}

    def apply_fn(params, x):
        def record(pos, ids, tag):
            records.append((tuple(int(p) for p in pos), int(ids[0]), float(tag)))

        try:
            pos = jnp.stack([jax.lax.axis_index(a) for a in axes])
        except NameError:  # shapes probed outside the program
            pos = None
        if pos is not None:
            jax.debug.callback(record, pos, x[:, 0], params["w"][0, 0])
        return x @ params["w"]

    return init_fn, apply_fn


def _sample_tags(n):
    """neural-tangents' key schedule: the parameter ``w[0, 0]`` of each sample."""
    key, tags = KEY, {}
    for s in range(n):
        key, split = jax.random.split(key)
        init_key, _ = jax.random.split(split)
        tags[round(float(jax.random.normal(init_key, (3, 2))[0, 0]), 5)] = s
    return tags


@pytest.mark.parametrize("placement", ["default", "mesh_2x2x2", "one_block", "host"])
def test_each_device_gets_its_share(placement):
    n, n_examples, b = 6, 12, 2  # diagonal_axes=(0,): 6 blocks (i, i)
    mesh = None
    if placement == "mesh_2x2x2":
        mesh = Mesh(np.array(DEVICES).reshape(2, 2, 2), ("x", "y", "z"))
        axes, where = ("x", "y", "z"), mesh.devices
    else:
        blocks = 1 if placement == "one_block" else n_examples // b
        layout = _placement.place(_placement.select(-1), blocks).mesh
        axes, where = layout.axis_names, layout.devices
    records = []
    x = jnp.stack([jnp.arange(n_examples, dtype=jnp.float32), jnp.ones(n_examples),
                   jnp.linspace(-1, 1, n_examples)], axis=1)
    mcntk.monte_carlo_kernel_fn(
        *_counting_model(axes, records), KEY, n,
        batch_size=0 if placement == "one_block" else b, diagonal_axes=(0,),
        store_on_device=placement != "host", mesh=mesh,
        sample_axes="y" if mesh is not None else None)(x, x + 100.0, "nngp")
    tags = _sample_tags(n)
    work = {}  # device -> {(block's first example, sample)}
    for pos, first, tag in records:
        if first < 100:  # f(x1) calls; f(x2) mirrors them
            work.setdefault(where[pos], []).append((first, tags[round(tag, 5)]))
    done = sorted(w for ws in work.values() for w in ws)
    firsts = [0] if placement == "one_block" else list(range(0, n_examples, b))
    chex.assert_equal(done, sorted((f, s) for f in firsts for s in range(n)))  # once each
    blocks = {d: {f for f, _ in work.get(d, [])} for d in DEVICES}
    samples = {d: {s for _, s in work.get(d, [])} for d in DEVICES}
    for d in DEVICES:  # a device computes all its samples for all its blocks
        chex.assert_equal(sorted(work.get(d, [])),
                          sorted((f, s) for f in blocks[d] for s in samples[d]))
    for share in (blocks, samples):  # equal shares, plus or minus one
        sizes = [len(v) for v in share.values()]
        assert max(sizes) - min(sizes) <= 1, share


def test_grouped_convolution_on_a_mesh_names_the_way_out():
    x = _x(5, (4, 4, 4, 2))
    with pytest.raises(mcntk.errors.NotYetImplementedError, match=r"device_count=0"):
        estimate(depthwise_network(), x, None, device_count=-1)
    one = estimate(depthwise_network(), x, None, device_count=0)
    assert np.isfinite(np.asarray(one.ntk)).all()


@pytest.mark.parametrize("device_count", [-1, 3])
def test_staged_rows_split_over_devices(device_count, monkeypatch):
    """Rows of the grid (x1 blocks) shared between devices: each device computes x1's
    part of its own rows; the estimate is that of one device, and that of no staging."""
    from mcntk import _staging

    model = stax_serial(stax.Dense(6), stax.Relu, stax.Dropout(0.7, mode="train"),
                        stax.Dense(2))
    x1, x2 = _x(1, (12, 3)), _x(2, (6, 3))
    kw = dict(batch_size=2, implementation=mcntk.NtkImplementation.STRUCTURED_DERIVATIVES)
    many = estimate(model, x1, x2, device_count=device_count, **kw)
    one = estimate(model, x1, x2, device_count=0, **kw)
    chex.assert_trees_all_close(many, one, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(_staging, "split", lambda *args: None)
    chex.assert_trees_all_close(estimate(model, x1, x2, device_count=device_count, **kw), many,
                                rtol=1e-5, atol=1e-6)


def test_checkpoint_merges_on_the_host(tmp_path, monkeypatch):
    """A commit merges the devices' moments from host arrays: eager operations on
    sample-sharded arrays, dispatched back to back, deadlocked XLA's CPU runtime under
    load (Placement.one_at_a_time). The committed run resumes on one device."""
    from mcntk import _accumulate

    seen = []
    merge_axis = _accumulate.merge_axis

    def spy(moments, axis=0):
        for v in jax.tree.leaves(moments):
            try:
                seen.append(len(v.sharding.device_set))
            except AttributeError:  # NumPy, or traced (the final assembly's program)
                seen.append(0 if isinstance(v, np.ndarray) else None)
        return merge_axis(moments, axis)

    monkeypatch.setattr(_accumulate, "merge_axis", spy)
    kw = dict(checkpoint_dir=str(tmp_path), checkpoint_every=4, stderr=True)
    first = estimate(MLP, X1, None, n=8, device_count=-1, **kw)
    assert sorted(int(d.name) for d in tmp_path.iterdir() if d.name.isdigit()) == [4, 8]
    assert 0 in seen and not any(count and count > 1 for count in seen), seen
    resumed = estimate(MLP, X1, None, n=12, device_count=0, **kw)
    chex.assert_trees_all_close(first.ntk.n_samples, 8)
    chex.assert_trees_all_close(resumed, estimate(MLP, X1, None, n=12, device_count=0,
                                                  stderr=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device_count,batch_size", [(-1, 0), (3, 2)])
def test_vmapped_samples_on_a_mesh(device_count, batch_size, monkeypatch):
    """Several samples per step on each device (as on GPUs and TPUs), the devices
    splitting samples and blocks: the single-device estimate, one sample per step."""
    from mcntk import monte_carlo

    one = estimate(DROPOUT, X1, None, 13, device_count=0, batch_size=batch_size)
    monkeypatch.setattr(monte_carlo._Estimator, "_vmaps_samples", lambda self: True)
    fn = mcntk.monte_carlo_kernel_fn(*DROPOUT, KEY, 13, implementation=1,
                                     device_count=device_count, batch_size=batch_size,
                                     memory_budget=2**30)
    many = fn(X1, None, ("nngp", "ntk"))
    assert max(fn.samples_per_step.values()) > 1, fn.samples_per_step
    close(many, one, rtol=1e-5)
