"""Functional core: every normalization as pure functions over explicit state.

One concept per module (like optax): a small NamedTuple state, a constructor
for it, and a pure ``fn(x, state, ..., *, train) -> (y, new_state)``.
"""
from bn_jax.core.moments import Moments, moments, stats_dtype
from bn_jax.core.batch_norm import (BatchNormState, batch_norm,
                                    batch_norm_state, batch_statistics)

__all__ = [
    "Moments", "moments", "stats_dtype",
    "BatchNormState", "batch_norm", "batch_norm_state", "batch_statistics",
]
