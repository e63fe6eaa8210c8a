"""Experiment 5: Rethinking "Batch" in BatchNorm (Wu & Johnson, 2021).

Run by ``experiments/rethinking_batch.py``; ``get_config('cpu')`` (default)
is the reduced scale (~10 minutes on 2 shared CPU cores),
``get_config('paper')`` a ResNet setting for a GPU.

Two parts:

A. EMA vs PreciseBN vs batch statistics over training, for several EMA
   momenta (``ema_momenta``; flax convention: weight of the OLD value, so
   0.999 averages over ~1000 steps). The weights do not depend on the EMA
   momentum (training normalizes with batch statistics), so the runs differ
   only in their running statistics. Evaluated at ``eval_steps``.
B. Normalization batch size: total batch ``batch_size`` split into ghost
   batches of ``ghost_batch_sizes`` (``ghost_batch_size = batch_size`` is
   plain BN); test accuracy with EMA / PreciseBN / batch (ghost) statistics
   and the train-test gap.

CPU scale: the BN paper's MLP shape (3 hidden layers of 100, here ReLU) on
Fashion-MNIST: a batch-statistics layer of an MLP normalizes each feature over
the batch samples only (a conv layer also pools H x W positions), so the
normalization batch size effects are strongest there, and a step costs ~1 ms,
so the momentum and ghost sweeps fit many evaluations in ~10 minutes.
"""
import os
import runpy

import ml_collections

_SHARED = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "exp_common.py"))


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  c = _SHARED["new_config"](scale, dataset="fashion_mnist")
  c.train_subset = 0            # > 0: first N training examples only
  c.augment = False
  c.eval_batch_size = 128       # full batches only (batch-statistics mode)
  c.train_eval_examples = 9984  # train subset for the train-mode/eval-mode gap

  # Model: bn_jax.models.create_model(model, **model_kwargs).
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict(
      dict(hidden=(100, 100, 100), activation="relu"))

  # Optimization (shared by both parts).
  c.batch_size = 128
  c.num_train_steps = 2000
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.warmup_steps = 0
  c.schedule = "cosine"

  # PreciseBN: batches of batch_size from the training set (weights frozen).
  c.precise_bn_batches = 40     # 5120 samples (paper: 1e3-1e4 suffice)

  # Part A.
  c.ema_momenta = (0.9, 0.99, 0.999)
  c.eval_steps = (0, 10, 20, 50, 100, 200, 500, 1000, 1500, 2000)

  # Part B (norm 'ghost', momentum ghost_momentum).
  c.ghost_batch_sizes = (2, 4, 8, 16, 32, 128)
  c.ghost_momentum = 0.99

  c.log_every = 100

  if scale == "paper":
    # Wu & Johnson use ResNet-50 on ImageNet; on one GPU: the CIFAR ResNet-20
    # on CIFAR-10, batch 128, 160 epochs' worth of steps.
    c.dataset = "cifar10"
    c.augment = True
    c.model = "resnet20"
    c.model_kwargs = ml_collections.ConfigDict(dict(width=16))
    c.num_train_steps = 62_400
    c.weight_decay = 1e-4
    c.warmup_steps = 390
    c.precise_bn_batches = 80   # 10240 samples
    c.eval_steps = (0, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000,
                    40_000, 62_400)
    c.ghost_batch_sizes = (2, 4, 8, 16, 32, 64, 128)
    c.log_every = 500
  return c
