"""saejax: suites of sparse autoencoders on every layer of a language model, in JAX."""
__version__ = "0.1.0"


def __getattr__(name):
    """``saejax.load_suite`` without importing jax at ``import saejax`` time."""
    if name == "load_suite":
        from saejax.release.load import load_suite
        return load_suite
    raise AttributeError(f"module 'saejax' has no attribute {name!r}")
