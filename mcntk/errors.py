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
