"""Default: the BN paper's MLP experiment in miniature, on 8x8 digits.

``python train.py`` runs this: no download (scikit-learn's digits ship with
it), a few seconds per norm on a laptop CPU. A 3x100 sigmoid MLP (BN paper,
section 4.1) trained with plain SGD at a small batch, with no normalization,
BN, and CBN (cross-iteration BN: statistics over a window of recent batches,
compensated for the weight change; plain BN during the burn-in).

Each evaluation reports test accuracy with the EMA running statistics and,
side by side, with PreciseBN population statistics (20 training batches, the
weights frozen; the BN paper's own inference procedure, Algorithm 2): at this
learning rate the EMA statistics lag the fast-moving weights, most visibly
for CBN. ``--config.precise_bn_batches=0`` turns the second column off.

Tiny setting for tests: ``--config.num_train_steps=20
--config.model_kwargs.hidden=(16,16)``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "digits"
  config.model = "mlp"
  config.model_kwargs = ml_collections.ConfigDict(
      dict(hidden=(100, 100, 100), activation="sigmoid"))
  config.norms = ("none", "bn", "cbn")
  config.norm_kwargs = ml_collections.ConfigDict(
      dict(cbn=dict(window=4, burn_in=200)))

  config.batch_size = 16
  config.eval_batch_size = 360
  config.num_train_steps = 2000
  config.optimizer = "sgd"
  config.learning_rate = 0.5
  config.momentum = 0.0
  config.schedule = "constant"

  config.log_every = 50
  config.eval_every = 100
  config.precise_bn_batches = 20
  config.checkpoint_every = 1000
  return config
