"""Flax modules: thin wrappers over :mod:`bn_jax.core` (no second copy of the math)."""
