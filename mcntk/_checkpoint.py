"""Checkpoints of a Monte Carlo run: the run state, committed atomically with
orbax-checkpoint (an optional extra), and the fingerprint that keeps a checkpoint
from being mixed into another computation.

Layout of ``checkpoint_dir``: one orbax step per commit, named by the number of
samples it holds (``checkpoint_dir/64``, ``checkpoint_dir/128``, ...), each with two
items:

* ``state``: the key of the next sample (its raw ``uint32`` data) and the run's
  moments in canonical form (per program of the grid, the moments of each block,
  merged over devices: :func:`mcntk._run.canonical`), saved as a flat dict of
  arrays ``m0000``, ``m0001``, ... in ``jax.tree.leaves`` order;
* ``meta``: JSON with the format version, the sample count, the fingerprint and
  the probe.

Orbax writes a commit into a temporary directory and renames it into place once
complete (a rename is atomic on local file systems), so a process killed
mid-write leaves at worst a temporary directory, which is ignored and removed by
the next run. A finalised directory is also read defensively: a step without
orbax's ``commit_success.txt``, whose items do not load, or whose count,
fingerprint or array shapes disagree with the run, is skipped with a warning and
an older commit is used; such a directory is never mixed in. The two newest
commits are kept, plus every commit at a requested ``n_samples`` (the generator
form replays them on a rerun).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, NamedTuple

import numpy as np

FORMAT = 1
PROBE_RTOL = 1e-3
_ITEMS = ("state", "meta")


def check_checkpoint_every(checkpoint_every: Any) -> int:
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every,
                                                            (int, np.integer)):
        raise TypeError(f"`checkpoint_every` must be a positive int (samples between "
                        f"commits), got {checkpoint_every!r}.")
    if checkpoint_every <= 0:
        raise ValueError(f"`checkpoint_every` must be a positive int (samples between "
                         f"commits), got {checkpoint_every}.")
    return int(checkpoint_every)


def check_dir(checkpoint_dir: Any) -> str | None:
    """``checkpoint_dir`` as an absolute path, created and checked to be writable
    (so a bad directory fails before any sample runs); needs orbax-checkpoint."""
    if checkpoint_dir is None:
        return None
    if not isinstance(checkpoint_dir, (str, os.PathLike)) or isinstance(checkpoint_dir, bytes):
        raise TypeError(f"`checkpoint_dir` must be None or a path (str or os.PathLike), "
                        f"got {checkpoint_dir!r}.")
    path = os.path.abspath(os.fspath(checkpoint_dir))
    if not os.fspath(checkpoint_dir):
        raise ValueError("`checkpoint_dir` must be a directory path, got ''.")
    _orbax()
    probe = os.path.join(path, f".mcntk-write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("mcntk")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"`checkpoint_dir`={os.fspath(checkpoint_dir)!r} cannot be written "
                         f"({type(e).__name__}: {e.strerror or e}); pass a directory this "
                         f"process can create and write.") from e
    return path


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError('`checkpoint_dir` needs orbax-checkpoint: pip install '
                          '"mcntk[checkpoint]" (or pip install orbax-checkpoint).') from e
    return ocp


# --- fingerprint -------------------------------------------------------------------

def digest(value: Any) -> str:
    """A SHA-256 of ``value``: nested tuples, lists and dicts of arrays (dtype, shape
    and bytes), strings and other values (by ``repr``)."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=str):
                feed(str(k))
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, (tuple, list)):
            h.update(b"(%d" % len(v))
            for u in v:
                feed(u)
            h.update(b")")
        elif isinstance(v, str):
            h.update(b"s" + v.encode() + b"\0")
        elif hasattr(v, "shape") and hasattr(v, "dtype"):
            a = np.ascontiguousarray(np.asarray(v))
            h.update(f"a{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(b"r" + repr(v).encode() + b"\0")

    feed(value)
    return h.hexdigest()


class Fingerprint:
    """What a run estimates.

    Args:
      parts: ``{part: digest}`` compared exactly (``settings``, ``key``, ``inputs``,
        ``model``, ``state``).
      probe: a function returning entries of the first sample's kernels, compared
        to a relative ``PROBE_RTOL``: they tell apart models with the same parameter
        structure, and do not depend on a machine's rounding. Called once, when
        first needed (it runs a sample).
    """

    def __init__(self, parts: dict[str, str], probe: Any):
        self.parts, self._probe_fn, self._probe = parts, probe, None

    @property
    def probe(self) -> list[float]:
        if self._probe is None:
            self._probe = list(self._probe_fn())
        return self._probe

    def mismatch(self, meta: dict) -> str | None:
        """The part of ``meta``'s fingerprint that differs from this one, or None."""
        saved = meta.get("fingerprint", {})
        for part, value in self.parts.items():
            if saved.get(part) != value:
                return part
        probe = np.asarray(meta.get("probe", []), np.float64)
        mine = np.asarray(self.probe, np.float64)
        if probe.shape != mine.shape:
            return "model"
        scale = float(np.max(np.abs(mine), initial=0.0))
        if not np.allclose(probe, mine, rtol=PROBE_RTOL, atol=PROBE_RTOL * 1e-3 * scale,
                           equal_nan=True):
            return "model"
        return None


DESCRIBE = {
    "format": "the checkpoint format",
    "settings": "the settings (`get`, `trace_axes`, `diagonal_axes`, `vmap_axes`, "
                "`batch_size`, `stderr` or the precision)",
    "key": "the `key` (or the PRNG implementation)",
    "inputs": "the inputs (`x1`, `x2` or keyword arguments)",
    "model": "the model (its parameter structure, or its kernels for the first sample)",
    "state": "the shapes of the kernels",
}


def probe_values(kernels: Any, per_leaf: int = 64) -> list[float]:
    """Numbers that identify a model: the first ``per_leaf`` entries of each kernel
    leaf of its first sample."""
    import jax

    out: list[float] = []
    for leaf in jax.tree.leaves(kernels):
        out += [float(v) for v in np.asarray(leaf, np.float64).ravel()[:per_leaf]]
    return out


# --- the store ---------------------------------------------------------------------

class Commit(NamedTuple):
    """A loaded commit: ``done`` samples, the next key's data and the state leaves."""

    done: int
    key_data: np.ndarray
    leaves: list


class Store:
    """The commits of one run in ``directory``.

    Args:
      directory: the checkpoint directory (checked by :func:`check_dir`).
      fingerprint: the run's :class:`Fingerprint`.
      like: the state leaves of this run (arrays or ShapeDtypeStructs), to check
        shapes and dtypes of what is loaded.
      keep: sample counts whose commits are kept (the requested ``n_samples``).
    """

    def __init__(self, directory: str, fingerprint: Fingerprint, like: list, keep: tuple):
        ocp = _orbax()
        self.ocp, self.directory, self.fingerprint = ocp, directory, fingerprint
        self.like = [(tuple(v.shape), np.dtype(v.dtype)) for v in like]
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False, create=True, cleanup_tmp_directories=True,
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(2), policies.CustomSteps(list(keep))]))
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)

    def close(self) -> None:
        self.manager.close()

    def steps(self) -> list[int]:
        """Committed steps, newest first (finalised directories only)."""
        self.manager.reload()
        return sorted(self.manager.all_steps(), reverse=True)

    def _meta(self, step: int) -> dict | None:
        path = os.path.join(self.directory, str(step))
        if not os.path.exists(os.path.join(path, "commit_success.txt")):
            return None
        try:
            meta = self.manager.restore(step, args=self.ocp.args.Composite(
                meta=self.ocp.args.JsonRestore()))["meta"]
        except Exception:
            return None
        if not isinstance(meta, dict) or meta.get("done") != step:
            return None
        return meta

    def check(self) -> list[int]:
        """The usable commits' steps, newest first; raises
        :class:`~mcntk.errors.CheckpointMismatchError` if the newest readable commit
        belongs to another computation."""
        from mcntk.errors import CheckpointMismatchError

        usable = []
        for step in self.steps():
            meta = self._meta(step)
            if meta is None:
                self._discard(step, "is incomplete or unreadable")
                continue
            if meta.get("format") != FORMAT:
                part = "format"
            else:
                part = self.fingerprint.mismatch(meta)
            if part is not None:
                raise CheckpointMismatchError(
                    f"`checkpoint_dir`={self.directory!r} holds a checkpoint of another "
                    f"computation: {DESCRIBE[part]} differ from this call's. Pass another "
                    f"`checkpoint_dir`, or delete this one to start over (see "
                    f"mcntk.errors.CheckpointMismatchError).")
            usable.append(step)
        return usable

    def _discard(self, step: int, why: str) -> None:
        warnings.warn(f"`checkpoint_dir`={self.directory!r}: commit {step} {why}; it is "
                      f"ignored and removed.", RuntimeWarning, stacklevel=5)
        try:
            self.manager.delete(step)
        except Exception:  # already gone, or not removable: it stays ignored
            pass

    def load(self, step: int) -> Commit | None:
        """The commit at ``step``, or None (with a warning; the commit is removed) if it
        does not load whole."""
        try:
            state = self.manager.restore(step, args=self.ocp.args.Composite(
                state=self.ocp.args.StandardRestore()))["state"]
            leaves = [np.asarray(state["leaves"][f"m{i:04d}"]) for i in range(len(self.like))]
            key_data = np.asarray(state["key"])
            complete = len(state["leaves"]) == len(self.like)
        except Exception as e:
            self._discard(step, f"does not load ({type(e).__name__})")
            return None
        if [(v.shape, v.dtype) for v in leaves] != self.like or not complete:
            self._discard(step, "has arrays of other shapes than this run's")
            return None
        return Commit(step, key_data, leaves)

    def save(self, done: int, key_data: Any, leaves: list) -> None:
        """Commits the state after ``done`` samples (no-op if that step exists)."""
        if done in self.manager.all_steps():
            return
        tree = {"key": np.asarray(key_data),
                "leaves": {f"m{i:04d}": np.asarray(v) for i, v in enumerate(leaves)}}
        meta = {"format": FORMAT, "done": int(done), "fingerprint": self.fingerprint.parts,
                "probe": self.fingerprint.probe}
        meta = json.loads(json.dumps(meta))  # plain JSON types only
        self.manager.save(int(done), args=self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(tree), meta=self.ocp.args.JsonSave(meta)))
