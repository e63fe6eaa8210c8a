"""Flax NNX modules: thin wrappers over :mod:`bn_jax.core` (no second copy of
the math), sharing their plumbing with the Linen modules of :mod:`bn_jax.nn`.

``BatchNorm``, ``LayerNorm`` and ``GroupNorm`` are drop-ins for
``flax.nnx``'s (same constructor arguments, variables and train/eval
switching); ``BatchRenorm``, ``NoisyBatchNorm``, ``LpNorm``,
``FrozenBatchNorm``, ``ConvCBN`` and ``LinearCBN`` are bn_jax's own;
``precise_batch_stats`` is PreciseBN for NNX models.
"""
from bn_jax.nnx.normalization import (BatchNorm, BatchRenorm, FrozenBatchNorm,
                                      GroupNorm, LayerNorm, LpNorm,
                                      NoisyBatchNorm)
from bn_jax.nnx.cbn import ConvCBN, LinearCBN
from bn_jax.nnx.precise_bn import precise_batch_stats

__all__ = ["BatchNorm", "BatchRenorm", "FrozenBatchNorm", "GroupNorm",
           "LayerNorm", "LpNorm", "NoisyBatchNorm", "ConvCBN", "LinearCBN",
           "precise_batch_stats"]
