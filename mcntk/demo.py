"""``mcntk demo``: the Monte Carlo NTK of a small Flax model on real data, watched as it
converges to the infinite-width kernel, then used for kernel regression.

The model is a Flax linen ReLU network in NTK parameterisation; its infinite-width
NNGP and NTK are the arc-cosine kernels (:func:`arccos_kernels`), so the demo can say
how far each Monte Carlo estimate is from the limit. The data are scikit-learn's
digits (shipped inside scikit-learn, no download) when scikit-learn is installed,
otherwise three interleaved spirals generated here. Flax and matplotlib are imported
only when the demo runs: ``pip install "mcntk[demo]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import mcntk

SIGMA_W, SIGMA_B = 2.0**0.5, 0.1

DESCRIPTION = ("The Monte Carlo NTK of a small Flax model on real data: its convergence to the "
               "infinite-width kernel, kernel regression, and a picture.")
DEFAULTS = dict(width=512, depth=1, samples=(1, 4, 16, 64, 256), train=300, test=200)
FAST = dict(width=128, depth=1, samples=(1, 4, 16), train=60, test=40)  # CI, ~10 s


# --- the network and its infinite-width kernels -------------------------------------


def relu_network(width: int, depth: int, out: int):
    """``(init_fn, apply_fn)`` of a ReLU MLP in NTK parameterisation (stax conventions).

    Each layer computes ``SIGMA_W * x @ w / sqrt(fan_in) + SIGMA_B * b`` with standard
    normal ``w`` and ``b``; ``depth`` hidden layers of ``width`` units, ``out`` outputs.
    """
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


def flax_relu_network(width: int, depth: int, out: int):
    """The network of :func:`relu_network` as a Flax linen module (imports flax)."""
    import flax.linen as nn

    class NtkDense(nn.Module):
        """A dense layer in NTK parameterisation: standard normal parameters, scaled
        in the forward pass."""

        features: int

        @nn.compact
        def __call__(self, x):
            w = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.features))
            b = self.param("bias", nn.initializers.normal(1.0), (self.features,))
            y = SIGMA_W * x @ w / np.sqrt(x.shape[-1])
            return y + SIGMA_B * jnp.broadcast_to(b, y.shape)

    class ReluMlp(nn.Module):
        """``depth`` hidden ReLU layers of ``width`` units, then ``out`` outputs."""

        @nn.compact
        def __call__(self, x):
            for _ in range(depth):
                x = nn.relu(NtkDense(width)(x))
            return NtkDense(out)(x)

    return ReluMlp()


def arccos_kernels(x: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Infinite-width NNGP and NTK of :func:`relu_network` (arc-cosine recursion),
    ``(N, N)`` each for inputs ``x`` of shape ``(N, d)``."""
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


# --- data ----------------------------------------------------------------------------


class Data(NamedTuple):
    """Training and test examples (rows of ``x``, float32) with integer labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int


def circle(n: int) -> np.ndarray:
    """``n`` points on a half circle of radius 1.5, shape ``(n, 2)``."""
    angles = np.linspace(0, np.pi, n, endpoint=False)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32) * 1.5


def spirals(n: int, seed: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy points on ``classes`` interleaved spiral arms: ``(x (n, 2), labels)``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    radius = rng.uniform(0.15, 1.0, size=n)
    angle = 1.5 * np.pi * radius + 2 * np.pi * labels / classes
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return x + 0.03 * rng.normal(size=x.shape), labels


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    return load_digits(return_X_y=True)


def load_data(source: str = "auto", train: int = 300, test: int = 200, seed: int = 0) -> Data:
    """``train`` + ``test`` examples drawn without replacement from ``source``:

    ``"digits"`` (scikit-learn's 8x8 digit images, 10 classes, shipped with
    scikit-learn), ``"spirals"`` (3 classes in the plane, generated here) or
    ``"auto"`` (digits when scikit-learn is installed, else spirals). Inputs are
    centred with the training mean and scaled to mean squared entry 1, so the
    kernels' scale does not depend on the data.
    """
    if source not in ("auto", "digits", "spirals"):
        raise ValueError(f"`source` must be 'auto', 'digits' or 'spirals', got {source!r}.")
    digits = None if source == "spirals" else _sklearn_digits()
    if digits is None and source == "digits":
        raise ImportError('the digits data need scikit-learn: pip install "mcntk[demo]" '
                          "(or pip install scikit-learn), or pass --data spirals.")
    if digits is not None:
        name, (x, labels), classes = "scikit-learn digits (8x8 images)", digits, 10
    else:
        name, classes = "spirals (3 arms in the plane)", 3
        x, labels = spirals(train + test, seed)
    if train + test > len(x):
        raise ValueError(f"{name} has {len(x)} examples; asked for {train} + {test}.")
    order = np.random.default_rng(seed).permutation(len(x))[:train + test]
    x, labels = np.asarray(x, np.float64)[order], np.asarray(labels)[order]
    x = x - x[:train].mean(axis=0)
    x = x / np.sqrt((x[:train] ** 2).mean())
    x = x.astype(np.float32)
    return Data(name, x[:train], labels[:train], x[train:], labels[train:], classes)


# --- kernel regression ---------------------------------------------------------------


def kernel_regression(k_train: np.ndarray, k_test_train: np.ndarray, y_train: np.ndarray,
                      classes: int, ridge: float = 1e-3) -> np.ndarray:
    """Predicted labels of kernel ridge regression on centred one-hot targets.

    Args:
      k_train: ``(n_train, n_train)`` kernel of the training examples.
      k_test_train: ``(n_test, n_train)`` kernel between test and training examples.
      y_train: ``(n_train,)`` integer labels.
      classes: number of classes.
      ridge: regulariser, relative to the mean diagonal of ``k_train``.

    Returns:
      ``(n_test,)`` integer labels: the argmax of ``k_test_train (k_train + r I)^-1 Y``.
    """
    k_train = np.asarray(k_train, np.float64)
    targets = np.eye(classes)[y_train] - 1.0 / classes
    reg = ridge * np.trace(k_train) / len(k_train)
    alpha = np.linalg.solve(k_train + reg * np.eye(len(k_train)), targets)
    return (np.asarray(k_test_train, np.float64) @ alpha).argmax(axis=1)


# --- the run -------------------------------------------------------------------------


class Row(NamedTuple):
    """One line of the convergence table (errors relative to the infinite-width kernel)."""

    n_samples: int
    nngp_error: float
    nngp_stderr: float
    ntk_error: float
    ntk_stderr: float
    seconds: float


class Result(NamedTuple):
    """What :func:`run` computed."""

    rows: list[Row]
    ntk: np.ndarray  # the last Monte Carlo NTK of all examples, training examples first
    exact_ntk: np.ndarray
    accuracy: float  # kernel regression with the Monte Carlo NTK
    exact_accuracy: float  # the same with the infinite-width NTK
    png: str | None


def relative(a: Any, b: np.ndarray) -> float:
    """``||a - b||_F / ||b||_F``."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def run(*, width: int = DEFAULTS["width"], depth: int = DEFAULTS["depth"],
        samples=DEFAULTS["samples"], data: str = "auto", train: int = DEFAULTS["train"],
        test: int = DEFAULTS["test"], seed: int = 0, out: str | None = "mcntk_demo.png",
        progress: bool | None = None) -> Result:
    """Runs the demo, printing as it goes; writes the picture to ``out`` (None: none)."""
    dataset = load_data(data, train, test, seed)
    x = np.concatenate([dataset.x_train, dataset.x_test])
    model = flax_relu_network(width, depth, dataset.classes)
    exact_nngp, exact_ntk = arccos_kernels(x.astype(np.float64), depth)
    counts = tuple(sorted(set(samples)))
    kernel_fn = mcntk.monte_carlo_kernel_fn(model, key=jax.random.PRNGKey(seed),
                                            n_samples=counts, vmap_axes=0, stderr=True,
                                            progress=progress)
    layers = "1 hidden layer" if depth == 1 else f"{depth} hidden layers"
    print(f"Monte Carlo NNGP and NTK of a Flax linen ReLU MLP ({layers} of width {width}, "
          f"NTK parameterisation, {dataset.classes} outputs)")
    print(f"data: {dataset.name}, {train} training + {test} test examples of "
          f"{x.shape[1]} features; kernels of all {len(x)} examples")
    print("error    = ||K_n - K_inf||_F / ||K_inf||_F: K_n the estimate from n samples, "
          "K_inf the infinite-width kernel")
    print("(stderr) = ||standard error of K_n||_F / ||K_inf||_F, from the spread of "
          "the n samples")
    if depth > 1:
        print(f"note: with {depth} hidden layers the finite network's expected kernel differs "
              f"from K_inf by O(1/width), so the error levels off near that distance")
    print(f"{'samples':>8} {'NNGP error':>11} {'(stderr)':>9} {'NTK error':>10} "
          f"{'(stderr)':>9} {'seconds':>8}  (seconds: since the start, compilation included)")
    rows, start = [], time.perf_counter()
    scale = np.linalg.norm(exact_nngp), np.linalg.norm(exact_ntk)
    for est in kernel_fn(x, None, ("nngp", "ntk")):
        nngp_se, ntk_se = (float(np.linalg.norm(np.nan_to_num(np.asarray(e.stderr)))) / s
                           for e, s in zip(est, scale))
        row = Row(est.ntk.n_samples, relative(est.nngp.mean, exact_nngp), nngp_se,
                  relative(est.ntk.mean, exact_ntk), ntk_se, time.perf_counter() - start)
        rows.append(row)
        print(f"{row.n_samples:>8} {row.nngp_error:>11.4f} {_se(row.nngp_stderr):>9} "
              f"{row.ntk_error:>10.4f} {_se(row.ntk_stderr):>9} {row.seconds:>8.1f}")
    ntk = np.asarray(est.ntk.mean, np.float64)

    def accuracy(k):
        predicted = kernel_regression(k[:train, :train], k[train:, :train], dataset.y_train,
                                      dataset.classes)
        return float((predicted == dataset.y_test).mean())

    acc, exact_acc = accuracy(ntk), accuracy(exact_ntk)
    n = rows[-1].n_samples
    print(f"kernel regression on the {test} test examples: accuracy {acc:.1%} with the "
          f"Monte Carlo NTK ({n} sample{'s' * (n != 1)}), {exact_acc:.1%} with K_inf "
          f"(chance: {1 / dataset.classes:.0%})")
    result = Result(rows, ntk, exact_ntk, acc, exact_acc, None)
    if out is not None:
        result = result._replace(png=save_picture(result, dataset, out))
        print(f"picture: {result.png}")
    return result


def _se(value: float) -> str:
    return "(n/a)" if value == 0.0 else f"({value:.4f})"


def save_picture(result: Result, dataset: Data, path: str) -> str:
    """Writes a PNG: the Monte Carlo NTK of the training examples sorted by class, its
    distance to the infinite-width NTK, and the convergence curve. Returns the path."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    n = len(dataset.x_train)
    order = np.argsort(dataset.y_train, kind="stable")
    k = result.ntk[:n, :n][np.ix_(order, order)]
    exact = result.exact_ntk[:n, :n][np.ix_(order, order)]
    fig = Figure(figsize=(13, 4), layout="constrained")
    ax_k, ax_d, ax_c = fig.subplots(1, 3, width_ratios=[1, 1, 1.15])
    image = ax_k.imshow(k, cmap="viridis", vmax=np.percentile(k, 99.5))  # the diagonal stands out
    fig.colorbar(image, ax=ax_k, shrink=0.8)
    ax_k.set_title(f"Monte Carlo NTK, {result.rows[-1].n_samples} samples\n"
                   f"training examples sorted by class")
    diff = (k - exact) / np.abs(exact).max()
    limit = np.abs(diff).max()
    image = ax_d.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=ax_d, shrink=0.8)
    ax_d.set_title("(K_n - K_inf) / max|K_inf|")
    for ax in (ax_k, ax_d):
        ax.set_xticks([])
        ax.set_yticks([])
    counts = np.array([r.n_samples for r in result.rows])
    for name, color in (("nngp", "tab:blue"), ("ntk", "tab:orange")):
        errors = np.array([getattr(r, f"{name}_error") for r in result.rows])
        ses = np.array([getattr(r, f"{name}_stderr") for r in result.rows])
        ax_c.loglog(counts, errors, "o-", color=color, label=f"{name.upper()} error")
        ok = ses > 0
        ax_c.loglog(counts[ok], ses[ok], "--", color=color, alpha=0.6,
                    label=f"{name.upper()} standard error")
        if name == "ntk":
            ax_c.loglog(counts, errors[0] / np.sqrt(counts / counts[0]), ":", color="gray",
                        label="1/sqrt(n)")
    ax_c.set_xlabel("n_samples")
    ax_c.set_ylabel("||K_n - K_inf||_F / ||K_inf||_F")
    ax_c.set_title(f"convergence; test accuracy {result.accuracy:.0%}")
    ax_c.legend(fontsize="small")
    path = os.path.abspath(path)
    fig.savefig(path, dpi=90)
    return path


# --- the command line ----------------------------------------------------------------


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


def _missing(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcntk demo", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    positive = _int_at_least(1)
    p.add_argument("--width", type=positive, default=DEFAULTS["width"],
                   help="width of each hidden layer")
    p.add_argument("--depth", type=positive, default=DEFAULTS["depth"],
                   help="number of hidden ReLU layers")
    p.add_argument("--samples", type=positive, nargs="+", default=list(DEFAULTS["samples"]),
                   help="sample counts at which the estimate is printed")
    p.add_argument("--data", choices=("auto", "digits", "spirals"), default="auto",
                   help="digits: scikit-learn's digit images; spirals: generated points; "
                        "auto: digits if scikit-learn is installed")
    p.add_argument("--train", type=positive, default=DEFAULTS["train"],
                   help="number of training examples for kernel regression")
    p.add_argument("--test", type=positive, default=DEFAULTS["test"],
                   help="number of test examples")
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="seed of the PRNG key and of the data split")
    p.add_argument("--out", default="mcntk_demo.png",
                   help="where to write the picture (PNG)")
    p.add_argument("--fast", action="store_true",
                   help="a reduced setting for CI (--width 128 --samples 1 4 16 --train 60 "
                        "--test 40); options given explicitly still win")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr; without either flag, a bar only when "
                        "stderr is a terminal (default: %(default)s)")
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.fast:
        given = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(FAST)))
        for name, value in FAST.items():
            if getattr(given, name) is None:
                setattr(args, name, list(value) if name == "samples" else value)
    missing = [m for m in ("flax", "matplotlib") if _missing(m)]
    if missing:
        print(f'mcntk demo: needs {" and ".join(missing)}: pip install "mcntk[demo]"',
              file=sys.stderr)
        raise SystemExit(1)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        p.error(f"argument --out: cannot write {args.out!r}: {folder!r} is not a writable "
                f"directory")
    try:  # before any sample: a data set too small is a usage error, like the others
        load_data(args.data, args.train, args.test, args.seed)
    except ValueError as e:
        p.error(f"argument --train/--test: {e}")
    run(width=args.width, depth=args.depth, samples=tuple(args.samples), data=args.data,
        train=args.train, test=args.test, seed=args.seed, out=args.out, progress=args.progress)
