"""Wide Flax and Haiku MLPs in NTK parameterisation converge to the analytic
infinite-width NNGP and NTK of a ReLU network (the arc-cosine kernels)."""

import math

import jax
import numpy as np
import pytest

import mcntk
from mcntk import adapters

N_IN, WIDTH, N_X = 4, 512, 8  # input size, hidden width, number of examples
SW, SB = 1.4, 0.2  # weight and bias scales
NNGP_OUT, NTK_OUT = 256, 1  # NNGP error shrinks with samples x outputs; NTK with width
N_SAMPLES = 128
TOLERANCE = 5e-2  # relative Frobenius error


def arccos_kernels(x):
    """NNGP and NTK of Dense(SW, SB)-ReLU-Dense(SW, SB) at infinite width.

    With ``K0 = SW^2 x.x'/N_IN + SB^2`` the first layer's kernel and ``theta`` the
    angle it defines, ``E[relu(u) relu(v)] = sqrt(K0(x,x) K0(x',x'))
    (sin theta + (pi - theta) cos theta) / (2 pi)`` and
    ``E[relu'(u) relu'(v)] = (pi - theta) / (2 pi)``; then
    ``NNGP = SW^2 E[relu relu] + SB^2`` and ``NTK = NNGP + SW^2 E[relu' relu'] K0``.
    """
    x = np.asarray(x, np.float64)
    k0 = SW**2 * x @ x.T / N_IN + SB**2
    norms = np.sqrt(np.diag(k0))
    cos = np.clip(k0 / np.outer(norms, norms), -1.0, 1.0)
    theta = np.arccos(cos)
    e_relu = np.outer(norms, norms) * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)
    e_step = (np.pi - theta) / (2 * np.pi)
    nngp = SW**2 * e_relu + SB**2
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


def relative_error(estimate, exact):
    return np.linalg.norm(np.asarray(estimate) - exact) / np.linalg.norm(exact)


@pytest.mark.parametrize("make", [linen_mlp, nnx_mlp, haiku_mlp], ids=["linen", "nnx", "haiku"])
def test_nngp_converges_to_arccos(make, x):
    model = make(NNGP_OUT)
    kernel_fn = mcntk.monte_carlo_kernel_fn(*model, jax.random.PRNGKey(0), N_SAMPLES,
                                            trace_axes=(-1,))
    assert relative_error(kernel_fn(x, None, "nngp"), arccos_kernels(x)[0]) < TOLERANCE


@pytest.mark.parametrize("make", [linen_mlp, nnx_mlp, haiku_mlp], ids=["linen", "nnx", "haiku"])
def test_ntk_converges_to_arccos(make, x):
    model = make(NTK_OUT)
    kernel_fn = mcntk.monte_carlo_kernel_fn(*model, jax.random.PRNGKey(1), N_SAMPLES,
                                            trace_axes=(-1,))
    assert relative_error(kernel_fn(x, None, "ntk"), arccos_kernels(x)[1]) < TOLERANCE


def test_the_tolerance_separates_kernels(x):
    """The bound has power: the NTK is not within it of the NNGP it contains."""
    nngp, ntk = arccos_kernels(x)
    assert relative_error(nngp, ntk) > 4 * TOLERANCE
