"""bn_jax: batch normalization and its successors for JAX/Flax.

Functional layers (pure functions over explicit state) are importable from the
top level; Flax Linen modules live in :mod:`bn_jax.nn`, Flax NNX modules in
:mod:`bn_jax.nnx`. ``precise_batch_stats`` (PreciseBN of a Linen model's
``batch_stats``) is re-exported from :mod:`bn_jax.nn` for convenience.
"""
from bn_jax.core import *  # noqa: F401,F403
from bn_jax.core import __all__ as _core_all
from bn_jax.nn.precise_bn import precise_batch_stats

__version__ = "0.1.0"
__all__ = list(_core_all) + ["precise_batch_stats"]
