"""Experiment 3a: Santurkar et al. (2018), VGG on CIFAR-10.

Standard vs BN vs noisy BN; accuracy, pre-activation distribution stability,
ICS (Def. 2.1) and the loss landscape along the gradient at ``num_points``
steps (``experiments/santurkar_vgg.py``).

cpu scale (measured to fit ~10 minutes on a shared 2-core CPU, where one
step of VGG-11/4 at batch 128 took 0.7 s): VGG-11 at an eighth of the width
(8..64 channels), a fixed random 10,000-image subset of the CIFAR-10 training
set, no augmentation, batch 64, 800 steps (~5 epochs of the subset); test
accuracy on a fixed 2,000-image subset of the test set.
paper scale (GPU): full-width VGG-11, all 50,000 images, 40 epochs with
augmentation off as here (the paper's own recipe details are unverified in
PAPERS.md), 20 measurement points.

Choices PAPERS.md marks unverified or that the paper does not fix
(configurable): learning rate 0.05 with momentum 0.9 (the paper compares
several rates), weight decay 5e-4, the noise ranges of noisy BN (the
library's defaults: per-feature mean ~ U(-1, 1), std ~ U(0.5, 1.5), redrawn
every step), the landscape step sizes (``step_size_range`` times the
learning rate, ``num_step_sizes`` geometric points).
"""
import ml_collections


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  if scale not in ("cpu", "paper"):
    raise ValueError(f"scale must be 'cpu' or 'paper', got {scale!r}.")
  cpu = scale == "cpu"
  c = ml_collections.ConfigDict()
  c.scale = scale
  c.dataset = "cifar10"         # 'digits' for the smoke test
  c.data_dir = ""
  c.norms = ("none", "bn", "noisy_bn")
  c.landscape_norms = ("none", "bn")
  c.model_kwargs = ml_collections.ConfigDict(dict(
      variant="vgg11", width_multiplier=0.125 if cpu else 1.0))
  c.noise = ml_collections.ConfigDict(dict(
      noise_mean_range=(-1.0, 1.0), noise_std_range=(0.5, 1.5)))
  c.train_subset = 10_000 if cpu else 0     # 0 = all 50,000
  c.test_subset = 2_000 if cpu else 0       # 0 = all 10,000
  c.batch_size = 64 if cpu else 128
  c.eval_batch_size = 500
  c.num_train_steps = 800 if cpu else 15_600  # paper: 40 epochs of 390
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.schedule = "constant"
  c.decay_boundaries = (0.5, 0.75)
  c.seed = 0
  c.chunk_steps = 50
  # One jitted step per dispatch and vmapped instruments: XLA:CPU runs convs
  # inside loops (lax.scan / lax.map) ~100x slower (bn_santurkar_lib.Run).
  c.scan = False
  c.analysis_method = "vmap"
  c.num_points = 5 if cpu else 20
  c.probe_size = 256
  c.tracked_layers = (2, -1)   # 3rd conv layer and the last one
  c.step_size_range = (0.25, 4.0)
  c.num_step_sizes = 5
  return c
