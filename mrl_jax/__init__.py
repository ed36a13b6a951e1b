"""mrl_jax: Matryoshka Representation Learning in JAX/Flax NNX."""

__version__ = "0.1.0"
