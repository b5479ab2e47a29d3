"""mcntk: Monte Carlo NNGP and NTK kernels of finite neural networks."""

from importlib.metadata import PackageNotFoundError, version

from mcntk import adapters as adapters  # noqa: I001 - after the names it imports
from mcntk import errors as errors
from mcntk._types import EmpiricalKernel as EmpiricalKernel
from mcntk._types import Estimate as Estimate
from mcntk._types import NtkImplementation as NtkImplementation
from mcntk.empirical import empirical_kernel_fn as empirical_kernel_fn
from mcntk.empirical import empirical_nngp_fn as empirical_nngp_fn
from mcntk.empirical import empirical_ntk_fn as empirical_ntk_fn
from mcntk.monte_carlo import monte_carlo_kernel_fn as monte_carlo_kernel_fn

try:
    __version__ = version("mcntk")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "EmpiricalKernel",
    "Estimate",
    "NtkImplementation",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "errors",
    "monte_carlo_kernel_fn",
]
