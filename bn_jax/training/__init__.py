"""bn_jax.training: the pieces ``train.py`` is built from.

* :mod:`~bn_jax.training.config_validation`: the config keys
  (:func:`base_config`) and :func:`validate_config`.
* :mod:`~bn_jax.training.train_state`: :class:`TrainState` (params,
  batch_stats, opt_state, step, rng), :func:`create_train_state`.
* :mod:`~bn_jax.training.optim`: optax optimizers and schedules.
* :mod:`~bn_jax.training.steps`: ``train_step`` / ``eval_step``.
* :mod:`~bn_jax.training.loop`: the training loop (``train_loop``,
  ``Trainer``, ``create_state``, ``evaluate``, ``precise_bn_state``), used by
  ``train.py`` and every experiment.
* :mod:`~bn_jax.training.parallel`: data parallelism with SyncBN.
* :mod:`~bn_jax.training.checkpoint`: orbax checkpoints.
* :mod:`~bn_jax.training.metrics`, :mod:`~bn_jax.training.plots`: JSON lines,
  TensorBoard (tensorboardX), results table, matplotlib curves.
* :mod:`~bn_jax.training.input_pipeline`,
  :mod:`~bn_jax.training.synthetic_data`: data for training.

The analysis instruments are called from ``train.py`` through
:mod:`bn_jax.analysis.training_hooks` (analysis sits above training).
"""
from bn_jax.training.steps import eval_step, train_step
from bn_jax.training.train_state import (TrainingDiverged, TrainState,
                                         create_train_state)


def __getattr__(name):
  # The config (ml_collections, an extra) is imported when first asked for:
  # `bn_jax.training.steps` (whose cross_entropy_sums the analysis
  # instruments use) needs only the library's dependencies.
  if name in ("base_config", "validate_config"):
    from bn_jax.training import config_validation
    return getattr(config_validation, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "base_config", "validate_config", "eval_step", "train_step",
    "TrainingDiverged", "TrainState", "create_train_state",
]
