"""Flax modules: thin wrappers over :mod:`bn_jax.core` (no second copy of the math)."""
from bn_jax.nn.normalization import (BatchNorm, BatchRenorm, FrozenBatchNorm,
                                     GroupNorm, LayerNorm, LpNorm,
                                     NoisyBatchNorm)

__all__ = ["BatchNorm", "BatchRenorm", "FrozenBatchNorm", "GroupNorm",
           "LayerNorm", "LpNorm", "NoisyBatchNorm"]

from bn_jax.nn.cbn import ConvCBN, DenseCBN  # noqa: E402

__all__ += ["ConvCBN", "DenseCBN"]
