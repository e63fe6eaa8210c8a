"""ResNet-18 (CIFAR variant: 3x3 stem, no max-pool) on CIFAR-10.

The CBN paper's backbone. SGD momentum 0.9, lr 0.1, cosine, weight decay
5e-4, batch 128, augmentation. ``--config.data_parallel=True`` splits the
batch over all local devices with SyncBN.

Tiny setting for tests: ``--config.num_train_steps=2
--config.model_kwargs.width=4 --config.batch_size=8``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "cifar10"
  config.augment = True
  config.model = "resnet18"
  config.model_kwargs = ml_collections.ConfigDict(dict(width=64))
  config.norms = ("bn",)
  config.norm_kwargs = ml_collections.ConfigDict(
      dict(gn=dict(num_groups=32), cbn=dict(window=8, burn_in=5000)))
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 100.0
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.schedule = "cosine"
  config.warmup_steps = 390
  config.half_precision = False
  config.log_every = 100
  config.eval_every = 390
  config.checkpoint_every = 390
  return config
