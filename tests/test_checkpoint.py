"""Checkpoints: resume equals the uninterrupted run (in-process, after SIGKILL, across
device counts), torn commits are never loaded, other computations are refused."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_long_runs import nan_at

import mcntk
from mcntk import demo
from mcntk.errors import CheckpointMismatchError, NonFiniteSampleError

NAMES = ("nngp", "ntk")


def mlp(width=16, activation=jax.nn.relu, out=3):
    """A 2-layer MLP in NTK parameterisation with a choice of activation."""
    def init_fn(key, shape):
        k1, k2 = jax.random.split(key)
        return shape[:-1] + (out,), (jax.random.normal(k1, (shape[-1], width)),
                                     jax.random.normal(k2, (width, out)))

    def apply_fn(params, x, **kwargs):
        w1, w2 = params
        h = activation(x @ w1 / jnp.sqrt(w1.shape[0]))
        return h @ w2 / jnp.sqrt(w2.shape[0])

    return init_fn, apply_fn


def x_(seed, n=4):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, 3))


def make(model=None, key=0, n=8, **kw):
    init_fn, apply_fn = model or mlp()
    kw.setdefault("stderr", True)
    return mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(key), n, **kw)


def steps(directory):
    """Finalised commits on disk."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()
                  and os.path.exists(os.path.join(directory, d, "commit_success.txt")))


def assert_same(a, b, rtol=1e-6):
    for name in NAMES:
        ea, eb = getattr(a, name), getattr(b, name)
        assert ea.n_samples == eb.n_samples
        for f in ("mean", "stderr"):
            u, v = np.asarray(getattr(ea, f)), np.asarray(getattr(eb, f))
            assert np.abs(u - v).max() <= rtol * np.abs(v).max(), (name, f)


# --- resume -------------------------------------------------------------------------

def test_resume_in_process_equals_the_uninterrupted_run(tmp_path):
    x = x_(1)
    first = make(n=8, checkpoint_dir=tmp_path, checkpoint_every=3)(x, None, NAMES)
    assert steps(tmp_path) == [6, 8]  # the two newest commits, 8 a requested count
    assert first.ntk.n_samples == 8
    more = make(n=14, checkpoint_dir=tmp_path, checkpoint_every=3)(x, None, NAMES)
    plain = make(n=14)(x, None, NAMES)
    assert_same(more, plain, rtol=0)  # one device: bitwise, whatever the boundaries
    assert steps(tmp_path) == [12, 14]
    again = make(n=14, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    assert_same(again(x, None, NAMES), plain, rtol=0)  # read from the commit at 14


def test_resume_with_a_typed_key(tmp_path):
    init_fn, apply_fn = mlp()
    make_typed = lambda n, **kw: mcntk.monte_carlo_kernel_fn(
        init_fn, apply_fn, jax.random.key(5), n, stderr=True, **kw)
    make_typed(3, checkpoint_dir=tmp_path)(x_(1), None, NAMES)
    resumed = make_typed(5, checkpoint_dir=tmp_path)(x_(1), None, NAMES)
    assert_same(resumed, make_typed(5)(x_(1), None, NAMES), rtol=0)
    with pytest.raises(CheckpointMismatchError, match="the `key`"):  # the legacy key's data
        make(key=5, n=5, checkpoint_dir=tmp_path)(x_(1), None, NAMES)


@pytest.mark.parametrize("x2_none", [True, False])
def test_resume_with_blocks_and_another_layout(tmp_path, x2_none):
    """Blocks of two programs (diagonal and off-diagonal blocks), committed from one
    wave per program, resumed into one wave per block (store_on_device=False) and back."""
    x1, x2 = x_(1, 5), None if x2_none else x_(2, 3)
    make(n=4, batch_size=2, checkpoint_dir=tmp_path)(x1, x2, NAMES)
    plain = list(make(n=[7, 9], batch_size=2)(x1, x2, NAMES))
    on_host = make(n=7, batch_size=2, store_on_device=False, checkpoint_dir=tmp_path,
                   checkpoint_every=2)(x1, x2, NAMES)
    assert_same(on_host, plain[0], rtol=1e-6)
    back = make(n=9, batch_size=2, checkpoint_dir=tmp_path)(x1, x2, NAMES)
    assert_same(back, plain[1], rtol=1e-6)


def test_generator_replays_its_counts_from_commits(tmp_path):
    x = x_(1)
    counts = [3, 8, 12]
    gen = make(n=counts, checkpoint_dir=tmp_path, checkpoint_every=4)(x, None, NAMES)
    next(gen)
    next(gen)
    gen.close()  # the run stops after 8 samples
    assert max(steps(tmp_path)) == 8
    resumed = list(make(n=counts, checkpoint_dir=tmp_path, checkpoint_every=4)(x, None, NAMES))
    plain = list(make(n=counts)(x, None, NAMES))
    assert [e.ntk.n_samples for e in resumed] == counts
    for a, b in zip(resumed, plain):
        assert_same(a, b, rtol=0)


def test_rtol_stop_is_resumed_and_can_be_tightened(tmp_path):
    x = x_(1)
    loose = make(n=400, rtol=0.1, checkpoint_dir=tmp_path, checkpoint_every=4)(x, None, NAMES)
    stop = loose.ntk.n_samples
    assert stop < 400 and max(steps(tmp_path)) == stop
    again = make(n=400, rtol=0.1, checkpoint_dir=tmp_path, checkpoint_every=4)(x, None, NAMES)
    assert_same(again, loose, rtol=0)
    tight = make(n=stop + 6, rtol=1e-9, checkpoint_dir=tmp_path, checkpoint_every=4)(
        x, None, NAMES)
    assert tight.ntk.n_samples == stop + 6
    assert_same(tight, make(n=stop + 6)(x, None, NAMES), rtol=0)


_X64 = 'import os, jax; jax.config.update("jax_enable_x64", bool(os.environ.get("MCNTK_TEST_X64")))'

_PORTABLE = _X64 + textwrap.dedent("""
    import sys, jax
    jax.config.update("jax_num_cpu_devices", 2)
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import make, x_
    assert jax.device_count() == 2
    make(n=9, checkpoint_dir=sys.argv[1], checkpoint_every=4)(x_(1), None, ("nngp", "ntk"))
""")


def test_checkpoint_is_portable_across_device_counts(tmp_path):
    """A run committed on 2 devices (samples split 2 ways, 9 samples: unevenly) resumes
    on 1. (This subprocess once deadlocked in XLA's CPU runtime, under load: commits
    merged the devices' moments with eager operations on sharded arrays. They are
    merged on the host now: tests/eight_devices.py::test_checkpoint_merges_on_the_host.)"""
    directory = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-c", _PORTABLE, str(directory),
                    os.path.dirname(__file__)], check=True, timeout=300)
    assert max(steps(directory)) == 9
    resumed = make(n=15, checkpoint_dir=directory, checkpoint_every=4)(x_(1), None, NAMES)
    assert_same(resumed, make(n=15)(x_(1), None, NAMES), rtol=1e-6)


# --- torn commits -------------------------------------------------------------------

# orbax's failed read of the cut-short commit leaves a callback on a closed event loop
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_torn_commits_are_never_loaded(tmp_path):
    x = x_(1)
    make(n=8, checkpoint_dir=tmp_path, checkpoint_every=4)(x, None, NAMES)
    good = tmp_path / "8"
    # a commit killed mid-write: orbax's temporary directory, never renamed
    shutil.copytree(good, tmp_path / "12.orbax-checkpoint-tmp")
    # a finalised name without orbax's commit marker
    shutil.copytree(good, tmp_path / "16")
    os.remove(tmp_path / "16" / "commit_success.txt")
    # a finalised commit whose arrays were cut short
    shutil.copytree(good, tmp_path / "20")
    meta_file = tmp_path / "20" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "done": 20}))
    for root, _, files in os.walk(tmp_path / "20" / "state"):
        for f in files:
            if "ocdbt" in root or f.startswith("manifest"):
                open(os.path.join(root, f), "wb").close()
    with pytest.warns(RuntimeWarning, match=r"commit (16|20) .* ignored and removed"):
        resumed = make(n=24, checkpoint_dir=tmp_path, checkpoint_every=4)(x, None, NAMES)
    assert_same(resumed, make(n=24)(x, None, NAMES), rtol=0)
    assert not any("tmp" in d for d in os.listdir(tmp_path))
    assert steps(tmp_path) == [20, 24]  # rewritten by the resumed run


_CHILD = _X64 + textwrap.dedent("""
    import sys, jax, numpy as np, mcntk
    from mcntk import demo
    directory, out = sys.argv[1], sys.argv[2]
    init_fn, apply_fn = demo.relu_network(128, 2, 4)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    kf = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 60,
                                     stderr=True, checkpoint_dir=directory,
                                     checkpoint_every=2, progress=True)
    est = kf(x, None, ("nngp", "ntk"))
    np.savez(out, **{f"{k}_{f}": np.asarray(getattr(getattr(est, k), f))
                     for k in ("nngp", "ntk") for f in ("mean", "stderr", "n_samples")})
""")


def _run_child(directory, out, kill, rng):
    """Starts the child; once it has made progress, kills it with SIGKILL as ``kill``
    says ('torn': as soon as a commit is being written after its first new commit;
    'random': a random time, up to 50 ms, after 1-4 new commits); returns (exit code,
    stderr). Moments are counted in commits so that they fall inside the run on a
    fast machine or a slow one."""
    before = max(steps(directory), default=0)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.monotonic()
    commits, delay = rng.randint(1, 4), rng.uniform(0.0, 0.05)
    progressed = None
    while proc.poll() is None and kill and time.monotonic() - start < 240:
        now = max(steps(directory), default=0)
        if kill == "torn" and now > before and any("tmp" in d for d in os.listdir(directory)):
            break
        if kill == "random" and progressed is None and now >= before + 2 * commits:
            progressed = time.monotonic()
        if progressed is not None and time.monotonic() - progressed >= delay:
            break
        time.sleep(0.001)
    if kill and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode(errors="replace")


def test_sigkill_at_random_moments_then_resume(tmp_path):
    rng = random.Random(0)
    directory, out = tmp_path / "ckpt", tmp_path / "out.npz"
    killed, torn_seen, last = 0, 0, 0
    for kill in ("torn", "random", "random"):
        code, err = _run_child(directory, out, kill, rng)
        if code == 0:  # finished before the kill: nothing left to interrupt
            break
        assert code == -signal.SIGKILL, err
        killed += 1
        torn_seen += any("tmp" in d for d in os.listdir(directory))
        now = max(steps(directory), default=0)
        assert now >= last  # commits only move forward
        last = now
    assert killed == 3 and torn_seen >= 1 and 0 < last < 60
    code, err = _run_child(directory, out, None, rng)
    assert code == 0, err
    # the bar starts where the last commit left off: resumed, not restarted
    first = err.split("\r")[1] if "\r" in err else err
    assert f" {last}/60 " in first, (last, err[:300])
    got = np.load(out)
    init_fn, apply_fn = demo.relu_network(128, 2, 4)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    ref = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 60,
                                      stderr=True)(x, None, NAMES)
    for name in NAMES:
        assert int(got[f"{name}_n_samples"]) == 60  # no sample lost or counted twice
        for f in ("mean", "stderr"):
            expected = np.asarray(getattr(getattr(ref, name), f))
            err_rel = np.abs(got[f"{name}_{f}"] - expected).max() / np.abs(expected).max()
            assert err_rel <= 1e-6, (name, f, err_rel)
    assert max(steps(directory)) == 60


# --- refused checkpoints ------------------------------------------------------------

@pytest.fixture
def committed(tmp_path):
    """A directory holding a run of 8 samples of ``make()`` on ``x_(1)``."""
    make(n=8, checkpoint_dir=tmp_path, checkpoint_every=4)(x_(1), None, NAMES)
    return tmp_path


@pytest.mark.parametrize("change,part", [
    (dict(x=x_(2)), "the inputs"),
    (dict(x2=x_(3, 2)), "the inputs"),
    (dict(key=1), "the `key`"),
    (dict(model=mlp(activation=jnp.tanh)), "the model"),  # same parameter structure
    (dict(model=mlp(width=17)), "the model"),
    (dict(stderr=False), "the settings"),
    (dict(get="ntk"), "the settings"),
    (dict(trace_axes=()), "the settings"),
])
def test_checkpoint_of_another_computation_is_refused(committed, change, part):
    change = dict(change)
    x, x2, get = change.pop("x", x_(1)), change.pop("x2", None), change.pop("get", NAMES)
    kernel_fn = make(n=12, checkpoint_dir=committed, checkpoint_every=4, **change)
    message = (f"`checkpoint_dir`='{committed}' holds a checkpoint of another computation: "
               f"{part}")
    with pytest.raises(CheckpointMismatchError, match=re.escape(message)):
        kernel_fn(x, x2, get)
    assert steps(committed) == [4, 8]  # untouched


def test_other_n_samples_semantics_are_refused(committed):
    for n in (6, [2, 8]):  # fewer samples than it holds, at counts it did not commit
        with pytest.raises(CheckpointMismatchError, match=r"holds a run of 8 samples that has "
                                                          r"no commit at `n_samples`="):
            make(n=n, checkpoint_dir=committed, checkpoint_every=4)(x_(1), None, NAMES)
    kept = make(n=[4, 8], checkpoint_dir=committed, checkpoint_every=4)(x_(1), None, NAMES)
    assert [e.ntk.n_samples for e in kept] == [4, 8]  # 4 and 8 were both committed


def test_options_that_do_not_change_the_estimate_may_change(committed):
    kernel_fn = make(n=10, checkpoint_dir=committed, checkpoint_every=5, rtol=1e-9,
                     progress=False, store_on_device=False,
                     implementation=mcntk.NtkImplementation.NTK_VECTOR_PRODUCTS)
    resumed = kernel_fn(x_(1), None, NAMES)
    assert isinstance(resumed.ntk.mean, np.ndarray)
    assert_same(resumed, make(n=10)(x_(1), None, NAMES), rtol=1e-5)


# --- non-finite samples and missing extras -------------------------------------------

def test_nan_sample_keeps_earlier_commits(tmp_path):
    key = jax.random.PRNGKey(0)
    init_fn, apply_fn = nan_at(10, key)
    x = x_(1, 3)[:, :2]
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 16, stderr=True,
                                            checkpoint_dir=tmp_path, checkpoint_every=4)
    with pytest.raises(NonFiniteSampleError, match=r"sample 10 .* The last commit in "
                                                   r"`checkpoint_dir` \(8 samples\) is intact"
                       ) as info:
        kernel_fn(x, None, NAMES)
    assert info.value.sample == 10 and info.value.committed == 8
    assert steps(tmp_path) == [4, 8]
    # the commit holds exactly samples 0..7
    held = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 8, stderr=True,
                                       checkpoint_dir=tmp_path)(x, None, NAMES)
    plain = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 8, stderr=True)(x, None, NAMES)
    assert_same(held, plain, rtol=0)


def test_nan_at_the_first_sample_reports_nothing_committed(tmp_path):
    key = jax.random.PRNGKey(0)
    init_fn, apply_fn = nan_at(0, key)
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 8, checkpoint_dir=tmp_path,
                                            checkpoint_every=4)
    with pytest.raises(NonFiniteSampleError, match="Nothing had been committed") as info:
        kernel_fn(x_(1, 3)[:, :2], None, NAMES)
    assert info.value.sample == 0 and info.value.committed == 0
    assert steps(tmp_path) == []


def test_missing_orbax_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"mcntk\[checkpoint\]"):
        make(checkpoint_dir=tmp_path)
