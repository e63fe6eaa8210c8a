"""Flax Linen modules: thin wrappers over :mod:`bn_jax.core` (no second copy of
the math). The NNX versions are in :mod:`bn_jax.nnx`."""
from bn_jax.nn.normalization import (BatchNorm, BatchRenorm, FrozenBatchNorm,
                                     GroupNorm, LayerNorm, LpNorm,
                                     NoisyBatchNorm)
from bn_jax.nn.precise_bn import precise_batch_stats
from bn_jax.nn.cbn import ConvCBN, DenseCBN

__all__ = ["BatchNorm", "BatchRenorm", "FrozenBatchNorm", "GroupNorm",
           "LayerNorm", "LpNorm", "NoisyBatchNorm", "ConvCBN", "DenseCBN",
           "precise_batch_stats"]
