"""The `mcntk demo` command: runs, prints its table, and converges."""

import subprocess
import sys

from mcntk import __main__ as cli
from mcntk import demo


def test_demo_converges(capsys):
    rows = demo.run(width=256, depth=2, points=4, samples=(1, 32), seed=1)
    assert [n for n, _, _ in rows] == [1, 32]
    _, nngp_err, ntk_err = rows[-1]
    assert ntk_err < 0.1 and nngp_err < 0.25, rows
    assert "NTK error" in capsys.readouterr().out


def test_cli_usage_and_errors(capsys):
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["nonsense"]) == 2


def test_cli_demo_subprocess():
    out = subprocess.run([sys.executable, "-m", "mcntk", "demo", "--width", "64", "--points",
                          "3", "--samples", "1", "2"], capture_output=True, text=True, check=True)
    assert "samples" in out.stdout and out.stdout.strip().splitlines()[-1].split()[0] == "2"
