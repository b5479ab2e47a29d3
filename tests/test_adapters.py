"""Dispatch of ``mcntk.adapters.as_model``: built-in kinds, registration, entry points,
lazy framework imports and the errors that explain what is accepted."""

import doctest
import importlib
import importlib.metadata
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax
from mcntk_reference import monte_carlo, stax_serial

import mcntk
from mcntk import adapters

X = jnp.arange(12.0).reshape(4, 3) / 10


@pytest.fixture
def clean_registry(monkeypatch):
    """An empty registry and no installed entry points, restored afterwards."""
    monkeypatch.setattr(adapters._registry, "_registered", {})
    monkeypatch.setattr(adapters._registry, "_entry_points_loaded", False)
    monkeypatch.setattr(adapters._registry, "find_entry_points", lambda: [])


class Toy:
    """A third party's model: a random linear map to ``width`` outputs."""

    def __init__(self, width):
        self.width = width


class ToyAdapter:
    description = "Toy models of the tests"

    def matches(self, obj):
        return isinstance(obj, Toy)

    def to_model(self, toy, *, scale=1.0):
        def init(key, input_shape):
            w = jax.random.normal(key, (input_shape[-1], toy.width))
            return input_shape[:-1] + (toy.width,), {"w": w}

        def apply(params, x, rng=None, **kwargs):
            return scale * x @ params["w"]

        return adapters.Model(init, apply)


class FakeEntryPoint:
    """Quacks like importlib.metadata.EntryPoint."""

    def __init__(self, name, load):
        self.name, self.value, self.group = name, f"fake_pkg:{name}", adapters.ENTRY_POINT_GROUP
        self._load, self.loads = load, 0

    def load(self):
        self.loads += 1
        return self._load()


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


# --- imports ------------------------------------------------------------------------


def test_importing_mcntk_imports_no_framework(tmp_path):
    code = """
import sys
import mcntk, mcntk.adapters
from jax.example_libraries import stax
from mcntk.adapters import as_model, UnsupportedModelError
as_model(stax.serial(stax.Dense(2)))
try:
    as_model(object())
except UnsupportedModelError:
    pass
frameworks = [m for m in sys.modules if m.split('.')[0] in ('flax', 'haiku', 'equinox')]
assert not frameworks, frameworks
"""
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr


def test_top_level_adapters_is_not_importable(tmp_path):
    result = run_python("import adapters", tmp_path)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr
    result = run_python("import mcntk.adapters; print(mcntk.adapters.as_model.__name__)",
                        tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "as_model", result.stderr


@pytest.mark.parametrize("blocked, extra, make", [
    ("haiku", "haiku", lambda: adapters.as_model(object(), framework="haiku")),
    ("flax.linen", "flax", lambda: adapters.as_model(object(), framework="linen")),
    ("flax.nnx", "flax", lambda: adapters.nnx_model(lambda rngs: None)),
    ("equinox", "equinox", lambda: adapters.equinox_model(lambda key: None)),
], ids=["haiku", "linen", "nnx", "equinox"])
def test_missing_framework_names_the_extra(monkeypatch, blocked, extra, make):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now fails
    with pytest.raises(ImportError, match=rf'pip install "mcntk\[{extra}\]"') as info:
        make()
    assert isinstance(info.value, adapters.MissingFrameworkError)
    with pytest.raises(adapters.UnsupportedModelError):  # dispatch still works without it
        adapters.as_model(object())


# --- built-in dispatch --------------------------------------------------------------


def test_model_is_returned_unchanged():
    model = adapters.Model(*stax.serial(stax.Relu))
    assert adapters.as_model(model) is model
    with pytest.raises(TypeError, match="unchanged"):
        adapters.as_model(model, input_dtype=jnp.int32)


def test_stax_pairs_and_triples():
    init_fn, apply_fn = stax_serial(stax.Dense(5), stax.Relu)
    kernel_fn = lambda *args, **kwargs: None  # neural-tangents' third element
    for obj in [(init_fn, apply_fn), (init_fn, apply_fn, kernel_fn)]:
        model = adapters.as_model(obj)
        assert model == adapters.Model(init_fn, apply_fn)
    assert isinstance(adapters.as_model((init_fn, apply_fn), framework="stax"), adapters.Model)
    with pytest.raises(TypeError, match="stax model must be a tuple"):
        adapters.as_model([init_fn, apply_fn], framework="stax")


def reference_ntk(init_fn, apply_fn, key):
    """The NTK of ``mcntk_reference`` (explicit Jacobians, neural-tangents' key schedule)
    for ``init_fn(key, shape) -> (_, params)`` and ``apply_fn(params, x)``, written with
    the framework's own calls: the oracle of every kernel value in this file."""
    return monte_carlo(init_fn, apply_fn, key, 2, X, rng=False)["ntk"]


def assert_ntk_close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_jitted_functions_are_accepted():
    init_fn, apply_fn = stax_serial(stax.Dense(8), stax.Relu, stax.Dense(1))
    key = jax.random.PRNGKey(0)
    expected = reference_ntk(init_fn, apply_fn, key)
    plain = mcntk.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2)(X, None, "ntk")
    jitted = mcntk.monte_carlo_kernel_fn(adapters.as_model((init_fn, jax.jit(apply_fn))), key=key,
                                         n_samples=2)(X, None, "ntk")
    assert_ntk_close(plain, expected)
    assert_ntk_close(jitted, expected)


def test_haiku_jitted_apply_is_accepted():
    hk = pytest.importorskip("haiku")
    f = hk.transform(lambda x: hk.nets.MLP([8, 1])(x))
    key = jax.random.PRNGKey(0)
    expected = reference_ntk(lambda k, shape: (None, f.init(k, jnp.zeros(shape))),
                             lambda params, x: f.apply(params, None, x), key)
    plain = mcntk.monte_carlo_kernel_fn(f, key=key, n_samples=2)(X, None, "ntk")
    assert_ntk_close(plain, expected)
    for g in [hk.Transformed(f.init, jax.jit(f.apply)), hk.without_apply_rng(f)]:
        got = mcntk.monte_carlo_kernel_fn(g, key=key, n_samples=2)(X, None, "ntk")
        assert_ntk_close(got, expected)


def framework_objects():
    """``(name, make)``: ``make()`` gives a small model of each kind that as_model
    dispatches alone, and its ``(init_fn, apply_fn)`` for the reference, written with
    the framework's own calls (not with the adapters)."""
    def linen():
        nn = pytest.importorskip("flax.linen")
        module = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
        return module, (lambda k, shape: (None, module.init({"params": k}, jnp.zeros(shape))),
                        module.apply)

    def nnx_class():
        nnx = pytest.importorskip("flax.nnx")

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.lin = nnx.Linear(3, 1, rngs=rngs)

            def __call__(self, x):
                return self.lin(x)

        graphdef, _, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
        init = lambda k, shape: (None, nnx.split(Net(nnx.Rngs(k)), nnx.Param, ...)[1])
        return Net, (init, lambda params, x: nnx.merge(graphdef, params, rest)(x))

    def haiku():
        hk = pytest.importorskip("haiku")
        f = hk.transform(lambda x: hk.nets.MLP([8, 1])(x))
        return f, (lambda k, shape: (None, f.init(k, jnp.zeros(shape))),
                   lambda params, x: f.apply(params, None, x))

    def stax_triple():
        init_fn, apply_fn = stax_serial(stax.Dense(8), stax.Relu, stax.Dense(1))
        return (init_fn, apply_fn, lambda *args, **kwargs: None), (init_fn, apply_fn)

    return [("linen", linen), ("nnx_class", nnx_class), ("haiku", haiku),
            ("stax_triple", stax_triple)]


@pytest.mark.parametrize("make", [m for _, m in framework_objects()],
                         ids=[n for n, _ in framework_objects()])
def test_estimator_takes_framework_objects(make):
    """monte_carlo_kernel_fn(obj, key=..., n_samples=...) dispatches through as_model."""
    key = jax.random.PRNGKey(0)
    obj, native = make()
    expected = reference_ntk(*native, key)
    direct = mcntk.monte_carlo_kernel_fn(obj, key=key, n_samples=2)(X, None, "ntk")
    unpacked = mcntk.monte_carlo_kernel_fn(*adapters.as_model(obj), key, 2)(X, None, "ntk")
    assert direct.shape == (4, 4)
    assert_ntk_close(direct, expected)
    assert_ntk_close(unpacked, expected)


def test_estimator_positional_model_and_bound_linen_methods():
    """(model, key, n) positionally, and (module.init, module.apply, key, n) of a linen
    module, are both the module itself."""
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))

    module = Net()
    key = jax.random.PRNGKey(0)
    expected = reference_ntk(lambda k, shape: (None, module.init({"params": k},
                                                                 jnp.zeros(shape))),
                             module.apply, key)
    keyword = mcntk.monte_carlo_kernel_fn(module, key=key, n_samples=2)(X, None, "ntk")
    positional = mcntk.monte_carlo_kernel_fn(module, key, 2)(X, None, "ntk")
    bound = mcntk.monte_carlo_kernel_fn(module.init, module.apply, key, 2)(X, None, "ntk")
    for got in (keyword, positional, bound):
        assert_ntk_close(got, expected)


@pytest.mark.parametrize("obj", [42, "model", lambda x: x, (1, 2), (len,), None],
                         ids=["int", "str", "function", "tuple", "1-tuple", "None"])
def test_unsupported_objects_list_the_supported_kinds(obj):
    with pytest.raises(TypeError) as info:
        adapters.as_model(obj)
    assert isinstance(info.value, adapters.UnsupportedModelError)
    message = str(info.value)
    for kind in ["Model(init, apply)", "stax", "flax.linen", "flax.nnx", "haiku", "Equinox",
                 "register(adapter", adapters.ENTRY_POINT_GROUP]:
        assert kind in message


def test_unknown_framework_name():
    with pytest.raises(ValueError, match="`framework` must name an adapter.*'equinox'"):
        adapters.as_model(object(), framework="tensorflow")


def test_instances_and_multi_transforms_are_rejected_with_advice():
    nnx = pytest.importorskip("flax.nnx")
    eqx = pytest.importorskip("equinox")
    hk = pytest.importorskip("haiku")
    with pytest.raises(TypeError, match=r"factory.*nnx_model\(lambda rngs"):
        adapters.as_model(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"factory.*equinox_model\(lambda key"):
        adapters.as_model(eqx.nn.Linear(2, 3, key=jax.random.PRNGKey(0)))

    def multi():
        lin = hk.Linear(2)
        return lin, (lin,)

    with pytest.raises(TypeError, match="multi_transform"):
        adapters.as_model(hk.multi_transform(multi))


def test_factories_need_a_marker_or_a_class():
    nnx = pytest.importorskip("flax.nnx")
    factory = lambda rngs: nnx.Linear(3, 2, rngs=rngs)
    with pytest.raises(adapters.UnsupportedModelError):
        adapters.as_model(factory)
    shape = adapters.as_model(factory, framework="nnx").init(jax.random.PRNGKey(0), X.shape)[0]
    assert shape == (4, 2)

    class Net(nnx.Module):
        def __init__(self, *, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    assert adapters.as_model(Net).init(jax.random.PRNGKey(0), X.shape)[0] == (4, 2)

    class NeedsSizes(nnx.Module):
        def __init__(self, din, *, rngs):
            self.lin = nnx.Linear(din, 2, rngs=rngs)

    with pytest.raises(TypeError, match=r"NeedsSizes\(rngs=rngs\).*nnx_model\(lambda rngs"):
        adapters.as_model(NeedsSizes)
    with pytest.raises(TypeError, match="must return an nnx.Module"):
        adapters.nnx_model(lambda rngs: 3)


# --- registration and entry points ----------------------------------------------------


def test_registered_adapter_is_dispatched(clean_registry):
    with pytest.raises(adapters.UnsupportedModelError):
        adapters.as_model(Toy(3))
    adapter = adapters.register(ToyAdapter(), name="toy")
    assert adapters.registered()["toy"] is adapter
    model = adapters.as_model(Toy(3))
    output_shape, params = model.init(jax.random.PRNGKey(0), X.shape)
    assert output_shape == model.apply(params, X).shape == (4, 3)
    scaled = adapters.as_model(Toy(3), scale=2.0, framework="toy")
    np.testing.assert_allclose(scaled.apply(params, X), 2 * model.apply(params, X))
    ntk = mcntk.monte_carlo_kernel_fn(Toy(3), key=jax.random.PRNGKey(0), n_samples=2)(X)
    assert_ntk_close(ntk.ntk, reference_ntk(*ToyAdapter().to_model(Toy(3)),
                                            jax.random.PRNGKey(0)))
    with pytest.raises(adapters.UnsupportedModelError, match="Toy models of the tests"):
        adapters.as_model(7)
    assert adapters.unregister("toy") is adapter
    with pytest.raises(adapters.UnsupportedModelError):
        adapters.as_model(Toy(3))


def test_register_checks_its_arguments(clean_registry):
    with pytest.raises(ValueError, match="built-in"):
        adapters.register(ToyAdapter(), name="haiku")
    with pytest.raises(TypeError, match="matches"):
        adapters.register(object(), name="toy")
    with pytest.raises(TypeError, match="matches"):
        adapters.register(ToyAdapter, name="toy")  # the class, not an adapter
    with pytest.raises(TypeError, match="`name`"):
        adapters.register(ToyAdapter(), name="")
    first = adapters.register(ToyAdapter(), name="toy")
    with pytest.raises(ValueError, match="already registered"):
        adapters.register(ToyAdapter(), name="toy")
    second = adapters.register(ToyAdapter(), name="toy", replace=True)
    assert second is not first and adapters.registered()["toy"] is second
    with pytest.raises(KeyError, match="no adapter"):
        adapters.unregister("nope")


def test_adapter_must_return_a_model(clean_registry):
    class Bad(ToyAdapter):
        def to_model(self, toy):
            return "not a model"

    adapters.register(Bad(), name="bad")
    with pytest.raises(TypeError, match="must return mcntk.adapters.Model"):
        adapters.as_model(Toy(2))


def test_entry_points_load_lazily_once(clean_registry, monkeypatch):
    ep = FakeEntryPoint("toy_plugin", lambda: ToyAdapter)  # a class: instantiated
    monkeypatch.setattr(adapters._registry, "find_entry_points", lambda: [ep])
    adapters.as_model(adapters.Model(*stax.serial(stax.Relu)))
    adapters.as_model(stax.serial(stax.Relu))  # built-ins match: nothing is loaded
    assert ep.loads == 0
    model = adapters.as_model(Toy(2))
    assert ep.loads == 1 and isinstance(adapters.registered()["toy_plugin"], ToyAdapter)
    assert model.init(jax.random.PRNGKey(0), X.shape)[0] == (4, 2)
    with pytest.raises(adapters.UnsupportedModelError):
        adapters.as_model(object())
    assert ep.loads == 1 and adapters.load_entry_points() == []


def test_entry_point_selected_by_name(clean_registry, monkeypatch):
    ep = FakeEntryPoint("toy_plugin", ToyAdapter)  # an adapter object
    monkeypatch.setattr(adapters._registry, "find_entry_points", lambda: [ep])
    assert isinstance(adapters.as_model(Toy(2), framework="toy_plugin"), adapters.Model)


def test_broken_entry_point_is_skipped_with_a_warning(clean_registry, monkeypatch):
    def fail():
        raise ImportError("plugin dependency missing")

    good = FakeEntryPoint("toy_plugin", ToyAdapter)
    monkeypatch.setattr(adapters._registry, "find_entry_points",
                        lambda: [FakeEntryPoint("broken", fail), good])
    with pytest.warns(UserWarning, match="broken.*plugin dependency missing"):
        model = adapters.as_model(Toy(2))
    assert isinstance(model, adapters.Model) and "broken" not in adapters.registered()


def test_real_entry_point_objects(clean_registry, monkeypatch):
    ep = importlib.metadata.EntryPoint(name="stax_again", value="mcntk.adapters:StaxAdapter",
                                       group=adapters.ENTRY_POINT_GROUP)
    monkeypatch.setattr(adapters._registry, "find_entry_points", lambda: [ep])
    assert adapters.load_entry_points() == ["stax_again"]
    assert isinstance(adapters.registered()["stax_again"], adapters.StaxAdapter)


def test_entry_points_are_looked_up_by_group(monkeypatch):
    groups = []
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kwargs: groups.append(kwargs) or [])
    assert adapters._registry.find_entry_points() == []
    assert groups == [{"group": "mcntk.adapters"}]


# --- documentation ------------------------------------------------------------------


@pytest.mark.parametrize("module, needs", [
    ("_base", None), ("_stax", None), ("_registry", None), ("_linen", "flax.linen"),
    ("_nnx", "flax.nnx"), ("_haiku", "haiku"), ("_equinox", "equinox"),
])
def test_docstring_examples_run(module, needs):
    if needs:
        pytest.importorskip(needs)
    mod = importlib.import_module(f"mcntk.adapters.{module}")
    with jax.numpy_rank_promotion("allow"):  # the examples use jax.example_libraries.stax
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_public_names_are_documented():
    import mcntk.adapters as adapters

    for name in adapters.__all__:
        obj = getattr(adapters, name)
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name
