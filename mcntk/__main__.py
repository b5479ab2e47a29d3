"""The ``mcntk`` command: ``mcntk demo [options]`` (or ``python -m mcntk demo``)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"demo": "the Monte Carlo NTK of a small Flax model on built-in data: its "
                        "convergence, kernel regression and a picture (mcntk demo --help)"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        ok = not argv or argv[0] in ("-h", "--help")
        out = sys.stdout if ok else sys.stderr
        if not ok:
            print(f"mcntk: unknown command {argv[0]!r}", file=out)
        print("usage: mcntk COMMAND [options]\n\ncommands:", file=out)
        for name, help_text in commands.items():
            print(f"  {name:8} {help_text}", file=out)
        return 0 if ok else 2
    from mcntk import demo

    demo.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
