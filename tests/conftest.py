"""Strict JAX for every test, plus shared fixtures."""

import os

# Before JAX starts its backend (these processes and their subprocesses read them):
# the suite is bound by compiling small programs, and XLA's cheapest LLVM optimisation
# compiles them about 40% faster (the programs and their numbers are the same up to
# rounding); simulated devices are threads on few shared cores, so a collective may
# wait for a late one longer than XLA's default 40 s before it aborts the process. (A
# collective that never completes is a deadlock, not lateness: see
# mcntk._placement.Placement.one_at_a_time.)
_FLAGS = ("--xla_backend_optimization_level=0",
          "--xla_cpu_collective_call_terminate_timeout_seconds=600")
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_given] + [f for f in _FLAGS if f.split("=")[0] not in _given])

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ.get("MCNTK_TEST_X64"):
    jax.config.update("jax_enable_x64", True)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "nt065_mlp.npz")


@pytest.fixture
def golden():
    """neural-tangents 0.6.5's numbers (see shared/golden/README.md), with the PRNG
    implementation they were made with; the flag is restored afterwards."""
    old = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    try:
        yield dict(np.load(GOLDEN))
    finally:
        jax.config.update("jax_threefry_partitionable", old)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
