"""Sharding: the placement rules (on the default single device), and the runs that
need more devices or processes, each launched as subprocesses that set them up:

* 8 simulated CPU devices: tests/eight_devices.py in one pytest subprocess;
* 2 processes x 2 CPU devices on localhost (``jax.distributed``):
  tests/sharding_worker.py, twice, compared with this process's single-device
  estimate; and a run where one process is killed.
"""

import json
import os
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from jax.example_libraries import stax
from jax.sharding import Mesh, PartitionSpec

import mcntk
from mcntk import _placement, monte_carlo
from mcntk.empirical import KernelSpec

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# compile-bound subprocesses: XLA's cheapest backend optimisation halves their time
FAST_XLA = "--xla_backend_optimization_level=0"
# simulated devices are threads on 2 shared cores: let a late one join a collective
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=600"


def _env(xla_flags):
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _tail(path, n=4000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


# --- placement rules ----------------------------------------------------------------


@pytest.mark.parametrize("devices,blocks,rows", [
    (1, 5, 1), (8, 1, 1), (8, 2, 2), (8, 3, 1), (8, 6, 2), (8, 7, 1), (8, 8, 8),
    (8, 10, 2), (8, 16, 8), (8, 1001, 8), (6, 4, 2), (4, 3, 1), (4, 1000, 4)])
def test_block_rows(devices, blocks, rows):
    """Block rows: a divisor of the devices; work within 10% of an even split; then
    as many rows as possible (fewer blocks held per device)."""
    chex.assert_equal(_placement.block_rows(devices, blocks), rows)


@pytest.mark.parametrize("devices,shape,factors", [
    (8, (8, 8), (8, 1)), (8, (12, 10), (4, 2)), (8, (6, 5), (2, 1)), (8, (7, 5), (1, 1)),
    (2, (3, 3, 4, 4), (1, 1, 2, 1)), (4, (), ()), (1, (5, 3), (1, 1)), (4, (2, 6), (2, 2))])
def test_output_factors(devices, shape, factors):
    """Kernels are split over as many devices as their sizes allow (the rest replicates)."""
    chex.assert_equal(_placement._factor(devices, shape), factors)


def test_select_checks_mesh_arguments():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("a", "b"))
    init_fn, apply_fn = stax.Dense(1)
    make = lambda **kw: mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0),
                                                    1, **kw)
    with pytest.raises(ValueError, match=r"`sample_axes`='a' names axes of a mesh"):
        make(sample_axes="a")
    with pytest.raises(ValueError, match=r"must name distinct axes of the mesh"):
        make(mesh=mesh, sample_axes=("a", "c"))
    with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh"):
        make(mesh="devices")
    with pytest.raises(ValueError, match=r"`device_count`=2 disagrees with `mesh`"):
        make(mesh=mesh, device_count=2)
    devices = _placement.select(-1, mesh, ("b", "a"))
    placement = _placement.place(devices, 4)
    chex.assert_equal((placement.blocks, placement.samples), ((), ("b", "a")))
    chex.assert_equal(placement.spec(_placement.SAMPLES, _placement.BLOCKS),
                      PartitionSpec(("b", "a"), None))


def test_platform_follows_devices():
    """NTK implementations are told the platform of the devices used (gram slices its
    products on CPU), not the default backend's."""
    spec = KernelSpec(lambda p, x: x, (-1,), (), None, 1)
    for devices in (_placement.select(0), _placement.select(-1)):
        est = monte_carlo._Estimator(None, spec, jax.random.PRNGKey(0), 0, True, devices)
        chex.assert_equal(est.options.platform, devices.devices[0].platform)


# --- 8 devices ------------------------------------------------------------------------


def test_eight_devices(tmp_path):
    """tests/eight_devices.py on 8 simulated CPU devices: one pytest
    subprocess, with two xdist workers (compiling dominates; a compiler uses one core).
    Its estimators compile some identical programs (e.g. device_count 8 and -1): a
    compilation cache, fresh for this run, compiles them once."""
    log = tmp_path / "pytest.log"
    env = _env(f"--xla_force_host_platform_device_count=8 {FAST_XLA} {PATIENT_COLLECTIVES}")
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    with open(log, "w") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "pytest", os.path.join(HERE, "eight_devices.py"),
             "-q", "-p", "no:cacheprovider", "-n", "2"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=600, env=env).returncode
    text = _tail(log)
    assert rc == 0, text
    assert " passed" in text and "skipped" not in text, text


# --- 2 processes ----------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(tmp_path, mode, arg):
    port = _free_port()
    procs = []
    for pid in (0, 1):
        log = open(tmp_path / f"{mode}_{pid}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, os.path.join(HERE, "sharding_worker.py"), mode, str(pid),
             str(port), str(arg)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(FAST_XLA)), log))
    return procs


def _wait(procs, timeout):
    """``[(returncode, seconds until exit)]``; kills what outlives ``timeout``."""
    start, out = time.monotonic(), [None, None]
    while time.monotonic() - start < timeout and None in out:
        for i, (p, _) in enumerate(procs):
            if out[i] is None and p.poll() is not None:
                out[i] = (p.returncode, time.monotonic() - start)
        time.sleep(0.05)
    for i, (p, log) in enumerate(procs):
        if out[i] is None:
            p.kill()
            p.wait()
        log.close()
    return out


def test_two_processes(tmp_path):
    """Two processes with 2 CPU devices each compute, on the global mesh, the
    single-process estimate; each obtains the full result."""
    import sharding_worker as worker

    procs = _launch(tmp_path, "estimate", tmp_path)
    done = _wait(procs, timeout=240)
    logs = "\n".join(_tail(tmp_path / f"estimate_{pid}.log") for pid in (0, 1))
    assert done[0] is not None and done[1] is not None, f"hung:\n{logs}"
    assert done[0][0] == 0 and done[1][0] == 0, logs
    refs = {}  # the single-process estimates
    for name in worker.CASES:
        key = worker.reference_key(name)
        if key not in refs:
            refs[key] = worker.estimate(name, device_count=0)
    for pid in (0, 1):
        got = dict(np.load(tmp_path / f"process_{pid}.npz"))
        for name in worker.CASES:
            ref = refs[worker.reference_key(name)]
            for kernel in ("nngp", "ntk"):
                expected = np.asarray(getattr(ref, kernel))
                np.testing.assert_allclose(got[f"{name}/{kernel}"], expected, rtol=1e-6,
                                           atol=1e-6 * np.abs(expected).max(),
                                           err_msg=f"process {pid}, {name}, {kernel}")
        with open(tmp_path / f"process_{pid}.json") as f:
            refused = json.load(f)
        assert "differ between processes" in (refused["different_inputs"] or ""), refused
        assert "must include devices of every process" in (
            refused["one_process_devices"] or ""), refused


@pytest.mark.parametrize("victim", [1, 0])  # a worker, the coordinator
def test_killed_process_ends_the_other(tmp_path, victim):
    """If one process dies mid-estimate, the other ends with an error (the
    coordination service's heartbeat) instead of waiting forever."""
    import sharding_worker as worker

    procs = _launch(tmp_path, "kill", victim)
    done = _wait(procs, timeout=120)
    logs = "\n".join(_tail(tmp_path / f"kill_{pid}.log", 1500) for pid in (0, 1))
    survivor = 1 - victim
    assert done[victim] is not None and done[victim][0] == -9, logs
    assert done[survivor] is not None, f"the survivor hung:\n{logs}"
    assert done[survivor][0] != 0, logs
    assert "finished" not in _tail(tmp_path / f"kill_{survivor}.log"), logs
    # bounded: the heartbeat timeout plus detection and teardown
    assert done[survivor][1] - done[victim][1] < 6 * worker.HEARTBEAT_S, done
