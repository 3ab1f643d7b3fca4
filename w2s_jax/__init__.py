"""w2s-jax: weak-to-strong reasoning in JAX/Flax."""

__version__ = "0.1.0"
