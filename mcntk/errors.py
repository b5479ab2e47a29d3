"""Named exceptions. Each docstring is the help page for its error."""

from __future__ import annotations


class NotYetImplementedError(NotImplementedError):
    """The requested feature is planned but has not landed yet.

    ``NtkImplementation.STRUCTURED_DERIVATIVES`` raises this until the structured
    derivatives implementation lands. Use ``NtkImplementation.AUTO`` (the default),
    ``JACOBIAN_CONTRACTION`` or ``NTK_VECTOR_PRODUCTS`` meanwhile: they give the
    same kernels.
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
    and NNX ``mutable=True``). Otherwise run the model in inference mode (e.g.
    ``train=False``, ``use_running_average=True``, ``is_training=False``).
    """
