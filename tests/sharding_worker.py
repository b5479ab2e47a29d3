"""One process of a multi-process run, for tests/test_sharding.py.

    python tests/sharding_worker.py estimate PROCESS_ID PORT OUT_DIR
    python tests/sharding_worker.py kill PROCESS_ID PORT VICTIM

Two of these (process ids 0 and 1, 2 CPU devices each) form a 4-device global
mesh on localhost. ``estimate`` computes :data:`CASES` and saves, per process, the
full result it obtained (``OUT_DIR/process_<id>.npz``) and the errors of the cases
that must fail. ``kill`` starts an estimate during which process ``VICTIM`` kills
itself; the other must end with an error (the parent times it).
"""

import json
import os
import signal
import sys
import time

import numpy as np

DEVICES_PER_PROCESS = 2
HEARTBEAT_S = 5


def inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((6, 3)).astype(np.float32),
            rng.standard_normal((3, 3)).astype(np.float32))


def model():
    from jax.example_libraries import stax
    from mcntk_reference import stax_serial

    return stax_serial(stax.Dense(8), stax.Relu, stax.Dense(2))


# name -> (x2 is None, n_samples, typed key, monte_carlo_kernel_fn keywords)
CASES = {
    "on_device": (False, 5, False, dict(batch_size=2)),
    "on_host": (False, 5, False, dict(batch_size=2, store_on_device=False)),
    "mesh_x2_none_typed_key": (True, 4, True, dict(batch_size=2, sample_axes="local")),
}


def reference_key(name):
    """Cases with equal references (the reference ignores placement and storage)."""
    x2_none, n, typed, kwargs = CASES[name]
    return x2_none, n, typed, kwargs["batch_size"]


def estimate(name, mesh=None, device_count=-1):
    """The case's estimate (a MonteCarloKernel of nngp and ntk)."""
    x2_none, n, typed, kwargs = CASES[name]
    x1, x2 = inputs()
    return kernel_fn(name, mesh, device_count)(x1, None if x2_none else x2, ("nngp", "ntk"))


def kernel_fn(name, mesh=None, device_count=-1):
    import jax

    import mcntk

    x2_none, n, typed, kwargs = CASES[name]
    kwargs = dict(kwargs, implementation=1, device_count=device_count)
    if "sample_axes" in kwargs:
        if mesh is None:  # the single-process reference: no mesh
            del kwargs["sample_axes"]
        else:
            kwargs["mesh"] = mesh
    key = jax.random.key(0) if typed else jax.random.PRNGKey(0)
    return mcntk.monte_carlo_kernel_fn(*model(), key, n, **kwargs)


def initialize(process_id, port):
    import jax

    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    if os.environ.get("MCNTK_TEST_X64"):  # like tests/conftest.py, so results compare
        jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=30,
                               heartbeat_timeout_seconds=HEARTBEAT_S)


def run_estimates(process_id, out_dir):
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()).reshape(2, DEVICES_PER_PROCESS), ("hosts", "local"))
    results, report, fns = {}, {}, {}
    x1, x2 = inputs()
    for name in CASES:
        start = time.monotonic()
        fns[name] = kernel_fn(name, mesh)
        out = fns[name](x1, None if CASES[name][0] else x2, ("nngp", "ntk"))
        print(f"{name}: {time.monotonic() - start:.1f} s", flush=True)
        for kernel, value in out._asdict().items():
            if CASES[name][3].get("store_on_device", True):
                # a global array over both processes' devices: gather it to fetch it
                assert isinstance(value, jax.Array) and not value.is_fully_addressable
                assert value.sharding.device_set == set(jax.devices()), value.sharding
                value = multihost_utils.process_allgather(value, tiled=True)
            assert type(value) is np.ndarray, type(value)
            results[f"{name}/{kernel}"] = value
    import mcntk

    fails = {  # what every process must refuse
        "different_inputs": lambda: fns["on_device"](x1 + process_id, x2, ("nngp", "ntk")),
        "one_process_devices": lambda: mcntk.monte_carlo_kernel_fn(
            *model(), jax.random.PRNGKey(0), 2, device_count=DEVICES_PER_PROCESS),
    }
    for name, fn in fails.items():
        try:
            fn()
            report[name] = None
        except ValueError as e:
            report[name] = str(e)
    np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **results)
    with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
        json.dump(report, f)


def run_killed(process_id, victim):
    import jax
    import jax.numpy as jnp

    import mcntk

    init_fn, apply_fn = model()

    def die(_):
        os.kill(os.getpid(), signal.SIGKILL)

    def apply_and_die(params, x, **kwargs):  # the victim dies inside the program
        if process_id == victim:
            jax.debug.callback(die, jnp.sum(x))
        return apply_fn(params, x, **kwargs)

    x1, x2 = inputs()
    print(f"process {process_id} computing", flush=True)
    mcntk.monte_carlo_kernel_fn(init_fn, apply_and_die, jax.random.PRNGKey(0), 64,
                                batch_size=2, implementation=1)(x1, x2)
    print(f"process {process_id} finished", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    mode, process_id, port, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    initialize(process_id, port)
    if mode == "estimate":
        run_estimates(process_id, arg)
    else:
        run_killed(process_id, int(arg))
