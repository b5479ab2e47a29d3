"""The progress bar of a Monte Carlo run (tqdm, an optional extra) and the pacing
of its updates.

``progress=None`` shows the bar only where someone watches: when stderr is a
terminal or inside a Jupyter kernel, so CI logs stay clean; ``True`` always (an
ImportError naming the ``progress`` extra if tqdm is missing); ``False`` never.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any


def check_progress(progress: Any) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"`progress` must be None (a bar when stderr is a terminal or in a "
                        f"notebook), True or False, got {progress!r}.")
    return progress


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython is never imported here)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython else None
    return shell is not None and hasattr(shell, "kernel")


def wanted(progress: bool | None) -> bool:
    if progress is None:
        stream = sys.stderr
        return _in_notebook() or bool(stream is not None and getattr(stream, "isatty",
                                                                     lambda: False)())
    return progress


def _tqdm(required: bool) -> Any:
    try:
        if _in_notebook():
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
    except ImportError as e:
        if not required:
            return None
        raise ImportError('`progress=True` needs tqdm: pip install "mcntk[progress]" '
                          '(or pip install tqdm).') from e
    return tqdm


class Bar:
    """A bar over samples: count, rate and, when tracked, the relative standard error
    ``max(stderr) / max(|mean|)`` of the least accurate kernel."""

    def __init__(self, tqdm: Any, total: int, done: int, blocks: int):
        self._bar = tqdm(total=total, initial=done, unit="sample", file=sys.stderr,
                         desc="mcntk", dynamic_ncols=True, smoothing=0.1)
        self._blocks = blocks
        self._postfix: dict[str, str] = {"blocks": str(blocks)}
        self._bar.set_postfix(self._postfix, refresh=False)

    def update(self, done: int, relative_stderr: float | None = None) -> None:
        if relative_stderr is not None:
            self._postfix["rel. stderr"] = f"{relative_stderr:.2e}"
            self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def bar(progress: bool | None, total: int, done: int, blocks: int) -> Bar | None:
    """A :class:`Bar`, or None when ``progress`` says not to show one."""
    if not wanted(progress):
        return None
    tqdm = _tqdm(required=progress is True)
    return None if tqdm is None else Bar(tqdm, total, done, blocks)


class Pacer:
    """Sizes of the calls between two boundaries of a run with a bar, so that the bar
    moves about every ``target`` seconds whatever a sample costs.

    Sizes are multiples of ``step`` (the devices that split samples), so the samples
    land in the same slots as in one call and the estimate does not change. Starts at
    one step and doubles while calls are quicker than ``target``.
    """

    def __init__(self, step: int, target: float = 0.5):
        self.step, self.target, self.size = step, target, step
        self._start = 0.0

    def next(self, remaining: int) -> int:
        self._start = time.perf_counter()
        return min(self.size, remaining)

    def done(self) -> None:
        elapsed = time.perf_counter() - self._start
        if elapsed < self.target / 2:
            self.size *= 2
        elif elapsed > 2 * self.target and self.size > self.step:
            self.size = max(self.step, self.size // 2 // self.step * self.step)


def lcm(values: list[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out
