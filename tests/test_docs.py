"""The documentation: every public name is in the API reference, every docstring example
runs, and every page and notebook is part of the site (the site itself is built, with its
notebooks executed, by ``sphinx-build -W`` in .ci/docs)."""

import doctest
import importlib
import inspect
import re
from pathlib import Path

import jax
import pytest

import mcntk
import mcntk.adapters

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGES = sorted(DOCS.glob("api*.md")) + sorted(DOCS.glob("api*.rst"))
DIRECTIVE = re.compile(r"^\.\. auto(?:function|class|exception|data|module|attribute)::\s+(\S+)",
                       re.MULTILINE)
PACKAGES = [mcntk, mcntk.adapters]


def documented() -> set[str]:
    """Full names given to autodoc directives in the API reference."""
    assert API_PAGES, "docs/api.md is missing"
    return {name for page in API_PAGES for name in DIRECTIVE.findall(page.read_text())}


def public_objects():
    for package in PACKAGES:
        for name in package.__all__:
            yield package.__name__, name, getattr(package, name)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_public_name_is_in_the_api_reference(package):
    names = documented()
    missing = [n for n in package.__all__ if f"{package.__name__}.{n}" not in names]
    assert not missing, f"add to docs/api.md: {missing}"


def test_the_api_reference_documents_only_what_exists():
    for full_name in documented():
        module_name, _, attribute = full_name.rpartition(".")
        if full_name in {p.__name__ for p in PACKAGES} or full_name == "mcntk.errors":
            importlib.import_module(full_name)
            continue
        module = importlib.import_module(module_name)
        assert hasattr(module, attribute), full_name
        if module in PACKAGES:
            assert attribute in module.__all__, f"{full_name} is documented but not public"


def docstring_modules() -> list[str]:
    """The modules that define the public names (their docstrings are the reference)."""
    modules = {p.__name__ for p in PACKAGES}
    for _, _, obj in public_objects():
        modules.add(obj.__name__ if inspect.ismodule(obj) else
                    getattr(obj, "__module__", None) or "mcntk")
    return sorted(modules)


def test_the_public_docstrings_have_examples():
    """At least the entry points show how they are called."""
    for obj in (mcntk.monte_carlo_kernel_fn, mcntk.empirical_kernel_fn,
                mcntk.adapters.as_model):
        assert ">>>" in obj.__doc__, obj.__name__


@pytest.mark.parametrize("module_name", docstring_modules())
def test_docstring_examples_run(module_name):
    """Every example in the docstrings of the modules defining public names runs and
    prints what it says (modules without examples pass trivially)."""
    module = importlib.import_module(module_name)
    with jax.numpy_rank_promotion("allow"):  # examples use jax.example_libraries.stax
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


def test_docstring_modules_cover_the_examples():
    """The doctests above reach every public object that has an example."""
    modules = set(docstring_modules())
    for _, name, obj in public_objects():
        if ">>>" in (inspect.getdoc(obj) or ""):
            assert (obj.__name__ if inspect.ismodule(obj) else obj.__module__) in modules, name


def toctree_entries() -> set[str]:
    text = (DOCS / "index.md").read_text()
    blocks = re.findall(r"```\{toctree\}\n(.*?)```", text, re.DOTALL)
    return {line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.strip().startswith(":")}


def test_every_page_and_notebook_is_in_the_site():
    entries = toctree_entries()
    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    notebooks = {f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("[0-9]*.py")}
    assert len(notebooks) >= 7
    assert pages | notebooks <= entries, sorted((pages | notebooks) - entries)
    assert (DOCS / "notebooks").resolve() == (ROOT / "notebooks").resolve()


def test_benchmark_results_are_in_the_site():
    text = (DOCS / "benchmarks.md").read_text()
    assert "../benchmarks/RESULTS.md" in text and (ROOT / "benchmarks" / "RESULTS.md").is_file()


README = ROOT / "README.md"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    demo = text.index("mcntk demo")
    tests = text.index('python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && '
                       ".venv/bin/pytest -n 2")
    assert demo < tests < text.index("## ")  # both before the first section


@pytest.mark.slow
def test_readme_examples_run():
    """The README's examples (one per framework) run, in order, as a reader would paste
    them, and produce the shapes their comments state."""
    for framework in ("flax.linen", "flax.nnx", "haiku", "equinox"):
        pytest.importorskip(framework)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert len(blocks) >= 7
    namespace = {}
    with jax.numpy_rank_promotion("allow"):  # stax's Dense adds a (n,) bias to (N, n)
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
            if "ntk" in namespace:
                assert namespace["ntk"].shape in {(20, 20), (20, 30)}, i
    assert namespace["k"].nngp.shape == namespace["k"].ntk.shape == (20, 30)
    est = namespace["est"]
    assert float(est.stderr.max() / abs(est.mean).max()) <= 0.02
