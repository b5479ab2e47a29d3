"""``memory_budget``: the block size chosen, or checked, against an estimate of the
peak memory per device (mcntk._budget)."""

import jax
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import stax_serial

import mcntk
from mcntk import _budget

MiB = 2**20


def _model():
    return stax_serial(stax.Dense(128), stax.Relu, stax.Dense(128), stax.Relu, stax.Dense(10))


X = jax.random.normal(jax.random.PRNGKey(1), (96, 16))


def kernel_fn(**kwargs):
    init_fn, apply_fn = _model()
    return mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2,
                                       implementation=3, **kwargs)


def test_generous_budget_keeps_one_block():
    fn = kernel_fn(memory_budget=2**30)
    got = fn(X, None, "ntk")
    (choice,) = fn.block_sizes.values()
    assert choice.batch_size == 0 and 0 < choice.peak_bytes <= 2**30
    np.testing.assert_array_equal(np.asarray(got), np.asarray(kernel_fn()(X, None, "ntk")))


def test_small_budget_picks_blocks_that_fit_and_the_same_estimate():
    whole = kernel_fn(memory_budget=2**30)
    whole(X, None, "ntk")
    (one_block,) = whole.block_sizes.values()
    budget = one_block.peak_bytes // 3
    fn = kernel_fn(memory_budget=budget)
    got = fn(X, None, "ntk")
    (choice,) = fn.block_sizes.values()
    assert 0 < choice.batch_size < X.shape[0]
    assert choice.peak_bytes <= budget < one_block.peak_bytes
    # the largest of the sizes tried: doubling it (halving's previous step) does not fit
    bigger = kernel_fn(batch_size=min(2 * choice.batch_size, X.shape[0] - 1),
                       memory_budget=budget)
    with pytest.raises(ValueError, match="memory_budget"):
        bigger(X, None, "ntk")
    explicit = kernel_fn(batch_size=choice.batch_size)(X, None, "ntk")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(explicit))
    np.testing.assert_allclose(np.asarray(got), np.asarray(kernel_fn()(X, None, "ntk")),
                               rtol=1e-5, atol=1e-5)


def test_batch_size_over_budget_names_one_that_fits():
    fn = kernel_fn(memory_budget=2**30)
    fn(X, X[:40], "ntk")
    (whole,) = fn.block_sizes.values()
    budget = whole.peak_bytes // 2
    with pytest.raises(ValueError, match=r"`batch_size`=96 needs about .* over "
                                         r"`memory_budget`=\d+ .*`batch_size`=(\d+) fits") as e:
        kernel_fn(batch_size=96, memory_budget=budget)(X, X[:40], "ntk")
    fits = int(e.value.args[0].split("`batch_size`=")[2].split(" ")[0])
    fn = kernel_fn(batch_size=fits, memory_budget=budget)
    fn(X, X[:40], "ntk")
    (choice,) = fn.block_sizes.values()
    assert choice.batch_size == fits and choice.peak_bytes <= budget


def test_float_budget_is_bytes():
    fn = kernel_fn(memory_budget=1e9)
    fn(X, None, "ntk")
    (choice,) = fn.block_sizes.values()
    assert choice.budget == 10**9 and choice.batch_size == 0


def test_budget_too_small_for_one_example():
    with pytest.raises(ValueError, match="`memory_budget`=1000 .* too small.*1 example"):
        kernel_fn(memory_budget=1000)(X, None, "ntk")


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-5, ValueError), ("4GiB", TypeError),
                                       (float("nan"), ValueError), (0.5, ValueError),
                                       (True, TypeError)])
def test_bad_budget_names_the_argument(bad, error):
    with pytest.raises(error, match="memory_budget"):
        kernel_fn(memory_budget=bad)


def test_estimate_grows_with_the_block():
    estimates = {}

    def record(b):
        fn = kernel_fn(batch_size=b, memory_budget=2**40)
        fn(X, None, "ntk")
        (choice,) = fn.block_sizes.values()
        estimates[b] = choice.peak_bytes

    for b in (8, 32, 0):
        record(b)
    assert estimates[8] < estimates[32] < estimates[0], estimates


def test_choose_halves_from_the_whole():
    tried = []

    def estimate(b):
        tried.append(b)
        return {0: 100, 50: 60, 25: 30}.get(b, 10)

    assert _budget.choose(estimate, 100, 0, 40) == _budget.BlockChoice(25, 30, 40)
    assert tried == [0, 50, 25]
    with pytest.raises(ValueError, match="`batch_size`=50 needs about .* `batch_size`=25 fits"):
        _budget.choose(estimate, 100, 50, 40)


def test_symmetric_estimate_covers_the_two_sided_blocks():
    """x2=None cut into blocks runs a one-sided program on diagonal blocks and a
    two-sided one elsewhere: the estimate must cover the larger (found by review)."""
    def peak(x2):
        init_fn, apply_fn = _model()
        fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                         batch_size=16, memory_budget=2**40, implementation=1)
        fn(X, x2, "ntk")
        (choice,) = fn.block_sizes.values()
        return choice.peak_bytes

    two_sided = peak(jax.random.normal(jax.random.PRNGKey(5), X.shape))
    assert peak(None) >= 0.9 * two_sided


# --- samples per step (GPUs and TPUs; forced here on CPU devices) ----------------------


def test_samples_per_step_fits_the_budget():
    assert _budget.samples_per_step(10 * MiB, 4 * MiB, 64 * MiB, 100) == 6  # (64 - 4) / 10
    assert _budget.samples_per_step(10 * MiB, 4 * MiB, 64 * MiB, 3) == 3  # the device's share
    assert _budget.samples_per_step(10 * MiB, 4 * MiB, 10 * MiB, 100) == 1  # at least one
    assert _budget.samples_per_step(MiB, 0, 2**40, 1000) == _budget.MOST_PER_STEP
    assert _budget.samples_per_step(10 * MiB, 0, None, 100) == 1  # no budget known


def test_no_device_budget_on_cpu():
    assert _budget.device_budget(jax.devices("cpu")[0]) is None


@pytest.fixture
def vmapped_samples(monkeypatch):
    """Devices that compute several samples per step, as GPUs and TPUs do."""
    from mcntk import monte_carlo
    monkeypatch.setattr(monte_carlo._Estimator, "_vmaps_samples", lambda self: True)


def test_samples_per_step_grows_with_the_budget(vmapped_samples):
    x1, x2 = X[:24], X[24:40]
    steps, results = [], []
    for budget in (None, 4 * MiB, 2**30):
        init_fn, apply_fn = _model()
        fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 9,
                                         implementation=3, memory_budget=budget)
        results.append(fn(x1, x2, ("nngp", "ntk")))
        steps.append(set(fn.samples_per_step.values()))
    assert steps[0] == {1}  # no budget, and CPUs report no device memory
    (tight,), (loose,) = steps[1:]
    assert 1 < tight < loose == 9, steps  # 9 samples: all of them in 1 GiB
    for got in results[1:]:
        np.testing.assert_allclose(np.asarray(got), np.asarray(results[0]), rtol=2e-5,
                                   atol=1e-5)
