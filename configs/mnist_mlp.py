"""BN paper, section 4.1: 3x100 sigmoid MLP on MNIST, batch 60, SGD.

The paper trains 50,000 steps and compares with/without BN (Figure 1(a));
its learning rate is not stated (0.5 here, plain SGD, configurable).
MNIST comes from ``config.data_dir`` (the standard files) or tfds.

Tiny setting for tests: ``--config.num_train_steps=5
--config.model_kwargs.hidden=(16,16) --config.dataset=digits``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "mnist"
  config.model = "mlp"
  config.model_kwargs = ml_collections.ConfigDict(
      dict(hidden=(100, 100, 100), activation="sigmoid"))
  config.norms = ("none", "bn")
  config.batch_size = 60
  config.eval_batch_size = 1000
  config.num_train_steps = 50_000
  config.optimizer = "sgd"
  config.learning_rate = 0.5
  config.momentum = 0.0
  config.schedule = "constant"
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 5000
  # BN paper Fig. 1(b,c): percentiles of a last-layer sigmoid input.
  config.analysis = ("percentiles",)
  config.analysis_every = 500
  return config
