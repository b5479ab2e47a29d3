"""Named exceptions. Each docstring is the help page for its error."""

from __future__ import annotations


class NotYetImplementedError(NotImplementedError):
    """The requested feature is planned but has not landed yet.

    The message names the feature and what to use meanwhile. Every
    ``NtkImplementation`` is available (``STRUCTURED_DERIVATIVES`` landed with
    issue 8), so kernel functions no longer raise this for ``implementation``; an
    implementation that is declared but not registered in
    ``mcntk.ntk.IMPLEMENTATIONS`` would. All implementations compute the same
    kernels, so ``NtkImplementation.AUTO`` (the default) is always a substitute.
    """


class MissingFrameworkError(ImportError):
    """An adapter needs a framework that is not installed.

    mcntk imports Flax, Haiku and Equinox only when an adapter for them is used, and
    does not depend on them. Install the framework with its pip extra, e.g.
    ``pip install "mcntk[flax]"``, ``pip install "mcntk[haiku]"`` or
    ``pip install "mcntk[equinox]"`` (``"mcntk[frameworks]"`` installs all three).
    """


class UnsupportedModelError(TypeError):
    """``as_model`` has no adapter for the object it was given.

    Supported out of the box: a :class:`mcntk.adapters.Model`; stax
    ``(init_fn, apply_fn)`` pairs and ``(init_fn, apply_fn, kernel_fn)`` triples;
    ``flax.linen.Module`` instances; ``flax.nnx.Module`` subclasses and factories
    (``nnx_model(lambda rngs: Net(..., rngs=rngs))``); ``haiku.Transformed`` and
    ``haiku.TransformedWithState``; Equinox factories
    (``equinox_model(lambda key: eqx.nn.MLP(..., key=key))``).

    Anything else can be supported by an adapter: an object with
    ``matches(obj) -> bool`` and ``to_model(obj, **options) -> Model``, registered with
    ``mcntk.adapters.register(adapter, name=...)`` or published by a package under
    the entry-point group ``mcntk.adapters``. Or write the pair of functions
    yourself and pass ``Model(init, apply)``.
    """


class StateMutationError(ValueError):
    """A model's ``apply`` writes to state that mcntk holds fixed.

    mcntk differentiates only the parameters of a model; other state (Flax
    ``batch_stats``, Haiku state, NNX ``BatchStat``) is initialised with the
    parameters and held fixed. A model that updates such state during ``apply`` is
    usually BatchNorm in training mode. Its output for one example then depends on
    the other examples of the batch, so its kernel is not per-example:
    ``vmap_axes`` must be ``None``, and the updated statistics are discarded.

    To opt in, pass ``mutable=...`` to ``as_model`` (for Flax linen a collection
    name or list of names, e.g. ``mutable=['batch_stats']``, or ``True``; for Haiku
    and NNX ``mutable=True``), call the model in training mode and keep
    ``vmap_axes=None``. Otherwise run the model in inference mode (e.g.
    ``train=False``, ``use_running_average=True``), with the running statistics that
    ``init`` gives: Flax linen and NNX BatchNorm start at mean 0 and variance 1.

    Not so ``hk.BatchNorm``: Haiku creates its moving averages (only in training
    mode, so pass ``init_kwargs={'is_training': True}``) from the batch ``init`` sees,
    and the example input of ``init`` is zeros, identical examples with variance 0.
    In inference mode (``is_training=False``) right after ``init`` each feature is
    then divided by ``sqrt(eps)`` and kernels come out ~1/eps (~1e5) times too large.
    For Haiku, use training mode (``mutable=True``, ``is_training=True``,
    ``vmap_axes=None``), or an ``init`` of your own that sets each ``var_ema`` state's
    ``average`` to ones (and ``mean_ema``'s to zeros) after the adapter's ``init``;
    see docs/adapters.md.
    """


class NonFiniteSampleError(FloatingPointError):
    """A sample of a Monte Carlo estimate gave a kernel with NaN or Inf entries.

    The estimator checks every one-sample kernel before adding it, so the offending
    sample never enters the sums. The error names the sample (0-based, in the key
    schedule of ``monte_carlo_kernel_fn``), the kernel (``'nngp'`` or ``'ntk'``,
    and the output leaf for a pytree output) and the block of the grid (with the
    examples it covers). With ``checkpoint_dir``, what was committed before the
    sample stays on disk: samples after the last commit are computed again by the
    next call, which meets the same sample again unless the model changes.

    Attributes:
      sample: the sample's index.
      kernel: the kernel's name, e.g. ``'ntk'`` or ``"ntk[1]['logits']"``.
      block: ``(i, j)``, the block of the grid (``(0, 0)`` without ``batch_size``).
      committed: samples committed in ``checkpoint_dir``, or None without one.

    Usual causes: an initialisation scale that overflows (deep networks in standard
    parameterisation, ``exp`` of large pre-activations), a model that divides by a
    norm that can be zero, ``sqrt`` or ``log`` of a quantity that can be negative,
    or low precision (float16/bfloat16 outputs). To look at the sample, draw its
    parameters as the estimator does: ``key_s = key`` advanced ``s`` times by
    ``key_s, _ = jax.random.split(key_s)``, then ``_, split = jax.random.split(key_s)``,
    ``init_key, dropout_key = jax.random.split(split)`` and
    ``params = init_fn(init_key, input_shape)[1]``; evaluate it with
    ``mcntk.empirical_kernel_fn`` (and ``jax.config.update('jax_debug_nans', True)``
    to find the operation).
    """

    def __init__(self, message: str, sample: int, kernel: str, block: tuple,
                 committed: int | None = None):
        super().__init__(message)
        self.sample, self.kernel, self.block, self.committed = sample, kernel, block, committed

    def __reduce__(self):
        return (type(self), (self.args[0], self.sample, self.kernel, self.block, self.committed))


class CheckpointMismatchError(ValueError):
    """``checkpoint_dir`` holds the run state of a different computation.

    A checkpoint records a fingerprint of what it estimates: the inputs (``x1``,
    ``x2`` and keyword arrays), the model (its parameter structure, and the kernels
    of the first sample on the first block, compared to a relative 1e-3 so that
    another machine's rounding does not matter), the key, the settings that shape the run
    state (``get``, ``trace_axes``, ``diagonal_axes``, ``vmap_axes``,
    ``batch_size``, ``stderr``, the precision) and the sample counts whose states
    were kept. Mixing it into another computation would silently give a wrong
    estimate, so it is refused instead. The message names the directory and the
    part that differs.

    What to do: pass another ``checkpoint_dir`` (one directory per kernel call:
    ``f"runs/{name}"``), or delete the directory to start over. ``n_samples`` may
    grow between calls (the run continues), ``rtol``, ``checkpoint_every``,
    ``progress``, ``device_count``, ``mesh``, ``sample_axes``, ``implementation``
    and ``store_on_device`` may change freely; an estimate at fewer samples than the
    checkpoint holds is available only if its count was committed, i.e. was one of
    the ``n_samples`` of the run that made it.
    """
