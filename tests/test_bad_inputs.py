"""The catalogue of bad inputs: each raises an error naming the argument and the value.

The same catalogue generates the table in docs/errors.md:
``python tests/test_bad_inputs.py`` rewrites it, and a test fails while it is stale.
"""

import os
import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import pytest

import mcntk
from mcntk import demo

INIT, APPLY = demo.relu_network(4, 1, 2)
KEY = jax.random.PRNGKey(0)
X = jnp.ones((3, 2))
DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "errors.md")
START, END = "<!-- catalogue: start -->", "<!-- catalogue: end -->"


def build(**kwargs):
    kwargs.setdefault("n_samples", 1)
    key = kwargs.pop("key", KEY)
    init_fn = kwargs.pop("init_fn", INIT)
    return mcntk.monte_carlo_kernel_fn(init_fn, APPLY, key, **kwargs)


def call(x1=X, x2=None, get="ntk", options=None, **kwargs):
    return build(**(options or {}))(x1, x2, get, **kwargs)


class Case(NamedTuple):
    """A bad input: the argument, the value as the docs show it, how to pass it, the
    error, and a pattern of the value as the message shows it."""

    argument: str
    value: str
    run: Callable[[], Any]
    error: type
    shown: str

    @property
    def id(self) -> str:
        return f"{self.argument}={self.value}"


CASES = [
    # keys
    Case("key", "None", lambda: build(key=None), TypeError, r"got None"),
    Case("key", "0", lambda: build(key=0), TypeError, r"got 0\b"),
    Case("key", "'key'", lambda: build(key="key"), TypeError, r"got 'key'"),
    Case("key", "jnp.zeros(3, jnp.uint32)", lambda: build(key=jnp.zeros(3, jnp.uint32)),
         ValueError, r"got uint32\[3\]"),
    Case("key", "jnp.zeros(2, jnp.float32)", lambda: build(key=jnp.zeros(2, jnp.float32)),
         ValueError,
         r"got float32\[2\]"),
    Case("key", "jax.random.split(jax.random.key(0), 2)",
         lambda: build(key=jax.random.split(jax.random.key(0), 2)), ValueError,
         r"shape \(2,\)"),
    # n_samples
    Case("n_samples", "0", lambda: build(n_samples=0), ValueError, r"got 0"),
    Case("n_samples", "-3", lambda: build(n_samples=-3), ValueError, r"got -3"),
    Case("n_samples", "2.5", lambda: build(n_samples=2.5), TypeError, r"got 2\.5"),
    Case("n_samples", "True", lambda: build(n_samples=True), TypeError, r"got True"),
    Case("n_samples", "'10'", lambda: build(n_samples="10"), TypeError, r"got '10'"),
    Case("n_samples", "[]", lambda: build(n_samples=[]), ValueError, r"got \[\]"),
    Case("n_samples", "[4, 0]", lambda: build(n_samples=[4, 0]), ValueError, r"got 0"),
    # the model
    Case("init_fn", "3", lambda: build(init_fn=3), TypeError, r"got 3"),
    # grid and devices
    Case("batch_size", "-1", lambda: build(batch_size=-1), ValueError, r"got -1"),
    Case("batch_size", "1.5", lambda: build(batch_size=1.5), TypeError, r"got 1\.5"),
    Case("device_count", "-2", lambda: build(device_count=-2), ValueError, r"got -2"),
    Case("device_count", "'all'", lambda: build(device_count="all"), TypeError, r"got 'all'"),
    Case("store_on_device", "'yes'", lambda: build(store_on_device="yes"), TypeError,
         r"got 'yes'"),
    Case("mesh", "'m'", lambda: build(mesh="m"), TypeError, r"got 'm'"),
    Case("sample_axes", "'s' (no mesh)", lambda: build(sample_axes="s"), ValueError, r"='s'"),
    # axes
    Case("trace_axes", "'x'", lambda: build(trace_axes="x"), TypeError, r"got 'x'"),
    Case("trace_axes", "(1, 1)", lambda: build(trace_axes=(1, 1)), ValueError,
         r"\(1, 1\)"),
    Case("trace_axes", "(5,)", lambda: call(options=dict(trace_axes=(5,))), ValueError,
         r"=\(5,\) has axis 5, out of range"),
    Case("trace_axes", "(0, -2)", lambda: call(options=dict(trace_axes=(0, -2))), ValueError,
         r"=\(0, -2\)"),
    Case("diagonal_axes", "(0.5,)", lambda: build(diagonal_axes=(0.5,)), TypeError,
         r"got \(0\.5,\)"),
    Case("diagonal_axes", "(-3,)", lambda: call(options=dict(diagonal_axes=(-3,))),
         ValueError, r"=\(-3,\) has axis -3, out of range"),
    Case("diagonal_axes", "(-1,) with trace_axes=(-1,)",
         lambda: build(trace_axes=(-1,), diagonal_axes=(-1,)), ValueError,
         r"`diagonal_axes`=\(-1,\)"),
    # vmap_axes
    Case("vmap_axes", "'0'", lambda: build(vmap_axes="0"), TypeError, r"got '0'"),
    Case("vmap_axes", "True", lambda: build(vmap_axes=True), TypeError, r"got True"),
    Case("vmap_axes", "(0, 0, 5)", lambda: build(vmap_axes=(0, 0, 5)), TypeError, r"got 5"),
    Case("vmap_axes", "(0, 5, None)", lambda: call(options=dict(vmap_axes=(0, 5, None))),
         ValueError, r"axis 5 is out of range"),
    Case("vmap_axes", "(0, 0, {'mask': 0}) without mask",
         lambda: call(options=dict(vmap_axes=(0, 0, {"mask": 0}))), ValueError,
         r"\['mask'\]"),
    # implementation and get
    Case("implementation", "7", lambda: build(implementation=7), ValueError, r"got 7"),
    Case("implementation", "'jc'", lambda: build(implementation="jc"), TypeError,
         r"got 'jc'"),
    Case("get", "3", lambda: call(get=3), TypeError, r"got 3"),
    Case("get", "()", lambda: call(get=()), ValueError, r"got \(\)"),
    Case("get", "('ntk', 'cov1')", lambda: call(get=("ntk", "cov1")), ValueError,
         r"\['cov1'\]"),
    Case("get", "('ntk', 'NTK')", lambda: call(get=("ntk", "NTK")), ValueError,
         r"\('ntk', 'NTK'\)"),
    # inputs
    Case("x1", "None", lambda: call(x1=None), TypeError, r"got None"),
    Case("x1", "[[1.0, 2.0]]", lambda: call(x1=[[1.0, 2.0]]), TypeError, r"got list"),
    Case("x2", "'abc'", lambda: call(x2="abc"), TypeError, r"got str"),
    Case("x1", "jnp.ones((0, 2))", lambda: call(x1=jnp.ones((0, 2))), ValueError,
         r"shapes \[\(0, 2\)\]"),
    Case("x2", "jnp.ones((0, 2))", lambda: call(x2=jnp.ones((0, 2))), ValueError,
         r"shapes \[\(0, 2\)\]"),
    Case("x1", "jnp.ones((0, 2)) (empirical_kernel_fn)",
         lambda: mcntk.empirical_kernel_fn(APPLY)(jnp.ones((0, 2)), None, "ntk",
                                                  INIT(KEY, (-1, 2))[1]),
         ValueError, r"shapes \[\(0, 2\)\]"),
    Case("x2", "shape (3, 5) for x1 of shape (3, 2)", lambda: call(x2=jnp.ones((3, 5))),
         ValueError, r"\(shape \(3, 5\)\)"),
    Case("x1", "leaves of 3 and 4 examples, batch_size=2",
         lambda: call(x1={"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))},
                      options=dict(batch_size=2)),
         ValueError, r"\[\(3, 2\), \(4, 2\)\]"),
    # long runs
    Case("stderr", "'yes'", lambda: build(stderr="yes"), TypeError, r"got 'yes'"),
    Case("rtol", "-0.1", lambda: build(rtol=-0.1, stderr=True), ValueError, r"got -0\.1"),
    Case("rtol", "0", lambda: build(rtol=0, stderr=True), ValueError, r"got 0"),
    Case("rtol", "nan", lambda: build(rtol=float("nan"), stderr=True), ValueError, r"got nan"),
    Case("rtol", "'0.1'", lambda: build(rtol="0.1", stderr=True), TypeError, r"got '0\.1'"),
    Case("rtol", "0.01 without stderr=True", lambda: build(rtol=0.01), ValueError,
         r"`rtol`=0\.01"),
    Case("checkpoint_every", "0", lambda: build(checkpoint_every=0), ValueError, r"got 0"),
    Case("checkpoint_every", "-5", lambda: build(checkpoint_every=-5), ValueError,
         r"got -5"),
    Case("checkpoint_every", "2.5", lambda: build(checkpoint_every=2.5), TypeError,
         r"got 2\.5"),
    Case("checkpoint_dir", "3", lambda: build(checkpoint_dir=3), TypeError, r"got 3"),
    Case("checkpoint_dir", "'/dev/null/ckpt' (cannot be written)",
         lambda: build(checkpoint_dir="/dev/null/ckpt"), ValueError,
         r"='/dev/null/ckpt' cannot be written"),
    Case("progress", "'yes'", lambda: build(progress="yes"), TypeError, r"got 'yes'"),
]


def message(case: Case) -> str:
    """The error message ``case`` gets (AssertionError if it raises nothing)."""
    try:
        case.run()
    except Exception as e:  # noqa: BLE001 - the test checks the type
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{case.id} raised nothing")


def test_the_catalogue_is_large():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_names_the_argument_and_the_value(case):
    with pytest.raises(case.error) as info:
        case.run()
    text = str(info.value)
    assert f"`{case.argument}`" in text, text
    assert re.search(case.shown, text), (case.shown, text)


def table() -> str:
    """The markdown table of the catalogue, with each case's actual message (a model's
    own error quoted at its end, which JAX words, is abbreviated)."""
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
    quoted = lambda s: re.sub(r" \((\w+Error): [^()]*(\([^()]*\)[^()]*)*\)$",
                              r" (\1 from the model)", s)
    rows = ["| argument | bad value | error |", "|---|---|---|"]
    for case in CASES:
        kind, _, text = message(case).partition(": ")
        rows.append(f"| `{case.argument}` | `{cell(case.value)}` | {kind}: "
                    f"{cell(quoted(text))} |")
    return "\n".join(rows)


def render(doc: str) -> str:
    head, _, rest = doc.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def test_docs_list_every_case():
    with open(DOC) as f:
        doc = f.read()
    assert START in doc and END in doc
    assert doc == render(doc), "docs/errors.md is stale: run python tests/test_bad_inputs.py"


if __name__ == "__main__":
    jax.config.update("jax_numpy_rank_promotion", "raise")  # as the tests run
    with open(DOC) as f:
        text = render(f.read())
    with open(DOC, "w") as f:
        f.write(text)
    print(f"wrote {len(CASES)} cases to {os.path.normpath(DOC)}", file=sys.stderr)
