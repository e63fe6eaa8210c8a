"""bn_jax.analysis: the measuring instruments of the papers.

Pure functions over ``loss_fn(params, batch_stats, batch) -> scalar`` (a
train-mode forward whose running-statistics update is discarded; build one
from a flax model with :func:`make_loss_fn`), so they work on any model:

* :func:`internal_covariate_shift` -- Santurkar et al. (2018), Def. 2.1.
* :func:`landscape_probe` -- loss variation, gradient predictiveness and
  effective beta-smoothness along the gradient (Santurkar et al., Sec. 3).
* :func:`activation_percentiles`, :class:`ActivationTracker` -- BN paper
  Fig. 1(b,c) and per-layer pre-activation drift.
* :func:`statistics_consistency` -- EMA vs PreciseBN vs batch statistics
  (Wu & Johnson, 2021).

Figures: :mod:`bn_jax.analysis.plotting` (imported on demand; matplotlib).
This package sits at the top of the layering: nothing in bn_jax imports it
except train.py and experiment scripts.
"""
from bn_jax.analysis._trees import to_python, tree_l2
from bn_jax.analysis.activations import (DEFAULT_PERCENTILES,
                                         ActivationTracker,
                                         activation_percentiles,
                                         capture_preactivations,
                                         preactivation_moments,
                                         preactivations, unit_moments)
from bn_jax.analysis.consistency import statistics_consistency
from bn_jax.analysis.ics import (internal_covariate_shift, optax_update_fn,
                                 sgd_update_fn)
from bn_jax.analysis.landscape import geometric_step_sizes, landscape_probe
from bn_jax.analysis.loss_fns import cross_entropy_sums, make_loss_fn

__all__ = [
    "to_python", "tree_l2",
    "DEFAULT_PERCENTILES", "ActivationTracker", "activation_percentiles",
    "capture_preactivations", "preactivation_moments", "preactivations",
    "unit_moments",
    "statistics_consistency",
    "internal_covariate_shift", "optax_update_fn", "sgd_update_fn",
    "geometric_step_sizes", "landscape_probe",
    "cross_entropy_sums", "make_loss_fn",
]
