"""saejax: suites of sparse autoencoders on every layer of a language model, in JAX."""
__version__ = "0.1.0"
