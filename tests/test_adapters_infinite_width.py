"""Wide Flax and Haiku MLPs in NTK parameterisation converge to the analytic
infinite-width NNGP and NTK of a ReLU network (the arc-cosine kernels).

With one hidden layer the finite network's expected kernels *are* the infinite-width
ones: the hidden pre-activations are exactly Gaussian with covariance ``K0``, and both
kernels average i.i.d. hidden units (and, for the NNGP, i.i.d. outputs). So the only
error is Monte Carlo error, and the bound is derived from it:

* the standard error of the estimate is measured from the estimator's own samples:
  ``GROUPS`` disjoint groups of ``N_SAMPLES / GROUPS`` samples (cumulative estimates of
  a generator, differenced), whose means vary around the kernel; the Frobenius norm of
  the standard error of the full mean is ``sqrt(sum_ij var_ij(group mean) / GROUPS)``;
* the bound is ``SAFETY`` standard errors. The Frobenius error of an unbiased estimate
  is about one standard error (``E|e|^2 = SE^2``); 4 is beyond what sampling gives
  (the error is a sum of near-Gaussian terms), and leaves room for the ~20% sampling
  error of a standard error measured from 16 groups;
* the bound has power: the kernels without the output layer's bias variance
  (``SB^2``, 2-4% of the kernels) lie more than the bound plus ``SAFETY`` standard errors
  away, so an estimator that lost it would fail. Measured (float32, 2048 samples): NNGP
  standard error ~0.35% of the kernel, NTK ~0.18%; without ``SB^2`` the kernels move
  4.3% and 2.4%, 11-14 standard errors. (128 samples, as before, gave 1.4% and 0.7%.
  Most of the NNGP's error comes from the hidden layer, which more outputs do not
  average away: 1024 outputs instead of 256 only take it from ~17% to ~11% per sample.)
"""

import math

import jax
import numpy as np
import pytest

import mcntk
from mcntk import adapters

N_IN, WIDTH, N_X = 4, 512, 8  # input size, hidden width, number of examples
SW, SB = 1.4, 0.2  # weight and bias scales
NNGP_OUT, NTK_OUT = 256, 1  # the NNGP averages its outputs; the NTK's do not matter
N_SAMPLES, GROUPS = 2048, 16
SAFETY = 4.0  # the bound in standard errors


def arccos_kernels(x, output_bias=True):
    """NNGP and NTK of Dense(SW, SB)-ReLU-Dense(SW, SB) at infinite width.

    With ``K0 = SW^2 x.x'/N_IN + SB^2`` the first layer's kernel and ``theta`` the
    angle it defines, ``E[relu(u) relu(v)] = sqrt(K0(x,x) K0(x',x'))
    (sin theta + (pi - theta) cos theta) / (2 pi)`` and
    ``E[relu'(u) relu'(v)] = (pi - theta) / (2 pi)``; then
    ``NNGP = SW^2 E[relu relu] + SB^2`` and ``NTK = NNGP + SW^2 E[relu' relu'] K0``.
    ``output_bias=False`` drops the output layer's ``SB^2``: a deliberately wrong kernel.
    """
    x = np.asarray(x, np.float64)
    k0 = SW**2 * x @ x.T / N_IN + SB**2
    norms = np.sqrt(np.diag(k0))
    cos = np.clip(k0 / np.outer(norms, norms), -1.0, 1.0)
    theta = np.arccos(cos)
    e_relu = np.outer(norms, norms) * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)
    e_step = (np.pi - theta) / (2 * np.pi)
    nngp = SW**2 * e_relu + (SB**2 if output_bias else 0.0)
    return nngp, nngp + SW**2 * e_step * k0


def linen_mlp(out):
    nn = pytest.importorskip("flax.linen")

    class NtkDense(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            n_in = x.shape[-1]
            w = self.param("kernel", nn.initializers.normal(1.0), (n_in, self.features))
            b = self.param("bias", nn.initializers.normal(1.0), (self.features,))
            return SW / math.sqrt(n_in) * (x @ w) + SB * b[None]

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return NtkDense(out)(nn.relu(NtkDense(WIDTH)(x)))

    return adapters.as_model(Mlp())


def nnx_mlp(out):
    nnx = pytest.importorskip("flax.nnx")

    class NtkLinear(nnx.Module):
        def __init__(self, n_in, features, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (n_in, features)))
            self.b = nnx.Param(jax.random.normal(rngs.params(), (features,)))

        def __call__(self, x):
            return SW / math.sqrt(self.w.shape[0]) * (x @ self.w[...]) + SB * self.b[...][None]

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.hidden = NtkLinear(N_IN, WIDTH, rngs)
            self.out = NtkLinear(WIDTH, out, rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.hidden(x)))

    return adapters.nnx_model(Mlp)


def haiku_mlp(out):
    hk = pytest.importorskip("haiku")

    class NtkLinear(hk.Module):
        def __init__(self, features, name=None):
            super().__init__(name=name)
            self.features = features

        def __call__(self, x):
            n_in = x.shape[-1]
            init = hk.initializers.RandomNormal(1.0)
            w = hk.get_parameter("w", (n_in, self.features), init=init)
            b = hk.get_parameter("b", (self.features,), init=init)
            return SW / math.sqrt(n_in) * (x @ w) + SB * b[None]

    def mlp(x):
        return NtkLinear(out)(jax.nn.relu(NtkLinear(WIDTH)(x)))

    return adapters.as_model(hk.transform(mlp))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(3), (N_X, N_IN))


def estimate_and_standard_error(model, key, x, name):
    """The estimate from ``N_SAMPLES`` samples and the Frobenius norm of its standard
    error, from the means of ``GROUPS`` disjoint groups of the same samples."""
    size = N_SAMPLES // GROUPS
    counts = [size * (g + 1) for g in range(GROUPS)]
    kernel_fn = mcntk.monte_carlo_kernel_fn(*model, key, counts, trace_axes=(-1,))
    sums = [n * np.asarray(k, np.float64) for n, k in zip(counts, kernel_fn(x, None, name))]
    group_means = np.diff(np.stack([np.zeros_like(sums[0])] + sums), axis=0) / size
    variance_of_mean = group_means.var(axis=0, ddof=1) / GROUPS
    return sums[-1] / N_SAMPLES, float(np.sqrt(variance_of_mean.sum()))


def check_converged(estimate, standard_error, exact, wrong):
    bound = SAFETY * standard_error
    error = np.linalg.norm(estimate - exact)
    assert error < bound, (error / np.linalg.norm(exact), bound / np.linalg.norm(exact))
    # the test has power: the wrong kernel is SAFETY standard errors beyond the bound
    assert np.linalg.norm(wrong - exact) > bound + SAFETY * standard_error
    assert np.linalg.norm(estimate - wrong) > bound


MAKERS = pytest.mark.parametrize("make", [linen_mlp, nnx_mlp, haiku_mlp],
                                 ids=["linen", "nnx", "haiku"])


@MAKERS
def test_nngp_converges_to_arccos(make, x):
    estimate, se = estimate_and_standard_error(make(NNGP_OUT), jax.random.PRNGKey(0), x, "nngp")
    check_converged(estimate, se, arccos_kernels(x)[0], arccos_kernels(x, False)[0])


@MAKERS
def test_ntk_converges_to_arccos(make, x):
    estimate, se = estimate_and_standard_error(make(NTK_OUT), jax.random.PRNGKey(1), x, "ntk")
    check_converged(estimate, se, arccos_kernels(x)[1], arccos_kernels(x, False)[1])


def test_standard_error_of_a_known_distribution():
    """The standard-error helper on a model whose kernel's spread is known: f(x) = a x
    with a ~ N(0, 1) per sample gives NNGP samples a^2 x x^T (variance 2 (x x^T)^2)."""
    model = adapters.Model(lambda key, shape: (shape, jax.random.normal(key, ())),
                           lambda a, x: a * x)
    x = jax.numpy.arange(1.0, 4.0)[:, None]
    estimate, se = estimate_and_standard_error(model, jax.random.PRNGKey(2), x, "nngp")
    outer = np.asarray(x @ x.T, np.float64)
    expected_se = np.sqrt(2 * (outer**2).sum() / N_SAMPLES)
    assert 0.5 * expected_se < se < 1.5 * expected_se, (se, expected_se)
    assert np.linalg.norm(estimate - outer) < SAFETY * expected_se
