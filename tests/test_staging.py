"""A grid row's x1 part computed once (mcntk._staging): the two stages give the
function's result, the early stage runs once per block row and sample, and grids
computed that way equal one block, the brute-force reference and the unstaged grid."""

import chex
import jax
import jax.numpy as jnp
import mcntk_reference as reference
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import stax_serial

import mcntk
from mcntk import _staging, monte_carlo
from mcntk._types import NtkImplementation as NI

IMPLS = [NI.JACOBIAN_CONTRACTION, NI.NTK_VECTOR_PRODUCTS, NI.STRUCTURED_DERIVATIVES]


def _x(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape)


def close(a, b, rtol=1e-5):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=rtol * max(
        float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(b)))


def _primitives(fn, *args):
    return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


def test_split_stages_give_the_function():
    def fn(early, late):
        w, a = early
        h = jnp.tanh(a @ w)  # early: a matmul and a tanh
        wide = jnp.broadcast_to(h[:, None, :], (4, 3, 5))  # cheap, read late only
        return {"k": jnp.einsum("nmf,kf->nk", wide, late), "h": h.sum()}

    early_args = (_x(1, (6, 5)), _x(2, (4, 6)))
    late_args = _x(3, (2, 5))
    stages = _staging.split(fn, early_args, late_args)
    assert stages is not None
    residuals = stages.early(early_args)
    close(stages.late(early_args, late_args, residuals), fn(early_args, late_args))
    # the broadcast is recomputed late, not kept: the residuals are h and its sum
    assert sorted(r.shape for r in stages.residuals) == [(), (4, 5)]
    # the early matmul is not done again: the late stage has only the einsum's
    assert _primitives(stages.late, early_args, late_args, residuals).count("dot_general") == 1
    assert "dot_general" in _primitives(stages.early, early_args)


def test_split_declines_when_nothing_early_is_worth_keeping():
    early_args = (_x(1, (3, 4)),)
    late_args = _x(2, (4, 2))
    assert _staging.split(lambda e, y: e[0] @ y, early_args, late_args) is None
    assert _staging.split(lambda e, y: e[0].T.reshape(4, 3).T @ y, early_args,
                          late_args) is None


def _count_early(monkeypatch):
    """How many times an early stage runs (inside compiled programs)."""
    calls = []
    real = _staging.split

    def split(*args):
        stages = real(*args)
        if stages is None:
            return None

        def early(early_args):
            jax.debug.callback(lambda: calls.append(1))
            return stages.early(early_args)
        return stages._replace(early=early)

    monkeypatch.setattr(_staging, "split", split)
    return calls


def _dropout_mlp():
    return stax_serial(stax.Dense(16), stax.Relu, stax.Dropout(0.6, mode="train"),
                       stax.Dense(3))


def _conv():
    return stax_serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu, stax.Flatten,
                       stax.Dense(2))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", ["dropout_mlp", "conv"])
def test_rows_share_x1_part(impl, model, monkeypatch):
    """x1 of 6 examples and x2 of 5 in blocks of 2: 3 x 3 blocks, 3 rows. The early
    stage runs once per row and sample; the estimate equals the unstaged grid and,
    block by block, the key schedule written out (f(x1) with the sample's key, f(x2)
    with the folded one: a wrong key in a reused x1 part would show)."""
    init_fn, apply_fn = _dropout_mlp() if model == "dropout_mlp" else _conv()
    shape = (4,) if model == "dropout_mlp" else (4, 4, 2)
    x1, x2 = _x(1, (6, *shape)), _x(2, (5, *shape))
    key = jax.random.PRNGKey(5)
    # with dropout, per-example calls would draw other masks than the reference's
    vmap_axes = None if model == "dropout_mlp" else 0
    make = lambda: mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, batch_size=2,
                                               implementation=impl, vmap_axes=vmap_axes)
    calls = _count_early(monkeypatch)
    staged = make()(x1, x2, ("nngp", "ntk"))
    assert len(calls) == 3 * 2
    monkeypatch.setattr(_staging, "split", lambda *args: None)
    unstaged = make()(x1, x2, ("nngp", "ntk"))
    close(staged, unstaged)
    if model == "conv":  # deterministic: one block gives the same kernel
        close(staged, mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2,
                                                  implementation=impl)(x1, x2, ("nngp", "ntk")))
        return
    ntk = np.asarray(staged.ntk)
    for i in range(3):
        for j in range(3):
            b1, b2 = x1[2 * i:2 * i + 2], x2[2 * j:2 * j + 2]
            expected = reference.monte_carlo(init_fn, apply_fn, key, 2, b1, b2)
            if b2.shape[0] == 2:  # the last x2 block is padded: its masks differ
                close(ntk[2 * i:2 * i + 2, 2 * j:2 * j + 2], expected["ntk"])


def test_x2_none_rows_share_x1_part(monkeypatch):
    """x2=None with 4 blocks per side: off-diagonal rows of 3, 2 and 1 blocks."""
    init_fn, apply_fn = stax_serial(stax.Dense(8), stax.Relu, stax.Dense(2))
    x = _x(1, (8, 3))
    key = jax.random.PRNGKey(2)
    calls = _count_early(monkeypatch)
    got = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 3, batch_size=2,
                                      implementation=NI.STRUCTURED_DERIVATIVES,
                                      vmap_axes=0)(x, None, "ntk")
    assert len(calls) == 3 * 3  # rows 0, 1, 2 of the off-diagonal blocks, 3 samples
    close(got, reference.monte_carlo(init_fn, apply_fn, key, 3, x, None)["ntk"], rtol=1e-4)


def test_reuse_is_chosen_only_for_rows_of_several_blocks(monkeypatch):
    seen = []
    real = monte_carlo._Estimator._program

    def spy(self, names, call, blocks1, blocks2, count, params_struct, reuse, *rest):
        program = real(self, names, call, blocks1, blocks2, count, params_struct, reuse, *rest)
        seen.append(reuse)
        return program

    monkeypatch.setattr(monte_carlo._Estimator, "_program", spy)
    init_fn, apply_fn = stax_serial(stax.Dense(8), stax.Relu, stax.Dense(2))
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1, batch_size=2)
    kf(_x(1, (4, 3)), _x(2, (2, 3)), "ntk")  # 2 rows of 1 block
    kf(_x(1, (4, 3)), _x(2, (4, 3)), "ntk")  # 2 rows of 2 blocks
    assert seen == [False, True]


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_non_finite_block_is_named_in_a_staged_grid(model):
    """x1's second block holds a NaN: the first block with a NaN kernel is (1, 0)."""
    from mcntk.errors import NonFiniteSampleError

    init_fn, apply_fn = (stax_serial(stax.Dense(8), stax.Relu, stax.Dense(2)) if model == "mlp"
                         else _conv())
    shape = (3,) if model == "mlp" else (4, 4, 2)
    x1 = _x(1, (4, *shape)).at[2].set(jnp.nan)
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2, batch_size=2,
                                     implementation=NI.STRUCTURED_DERIVATIVES, vmap_axes=0)
    with pytest.raises(NonFiniteSampleError, match=r"sample 0 .* block \(1, 0\)") as info:
        kf(x1, _x(2, (4, *shape)), ("nngp", "ntk"))
    assert info.value.block == (1, 0)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_staged_rows_with_keys_of_other_shapes(impl, monkeypatch):
    """Dropout keys of an rbg key are uint32[4]: the stages are traced with keys like
    the run's (a threefry-shaped key would not lower)."""
    init_fn, apply_fn = _dropout_mlp()
    x1, x2 = _x(1, (6, 4)), _x(2, (4, 4))
    key = jax.random.key(5, impl=impl)
    make = lambda: mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, batch_size=2,
                                               implementation=NI.STRUCTURED_DERIVATIVES)
    calls = _count_early(monkeypatch)
    staged = make()(x1, x2, "ntk")
    assert len(calls) == 3 * 2
    monkeypatch.setattr(_staging, "split", lambda *args: None)
    close(staged, make()(x1, x2, "ntk"))
