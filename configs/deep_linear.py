"""Santurkar et al. (2018): a deep linear network on synthetic Gaussian data.

Data (``dataset='synthetic_gaussian'``, generated in memory, no download):
inputs x ~ N(0, I_64), labels from a fixed random linear teacher
argmax(x W), 10 classes (see ``bn_jax/training/synthetic_data.py``). Model:
25 linear layers of width 100 (the paper's depth ~25; width unverified),
with and without BN. ICS is measured every ``analysis_every`` steps (the
paper finds BN can increase it in the DLN).

Tiny setting for tests: ``--config.num_train_steps=3
--config.model_kwargs.depth=3 --config.model_kwargs.width=8``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "synthetic_gaussian"
  config.synthetic = ml_collections.ConfigDict(dict(
      num_train=8192, num_test=2048, dim=64, num_classes=10, noise=0.0))
  config.model = "deep_linear"
  config.model_kwargs = ml_collections.ConfigDict(dict(depth=25, width=100))
  config.norms = ("none", "bn")
  config.batch_size = 128
  config.eval_batch_size = 1024
  config.num_train_steps = 3000
  config.optimizer = "sgd"
  config.learning_rate = 0.01
  config.momentum = 0.0
  config.schedule = "constant"
  config.log_every = 50
  config.eval_every = 250
  config.checkpoint_every = 1000
  config.analysis = ("ics",)
  config.analysis_every = 250
  return config
