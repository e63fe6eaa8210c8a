"""ResNet-20 (He et al., 2016, CIFAR variant) on CIFAR-10.

SGD momentum 0.9, lr 0.1 with warm-up and cosine decay, weight decay 1e-4,
batch 128, augmentation. Set ``norms`` to compare (e.g. ``('bn','gn','cbn')``).

Tiny setting for tests: ``--config.num_train_steps=2
--config.model_kwargs.width=4 --config.batch_size=8``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "cifar10"
  config.augment = True
  config.model = "resnet20"
  config.model_kwargs = ml_collections.ConfigDict(dict(width=16))
  config.norms = ("bn",)
  config.norm_kwargs.gn.update(num_groups=8)
  config.norm_kwargs.cbn.update(window=4, burn_in=2000)
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 160.0
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.warmup_steps = 390
  config.log_every = 100
  config.eval_every = 390
  config.checkpoint_every = 390
  return config
