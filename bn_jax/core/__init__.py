"""Functional core: every normalization as pure functions over explicit state.

One concept per module (like optax): a small NamedTuple state, a constructor
for it, and a pure ``fn(x, state, ..., *, train) -> (y, new_state)`` -- every
public function returns exactly these two values. The Flax front-ends'
PreciseBN hooks call the internal ``*_with_moments`` variants, which return
``(y, new_state, moments)``. Helpers several normalizations share live in
:mod:`bn_jax.core.common`, argument checks in :mod:`bn_jax.core.validation`.
The core knows no Flax collection names.
"""
from bn_jax.core.moments import Moments, moments, stats_dtype
from bn_jax.core.batch_norm import (BatchNormState, batch_norm,
                                    batch_norm_state, batch_statistics)
from bn_jax.core.precise_batch_norm import (PopulationStats,
                                            accumulate_population_stats,
                                            aggregate_batch_moments,
                                            pool_moments,
                                            population_stats_init,
                                            population_stats_result,
                                            population_stats_update,
                                            write_population_stats)
from bn_jax.core.fold import fold_batch_norm
from bn_jax.core.group_norm import (GroupNormState, group_norm,
                                    group_norm_state)
from bn_jax.core.layer_norm import (LayerNormState, layer_norm,
                                    layer_norm_state)
from bn_jax.core.batch_renorm import (BatchRenormState, batch_renorm,
                                      batch_renorm_limits, batch_renorm_state)
from bn_jax.core.noisy_batch_norm import noisy_batch_norm
from bn_jax.core.lp_norm import LpNormState, lp_norm, lp_norm_state
from bn_jax.core.frozen_batch_norm import frozen_batch_norm
from bn_jax.core.cross_iteration_batch_norm import (
    CBNState, cbn_state, cross_iteration_batch_norm)

__all__ = [
    "Moments", "moments", "stats_dtype",
    "BatchNormState", "batch_norm", "batch_norm_state", "batch_statistics",
    "PopulationStats", "accumulate_population_stats",
    "aggregate_batch_moments", "pool_moments", "population_stats_init",
    "population_stats_update", "population_stats_result",
    "write_population_stats",
    "fold_batch_norm",
    "GroupNormState", "group_norm", "group_norm_state",
    "LayerNormState", "layer_norm", "layer_norm_state",
    "BatchRenormState", "batch_renorm", "batch_renorm_limits",
    "batch_renorm_state",
    "noisy_batch_norm",
    "LpNormState", "lp_norm", "lp_norm_state",
    "frozen_batch_norm",
    "CBNState", "cbn_state", "cross_iteration_batch_norm",
]
