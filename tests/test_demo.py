"""The `mcntk demo` command: converges within its standard errors, classifies, draws its
picture, and checks its options."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import mcntk
from mcntk import __main__ as cli
from mcntk import demo

WIDTH, N_SAMPLES, SEED = 256, 2048, 1
TRAIN, TEST = 6, 4  # 10 examples of the built-in spirals (no scikit-learn needed)
GROUPS = 16  # disjoint groups of samples, for the standard error
SAFETY = 4.0  # the bound in standard errors
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def demo_extra():
    """The demo's model is Flax linen and its picture matplotlib (the `demo` extra, also
    in the `test` extra: CI runs these tests, never skips them)."""
    import flax.linen  # noqa: F401
    import matplotlib  # noqa: F401


def estimates_and_standard_errors(x, depth):
    """The demo's estimates after ``N_SAMPLES`` samples (its network, data and key) and
    the Frobenius norms of their standard errors, from ``GROUPS`` disjoint groups of the
    same samples: the cumulative estimates of a generator, differenced (independent of
    the estimator's own ``stderr=True``)."""
    size = N_SAMPLES // GROUPS
    counts = [size * (g + 1) for g in range(GROUPS)]
    model = demo.flax_relu_network(WIDTH, depth, 3)
    kernel_fn = mcntk.monte_carlo_kernel_fn(model, key=jax.random.PRNGKey(SEED), n_samples=counts,
                                            vmap_axes=0, progress=False)
    cumulative = list(kernel_fn(x, None, ("nngp", "ntk")))
    out = []
    for name in ("nngp", "ntk"):
        sums = np.stack([n * np.asarray(getattr(k, name), np.float64)
                         for n, k in zip(counts, cumulative)])
        group_means = np.diff(sums, axis=0, prepend=0.0) / size
        se = np.sqrt(group_means.var(axis=0, ddof=1).sum() / GROUPS)
        out.append((sums[-1] / N_SAMPLES, float(se)))
    return out


def test_demo_converges_within_its_standard_error(demo_extra, capsys, monkeypatch, tmp_path):
    """With one hidden layer the network's expected kernels are the infinite-width ones
    (the hidden pre-activations are exactly Gaussian; the output layer averages i.i.d.
    units), so the demo's error is Monte Carlo error only, and the bound is ``SAFETY``
    standard errors of the estimate, measured from its own samples (the derivation is in
    tests/test_adapters_infinite_width.py).

    The bound has power: the kernels of a network whose weight variance is smaller (NTK:
    by 10%; NNGP: by 20%, as a 3-output NNGP is noisy, ~2.7% relative standard error at
    2048 samples) lie beyond the bound plus ``SAFETY`` standard errors. (The demo's bias variance,
    ``SIGMA_B = 0.1``, is a fraction of a percent of its kernels: resolving it would take
    ~10^5 samples. tests/test_adapters_infinite_width.py checks a dropped bias variance.)
    """
    result = demo.run(width=WIDTH, depth=1, samples=(1, N_SAMPLES), data="spirals",
                      train=TRAIN, test=TEST, seed=SEED, out=str(tmp_path / "demo.png"),
                      progress=False)
    assert [r.n_samples for r in result.rows] == [1, N_SAMPLES]
    out = capsys.readouterr().out
    assert "error    = ||K_n - K_inf||_F / ||K_inf||_F" in out  # the error is defined
    table = out[out.index(" samples "):].splitlines()
    assert table[2].split()[0] == str(N_SAMPLES)
    data = demo.load_data("spirals", TRAIN, TEST, SEED)
    x = np.concatenate([data.x_train, data.x_test])
    exact = demo.arccos_kernels(x.astype(np.float64), 1)
    wrong = []
    for name, variance in (("nngp", 0.8), ("ntk", 0.9)):
        with monkeypatch.context() as m:
            m.setattr(demo, "SIGMA_W", demo.SIGMA_W * variance**0.5)
            wrong.append(demo.arccos_kernels(x.astype(np.float64), 1)[name == "ntk"])
    measured = estimates_and_standard_errors(x, depth=1)
    last = result.rows[-1]
    reported = [(last.nngp_error, last.nngp_stderr), (last.ntk_error, last.ntk_stderr)]
    for (estimate, se), (error, reported_se), k, k_wrong in zip(measured, reported, exact,
                                                                wrong):
        norm = np.linalg.norm(k)
        # the demo reports the relative Frobenius error of this very estimate
        assert error == pytest.approx(np.linalg.norm(estimate - k) / norm, rel=1e-3, abs=1e-6)
        assert error < SAFETY * se / norm, (error, se / norm)
        assert np.linalg.norm(k_wrong - k) > 2 * SAFETY * se
        # its standard error (mcntk's stderr=True) agrees with the grouped one: with 16
        # groups the grouped estimate is within a factor 2 but for a ~1e-3 chance
        assert 0.5 < reported_se * norm / se < 2.0, (reported_se * norm, se)
    np.testing.assert_allclose(result.exact_ntk, exact[1])


def test_kernel_regression_fits_its_training_data_and_beats_chance():
    data = demo.load_data("spirals", 150, 100, seed=0)
    x = np.concatenate([data.x_train, data.x_test]).astype(np.float64)
    k = demo.arccos_kernels(x, 2)[1]
    train = demo.kernel_regression(k[:150, :150], k[:150, :150], data.y_train, 3, ridge=1e-6)
    assert (train == data.y_train).mean() == 1.0  # interpolates
    test = demo.kernel_regression(k[:150, :150], k[150:, :150], data.y_train, 3)
    assert (test == data.y_test).mean() > 0.6  # chance is 1/3
    shuffled = demo.kernel_regression(k[:150, :150], k[150:, :150],
                                      np.random.default_rng(0).permutation(data.y_train), 3)
    assert (shuffled == data.y_test).mean() < 0.5


def test_load_data_splits_and_scales():
    data = demo.load_data("spirals", 30, 20, seed=3)
    assert data.x_train.shape == (30, 2) and data.x_test.shape == (20, 2)
    assert data.x_train.dtype == np.float32 and data.classes == 3
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose((data.x_train.astype(np.float64) ** 2).mean(), 1, rtol=1e-5)
    with pytest.raises(ValueError, match="`source` must be 'auto', 'digits' or 'spirals'"):
        demo.load_data("mnist")


def test_flax_network_is_the_stax_network(demo_extra):
    """The demo's Flax module computes what ``relu_network`` computes for the same
    parameters (so other tests' use of ``relu_network`` speaks for the demo's model)."""
    model = demo.flax_relu_network(16, 2, 3)
    init_fn, apply_fn = demo.relu_network(16, 2, 3)
    x = demo.circle(5)
    variables = model.init(jax.random.PRNGKey(0), x)
    layers = [variables["params"][f"NtkDense_{i}"] for i in range(3)]
    params = [(p["kernel"], p["bias"]) for p in layers]
    np.testing.assert_allclose(model.apply(variables, x), apply_fn(params, x), rtol=1e-5)
    assert init_fn(jax.random.PRNGKey(0), x.shape)[0] == (5, 3)


def test_cli_fast_demo_writes_its_picture(demo_extra, tmp_path):
    """The reduced setting CI runs: the command prints the table, the accuracy and the
    path of a non-empty PNG."""
    png = tmp_path / "picture.png"
    out = subprocess.run([sys.executable, "-m", "mcntk", "demo", "--fast", "--out", str(png)],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == PNG_MAGIC
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == f"picture: {png}"
    rows = [line.split() for line in lines if re.match(r"\s+\d+\s", line)]
    assert [r[0] for r in rows] == ["1", "4", "16"]  # --fast's sample counts
    errors = [float(r[3]) for r in rows]  # NTK error
    assert errors[-1] < errors[0]
    accuracy = re.search(r"accuracy ([\d.]+)% with the Monte Carlo NTK", out.stdout)
    assert accuracy and float(accuracy.group(1)) > 50.0  # chance is 10% (digits), 33% (spirals)
    assert out.stderr.strip() == "" or "Traceback" not in out.stderr


def test_fast_keeps_explicit_options():
    args = {}

    def fake_run(**kwargs):
        args.update(kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(demo, "run", fake_run)
        demo.main(["--fast", "--width", "64"])
    assert args["width"] == 64 and args["samples"] == (1, 4, 16)
    assert (args["train"], args["test"]) == (demo.FAST["train"], demo.FAST["test"])


def test_cli_usage_and_errors(capsys):
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["nonsense"]) == 2


def test_demo_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    entries = {e.split()[0]: " ".join(e.split()) for e in re.split(r"\n(?=  -)", options)[1:]}
    assert set(entries) == {"-h,", "--width", "--depth", "--samples", "--data", "--train",
                            "--test", "--seed", "--out", "--fast", "--progress,"}
    for option, default in [("--width", "512"), ("--depth", "1"),
                            ("--samples", "[1, 4, 16, 64, 256]"), ("--data", "auto"),
                            ("--train", "300"), ("--test", "200"), ("--seed", "0"),
                            ("--out", "mcntk_demo.png"), ("--fast", "False"),
                            ("--progress,", "None")]:
        entry = entries[option]
        assert entry.endswith(f"(default: {default})"), entry
        assert len(entry.split(")")[0].split()) > 4, entry  # a help text, not just the name


@pytest.mark.parametrize("args,message", [
    (["--samples", "0"], "argument --samples: must be a positive int, got 0"),
    (["--samples", "4", "-2"], "argument --samples: must be a positive int, got -2"),
    (["--width", "0"], "argument --width: must be a positive int, got 0"),
    (["--depth", "0"], "argument --depth: must be a positive int, got 0"),
    (["--train", "x"], "argument --train: must be a positive int, got 'x'"),
    (["--test", "0"], "argument --test: must be a positive int, got 0"),
    (["--seed", "-1"], "argument --seed: must be an int >= 0, got -1"),
    (["--data", "mnist"], "argument --data: invalid choice: 'mnist'"),
])
def test_demo_rejects_bad_options_by_name(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        demo.main(args)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_demo_subprocess_rejects_bad_options():
    bad = subprocess.run([sys.executable, "-m", "mcntk", "demo", "--samples", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "argument --samples: must be a positive int, got 0" in bad.stderr


def test_demo_too_many_examples_is_an_error():
    with pytest.raises(ValueError, match="has 1797 examples; asked for 2000 \\+ 200"):
        demo.load_data("digits", 2000, 200)


@pytest.mark.parametrize("argv,message", [
    (["--out", "/nonexistent/folder/demo.png"],
     "argument --out: cannot write '/nonexistent/folder/demo.png'"),
    (["--data", "digits", "--train", "2000"],
     "argument --train/--test: scikit-learn digits"),
])
def test_cli_usage_errors_before_any_sample(demo_extra, capsys, argv, message):
    """An output that cannot be written, or more examples than the data set has, are
    usage errors (exit status 2, no traceback), found before anything is computed."""
    with pytest.raises(SystemExit) as info:
        demo.main(["--fast", *argv])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "samples" not in captured.out
