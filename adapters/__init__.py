"""Models of stax, Flax (linen and NNX), Haiku and Equinox as pairs of pure functions.

``as_model(obj)`` turns a framework's model into ``Model(init, apply)`` with stax's
conventions, so the estimator never knows which framework it serves::

    kernel_fn = mcntk.monte_carlo_kernel_fn(*as_model(module), key, n_samples)

Frameworks are imported only when an adapter for them is used; ``import
mcntk.adapters`` imports none. Third parties add adapters with :func:`register` or
the entry-point group ``mcntk.adapters``.
"""

from mcntk.errors import MissingFrameworkError as MissingFrameworkError
from mcntk.errors import StateMutationError as StateMutationError
from mcntk.errors import UnsupportedModelError as UnsupportedModelError

from ._base import Model as Model
from ._base import ModelAdapter as ModelAdapter
from ._equinox import EquinoxAdapter as EquinoxAdapter
from ._equinox import equinox_model as equinox_model
from ._haiku import HaikuAdapter as HaikuAdapter
from ._linen import LinenAdapter as LinenAdapter
from ._nnx import NnxAdapter as NnxAdapter
from ._nnx import nnx_model as nnx_model
from ._registry import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP
from ._registry import as_model as as_model
from ._registry import load_entry_points as load_entry_points
from ._registry import register as register
from ._registry import registered as registered
from ._registry import unregister as unregister
from ._stax import StaxAdapter as StaxAdapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "EquinoxAdapter",
    "HaikuAdapter",
    "LinenAdapter",
    "MissingFrameworkError",
    "Model",
    "ModelAdapter",
    "NnxAdapter",
    "StateMutationError",
    "StaxAdapter",
    "UnsupportedModelError",
    "as_model",
    "equinox_model",
    "load_entry_points",
    "nnx_model",
    "register",
    "registered",
    "unregister",
]
