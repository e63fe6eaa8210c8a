"""bn_jax: batch normalization and its successors for JAX/Flax.

Functional layers (pure functions over explicit state) are importable from the
top level; Flax modules live in :mod:`bn_jax.nn`.
"""
from bn_jax.core import *  # noqa: F401,F403
from bn_jax.core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = list(_core_all)
