"""Small-batch CBN on the offline digits data (runs in seconds on a CPU).

The sigmoid MLP at batch 4 per step: BN's statistics over 4 samples are
noisy; CBN averages them over a window of 4 compensated iterations; GN and
LN do not depend on the batch. Tiny setting for tests:
``--config.num_train_steps=20 --config.model_kwargs.hidden=(16,16)``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "digits"
  config.model = "mlp"
  config.model_kwargs = ml_collections.ConfigDict(
      dict(hidden=(100, 100, 100), activation="sigmoid"))
  config.norms = ("bn", "cbn", "ln", "gn")
  config.norm_kwargs = ml_collections.ConfigDict(dict(
      cbn=dict(window=4, burn_in=300), gn=dict(num_groups=10)))
  config.batch_size = 4
  config.eval_batch_size = 360
  config.num_train_steps = 3000
  config.optimizer = "sgd"
  config.learning_rate = 0.2
  config.momentum = 0.0
  config.log_every = 100
  config.eval_every = 250
  config.checkpoint_every = 1500
  return config
