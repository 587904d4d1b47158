"""llmlab: the large-language-model storyline as one readable, fast, tested PyTorch codebase."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """See :func:`llmlab.api.load`. Imported lazily so ``import llmlab`` stays cheap."""
    from llmlab.api import load as _load

    return _load(*args, **kwargs)


__all__ = ["load", "__version__"]
