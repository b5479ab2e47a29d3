"""Long runs: standard errors, the rtol stop, the progress bar and non-finite samples
(checkpoints are in test_checkpoint.py)."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcntk
from mcntk import demo
from mcntk.errors import NonFiniteSampleError

NAMES = ("nngp", "ntk")


@pytest.fixture
def mlp():
    return demo.relu_network(32, 2, 3)


def _x(seed, n, d=4):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d))


def per_sample_kernels(init_fn, apply_fn, key, n, x1, x2):
    """The one-sample kernels of samples 0..n-1, from the key schedule written out and
    mcntk.empirical_kernel_fn with explicit parameters."""
    emp = mcntk.empirical_kernel_fn(apply_fn)
    out = []
    for _ in range(n):
        key, split = jax.random.split(key)
        init_key, _ = jax.random.split(split)
        params = init_fn(init_key, x1.shape)[1]
        k = emp(x1, x2, NAMES, params)
        out.append({name: np.asarray(getattr(k, name), np.float64) for name in NAMES})
    return out


def brute_force(samples, n):
    """``(mean, stderr)`` of the first ``n`` samples in float64."""
    out = {}
    for name in NAMES:
        stack = np.stack([s[name] for s in samples[:n]])
        out[name] = stack.mean(0), stack.std(0, ddof=1) / np.sqrt(n)
    return out


def assert_rel(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, err


# --- stderr -------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size,x2_none,store_on_device", [
    (0, True, True), (2, False, True), (3, True, False)])
def test_mean_is_the_plain_estimate(mlp, batch_size, x2_none, store_on_device):
    init_fn, apply_fn = mlp
    x1, x2 = _x(1, 5), None if x2_none else _x(2, 3)
    make = lambda **kw: mcntk.monte_carlo_kernel_fn(
        init_fn, apply_fn, jax.random.PRNGKey(0), 6, batch_size=batch_size,
        store_on_device=store_on_device, **kw)
    plain = make()(x1, x2, NAMES)
    kernel_fn = make(stderr=True)
    est = kernel_fn(x1, x2, NAMES)
    assert type(est).__name__ == "MonteCarloKernel"
    for name in NAMES:
        e = getattr(est, name)
        assert isinstance(e, mcntk.Estimate) and e.n_samples == 6
        np.testing.assert_array_equal(np.asarray(e.mean), np.asarray(getattr(plain, name)))
        assert e.stderr.shape == e.mean.shape and type(e.stderr) is type(e.mean)
        assert (np.asarray(e.stderr) > 0).any()
    both = kernel_fn(x1, x2)
    assert type(both) is mcntk.EmpiricalKernel and isinstance(both.nngp, mcntk.Estimate)


N_BRUTE = 12


@pytest.fixture(scope="module")
def brute():
    """Per-sample kernels of the module's MLP for x1 alone and for (x1, x2)."""
    init_fn, apply_fn = demo.relu_network(32, 2, 3)
    key = jax.random.PRNGKey(3)
    x1, x2 = _x(1, 5), _x(2, 3)
    return {x2_none: per_sample_kernels(init_fn, apply_fn, key, N_BRUTE, x1,
                                        None if x2_none else x2) for x2_none in (True, False)}


@pytest.mark.parametrize("batch_size,x2_none", [(0, False), (2, True), (2, False)])
def test_stderr_equals_brute_force(mlp, brute, batch_size, x2_none):
    init_fn, apply_fn = mlp
    x1, x2 = _x(1, 5), None if x2_none else _x(2, 3)
    expected = brute_force(brute[x2_none], N_BRUTE)
    est = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(3), N_BRUTE,
                                      batch_size=batch_size, stderr=True)(x1, x2, NAMES)
    for name in NAMES:
        mean, stderr = expected[name]
        assert_rel(getattr(est, name).mean, mean, 1e-5)
        assert_rel(getattr(est, name).stderr, stderr, 1e-5)


def test_stderr_of_the_generator_equals_brute_force(mlp, brute):
    init_fn, apply_fn = mlp
    counts = [2, 5, N_BRUTE]
    gen = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(3), counts,
                                      batch_size=2, stderr=True)(_x(1, 5), _x(2, 3), NAMES)
    got = list(gen)
    assert [e.ntk.n_samples for e in got] == counts
    for n, est in zip(counts, got):
        expected = brute_force(brute[False], n)
        for name in NAMES:
            assert_rel(getattr(est, name).stderr, expected[name][1], 1e-5)


def test_one_sample_has_no_stderr(mlp):
    init_fn, apply_fn = mlp
    est = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                      stderr=True)(_x(1, 3), None, "ntk")
    assert est.n_samples == 1 and np.isnan(np.asarray(est.stderr)).all()


def test_pytree_outputs_hold_one_estimate_per_leaf():
    def init_fn(key, shape):
        return shape, jax.random.normal(key, (shape[-1], 3))

    def apply_fn(params, x, **kwargs):
        h = x @ params
        return {"a": jnp.tanh(h), "b": (h**2, jnp.sin(h))}

    est = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 5,
                                      stderr=True)(_x(1, 4), None, NAMES)
    assert set(est) == {"a", "b"}
    assert isinstance(est["b"][1].ntk, mcntk.Estimate) and est["b"][1].ntk.n_samples == 5
    plain = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 5)(
        _x(1, 4), None, NAMES)
    np.testing.assert_array_equal(est["b"][0].nngp.mean, plain["b"][0].nngp)


def test_moments_stay_accurate_over_many_samples():
    """10^5 samples of a large constant plus noise: float32 Welford and Chan merging
    keep the standard error within 1e-3 of the float64 value."""
    from mcntk import _accumulate

    rng = np.random.default_rng(0)
    data = (1e3 + rng.standard_normal((100_000, 3))).astype(np.float32)
    shapes = jax.ShapeDtypeStruct((3,), jnp.float32)
    update = jax.jit(lambda m, x: _accumulate.update(m, x, jnp.asarray(True)))

    def run(chunk):
        m = _accumulate.init(shapes, True)
        m = jax.lax.fori_loop(0, chunk.shape[0], lambda i, m: update(m, chunk[i]), m)
        return m

    halves = [run(jnp.asarray(c)) for c in np.split(data, 4)]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *halves)
    merged = _accumulate.merge_axis(stacked, 0)
    se = np.asarray(_accumulate.stderr(merged, shapes))
    expected = data.astype(np.float64).std(0, ddof=1) / np.sqrt(len(data))
    np.testing.assert_allclose(se, expected, rtol=1e-3)
    assert int(merged.count) == 100_000


def test_coverage_of_the_infinite_width_ntk():
    """95% intervals of a width-1024 NTK-parameterised ReLU MLP cover the closed-form
    infinite-width NTK for 85-99% of entries at 64 samples, over several keys."""
    x = demo.circle(8)
    init_fn, apply_fn = demo.relu_network(1024, 1, 1)
    exact = demo.arccos_kernels(x.astype(np.float64), 1)[1]
    upper = np.triu_indices(len(x))
    covered = []
    for seed in range(4):
        est = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(seed), 64,
                                          stderr=True)(x, None, "ntk")
        mean, se = np.asarray(est.mean, np.float64), np.asarray(est.stderr, np.float64)
        covered.append((np.abs(mean - exact) <= 1.96 * se)[upper])
    rate = np.concatenate(covered).mean()
    assert 0.85 <= rate <= 0.99, rate


# --- rtol ---------------------------------------------------------------------------

def _accuracy(est):
    return max(float(np.max(e.stderr) / np.max(np.abs(e.mean))) for e in est)


def test_loose_rtol_stops_early_within_accuracy(mlp):
    init_fn, apply_fn = mlp
    x, key = _x(1, 4), jax.random.PRNGKey(0)
    make = lambda n, **kw: mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, n,
                                                       stderr=True, **kw)
    est = make(1000, rtol=0.08, checkpoint_every=4)(x, None, NAMES)
    n = est.ntk.n_samples
    assert n == est.nngp.n_samples and 4 < n < 1000 and n % 4 == 0
    assert _accuracy(est) <= 0.08
    before, at = make([n - 4, n])(x, None, NAMES)
    assert _accuracy(before) > 0.08  # the first boundary that meets it
    for name in NAMES:  # the early estimate is the estimate at that count
        np.testing.assert_array_equal(getattr(est, name).mean, getattr(at, name).mean)
        np.testing.assert_array_equal(getattr(est, name).stderr, getattr(at, name).stderr)
    # the generator stops likewise, after the counts below the stop
    counts = [2, n - 4, n + 50, 1000]
    got = list(make(counts, rtol=0.08, checkpoint_every=4)(x, None, NAMES))
    assert [e.ntk.n_samples for e in got] == [2, n - 4, n]
    np.testing.assert_array_equal(got[-1].ntk.mean, est.ntk.mean)


def test_tight_rtol_runs_to_the_ceiling(mlp):
    init_fn, apply_fn = mlp
    est = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 10,
                                      stderr=True, rtol=1e-6, checkpoint_every=4)(
        _x(1, 4), None, "ntk")
    assert est.n_samples == 10 and _accuracy([est]) > 1e-6



# --- progress -----------------------------------------------------------------------

def test_progress_true_writes_a_bar_to_stderr(mlp, capsys):
    init_fn, apply_fn = mlp
    mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 12, stderr=True,
                                progress=True, checkpoint_every=4)(_x(1, 3), None, "ntk")
    err = capsys.readouterr().err
    assert "12/12" in err and "sample" in err and "rel. stderr=" in err, err


def test_no_bar_when_stderr_is_not_a_terminal(mlp, capsys):
    init_fn, apply_fn = mlp
    for progress in (None, False):
        mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 5, stderr=True,
                                    progress=progress)(_x(1, 3), None, "ntk")
        captured = capsys.readouterr()
        assert captured.err == "" and captured.out == ""


_SCRIPT = textwrap.dedent("""
    import jax, mcntk
    from mcntk import demo
    init_fn, apply_fn = demo.relu_network(8, 1, 2)
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 7, stderr=True,
                                     rtol=1e-9, checkpoint_every=2)
    kf(jax.numpy.ones((3, 2)), None, "ntk")
""")


def _read_all(fd):
    text = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the terminal's other side closed
            return text
        if not data:
            return text
        text += data


def test_progress_none_in_a_process_writes_nothing_to_a_pipe_and_a_bar_to_a_terminal():
    piped = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr.decode()
    assert piped.stderr == b"" and piped.stdout == b""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT], stdout=subprocess.DEVNULL,
                            stderr=child)
    os.close(child)
    try:
        text = _read_all(main)
    finally:
        os.close(main)
    assert proc.wait(timeout=300) == 0
    assert b"7/7" in text and b"sample" in text and b"rel. stderr=" in text, text


def test_missing_tqdm_names_the_extra(mlp, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    init_fn, apply_fn = mlp
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2,
                                     progress=True)
    with pytest.raises(ImportError, match=r"mcntk\[progress\]"):
        kf(_x(1, 3), None, "ntk")
    quiet = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 2)
    quiet(_x(1, 3), None, "ntk")  # progress=None never needs tqdm


# --- non-finite samples -------------------------------------------------------------

def nan_at(k, key, width=8):
    """An MLP whose sample ``k`` (of ``key``'s schedule) has a NaN weight."""
    chain = key
    for _ in range(k):
        chain, _ = jax.random.split(chain)
    bad_key = jax.random.split(jax.random.split(chain)[1])[0]
    init_fn, apply_fn = demo.relu_network(width, 1, 2)

    def init(key, shape):
        out, params = init_fn(key, shape)
        bad = jnp.all(key == bad_key)
        (w, b), *rest = params
        return out, [(jnp.where(bad, jnp.nan, 1.0) * w, b), *rest]

    return init, apply_fn


@pytest.mark.parametrize("batch_size", [0, 2])
def test_nan_sample_raises_naming_the_sample_kernel_and_block(batch_size):
    key = jax.random.PRNGKey(0)
    init_fn, apply_fn = nan_at(5, key)
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 9, batch_size=batch_size)
    with pytest.raises(NonFiniteSampleError, match=r"sample 5 \(0-based\) gave a non-finite "
                                                   r"'n(ngp|tk)' kernel .* in block \(0, 0\)"
                       ) as info:
        kf(_x(1, 3), None, NAMES)
    assert isinstance(info.value, FloatingPointError)
    assert info.value.sample == 5 and info.value.block == (0, 0)
    assert info.value.kernel in NAMES and info.value.committed is None
    # the samples before it are fine
    ok = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 5)(_x(1, 3), None, "ntk")
    assert np.isfinite(np.asarray(ok)).all()
