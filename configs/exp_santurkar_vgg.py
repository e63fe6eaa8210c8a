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
import os
import runpy

import ml_collections

_SHARED = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "exp_common.py"))


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  return _SHARED["santurkar_vgg_config"](
      scale, norms=("none", "bn", "noisy_bn"),
      ics_norms=("none", "bn", "noisy_bn"), landscape_norms=("none", "bn"),
      noise=ml_collections.ConfigDict(dict(
          noise_mean_range=(-1.0, 1.0), noise_std_range=(0.5, 1.5))))
