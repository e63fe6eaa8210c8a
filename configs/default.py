"""Default: two papers' stories in miniature, on 8x8 digits (no download).

``python train.py`` runs this. A 3x100 sigmoid MLP (BN paper, section 4.1)
trained with plain SGD at a constant learning rate, in two parts, one
results table and one figure:

- ``bn_paper`` (batch 16, lr 0.5, 2000 steps): no normalization vs BN, the
  BN paper's MNIST experiment in miniature.
- ``small_batch`` (batch 2, lr 0.1, 3000 steps): BN vs CBN vs naive CBN vs
  GN, the Cross-Iteration BN paper's story: BN's statistics over 2 samples
  are noise; CBN (Yao et al. 2021) averages them over a window of 8
  iterations, compensated for the weight change (plain BN during a 300-step
  burn-in); naive CBN uses the past statistics uncompensated; GN does not
  depend on the batch.

Each evaluation reports test accuracy with the EMA running statistics and,
side by side, with PreciseBN population statistics (1024 training samples in
batches of 128, the weights frozen; Wu & Johnson 2021, and the BN paper's own
inference procedure, Algorithm 2). ``--config.precise_bn_samples=0`` turns
the second column off. Override a part's setting with e.g.
``--config.parts.small_batch.learning_rate=0.05``.

Tiny setting for tests: ``--config.num_train_steps=20
--config.model_kwargs.hidden=(16,16) --config.parts.small_batch.num_train_steps=20``.
"""
import ml_collections

from bn_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset = "digits"
  config.model = "mlp"
  config.model_kwargs = ml_collections.ConfigDict(
      dict(hidden=(100, 100, 100), activation="sigmoid"))
  config.norms = ("none", "bn")

  config.batch_size = 16
  config.eval_batch_size = 360
  config.num_train_steps = 2000
  config.optimizer = "sgd"
  config.learning_rate = 0.5
  config.momentum = 0.0
  config.schedule = "constant"

  config.log_every = 50
  config.eval_every = 100
  config.precise_bn_samples = 1024
  config.precise_bn_batch_size = 128
  config.checkpoint_every = 1000

  config.parts = ml_collections.ConfigDict(dict(
      bn_paper=dict(),  # the settings above
      small_batch=dict(
          norms=("bn", "cbn", "naive_cbn", "gn"),
          batch_size=2, learning_rate=0.1, num_train_steps=3000,
          log_every=100, eval_every=250, checkpoint_every=1500,
          norm_kwargs=dict(cbn=dict(window=8, burn_in=300),
                           naive_cbn=dict(window=8, burn_in=300),
                           gn=dict(num_groups=10))),
  ))
  return config
