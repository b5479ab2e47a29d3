"""``mcntk demo``: watch a Monte Carlo NTK converge to the infinite-width kernel.

A ReLU network in NTK parameterisation on built-in synthetic data (points on a
circle); its NNGP and NTK estimates are compared, as samples accumulate, with the
closed-form arc-cosine kernels of the infinite-width limit.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import mcntk

SIGMA_W, SIGMA_B = 2.0**0.5, 0.1


def relu_network(width: int, depth: int, out: int):
    """``(init_fn, apply_fn)`` of a ReLU MLP in NTK parameterisation."""
    def init_fn(key, input_shape):
        dims = [input_shape[-1]] + [width] * depth + [out]
        keys = jax.random.split(key, len(dims) - 1)
        params = [(jax.random.normal(k, (a, b)), jax.random.normal(jax.random.fold_in(k, 1), (b,)))
                  for k, a, b in zip(keys, dims[:-1], dims[1:])]
        return input_shape[:-1] + (out,), params

    def apply_fn(params, x, **kwargs):
        for i, (w, b) in enumerate(params):
            x = SIGMA_W * x @ w / jnp.sqrt(w.shape[0]) + SIGMA_B * b[None, :]
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    return init_fn, apply_fn


def arccos_kernels(x: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Infinite-width NNGP and NTK of :func:`relu_network` (arc-cosine recursion)."""
    nngp = SIGMA_W**2 * x @ x.T / x.shape[-1] + SIGMA_B**2
    ntk = nngp.copy()
    for _ in range(depth):
        d = np.sqrt(np.diag(nngp))
        cos = np.clip(nngp / np.outer(d, d), -1.0, 1.0)
        theta = np.arccos(cos)
        expect = np.outer(d, d) * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)
        derivative = (np.pi - theta) / (2 * np.pi)
        nngp = SIGMA_W**2 * expect + SIGMA_B**2
        ntk = nngp + SIGMA_W**2 * derivative * ntk
    return nngp, ntk


def circle(n: int) -> np.ndarray:
    angles = np.linspace(0, np.pi, n, endpoint=False)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32) * 1.5


def run(width: int = 512, depth: int = 2, points: int = 8, samples=(1, 4, 16, 64),
        seed: int = 0) -> list[tuple[int, float, float]]:
    """Prints and returns ``(n_samples, NNGP error, NTK error)`` (relative Frobenius)."""
    x = circle(points)
    init_fn, apply_fn = relu_network(width, depth, out=32)
    exact_nngp, exact_ntk = arccos_kernels(x.astype(np.float64), depth)
    kernel_fn = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(seed), samples)
    print(f"ReLU MLP, {depth} hidden layers of width {width}, {points} points on a circle")
    print(f"{'samples':>8} {'NNGP error':>11} {'NTK error':>10} {'seconds':>8}")
    rows = []
    start = time.perf_counter()
    for n, est in zip(sorted(set(samples)), kernel_fn(x, None, ("nngp", "ntk"))):
        err = lambda a, b: float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
        rows.append((n, err(est.nngp, exact_nngp), err(est.ntk, exact_ntk)))
        print(f"{n:>8} {rows[-1][1]:>11.4f} {rows[-1][2]:>10.4f} "
              f"{time.perf_counter() - start:>8.2f}")
    return rows


def _int_at_least(low: int):
    """An argparse ``type``: an int >= ``low`` (argparse puts the option's name in errors)."""
    what = "a positive int" if low == 1 else f"an int >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mcntk demo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=_int_at_least(1), default=512,
                        help="width of each hidden layer")
    parser.add_argument("--depth", type=_int_at_least(1), default=2,
                        help="number of hidden ReLU layers")
    parser.add_argument("--points", type=_int_at_least(1), default=8,
                        help="number of input points on the circle")
    parser.add_argument("--samples", type=_int_at_least(1), nargs="+", default=[1, 4, 16, 64],
                        help="sample counts at which the estimate is printed")
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seed of the PRNG key")
    args = parser.parse_args(argv)
    run(args.width, args.depth, args.points, tuple(args.samples), args.seed)
