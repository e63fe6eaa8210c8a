"""CBN paper (Yao et al., 2021) in miniature: small batches per iteration.

ResNet-20 on CIFAR-10 at batch 4 per step, comparing BN, batch
renormalization, group normalization and CBN (window k=4: the current batch
plus 3 compensated past ones; plain BN for the burn-in). The paper's
ImageNet setting is ResNet-18 with k=8; use configs/cifar10_resnet18.py with
``--config.norms="('bn','cbn')" --config.batch_size=4`` for that backbone.

Tiny setting for tests: ``--config.num_train_steps=3
--config.model_kwargs.width=4 --config.dataset=digits``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "cifar10"
  config.augment = True
  config.model = "resnet20"
  config.model_kwargs = ml_collections.ConfigDict(dict(width=16))
  config.norms = ("bn", "brn", "gn", "cbn")
  config.norm_kwargs.cbn.update(window=4, burn_in=10_000)
  config.norm_kwargs.gn.update(num_groups=8)
  config.batch_size = 4
  config.eval_batch_size = 500
  config.num_train_steps = 60_000
  config.optimizer = "sgd"
  config.learning_rate = 0.1 * 4 / 128  # linear scaling from batch 128
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.warmup_steps = 1000
  config.log_every = 200
  config.eval_every = 5000
  config.checkpoint_every = 5000
  return config
