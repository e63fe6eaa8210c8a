"""Santurkar et al. (2018): VGG on CIFAR-10 with and without BN.

SGD with momentum, step decay, standard augmentation. The ICS and landscape
instruments run every ``analysis_every`` steps (set ``analysis=()`` to skip).

Tiny setting for tests: ``--config.num_train_steps=2
--config.model_kwargs.width_multiplier=0.125 --config.batch_size=8``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "cifar10"
  config.augment = True
  config.model = "vgg"
  config.model_kwargs = ml_collections.ConfigDict(
      dict(variant="vgg11", width_multiplier=1.0))
  config.norms = ("none", "bn")
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 40.0
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.schedule = "step"
  config.decay_boundaries = (0.5, 0.75)
  config.decay_factor = 0.1
  config.log_every = 100
  config.eval_every = 390
  config.checkpoint_every = 390
  config.analysis = ("ics", "landscape")
  config.analysis_every = 1000
  return config
