"""Experiment 1: BN paper (Ioffe & Szegedy 2015), Section 4.1, Figure 1.

3 fully connected hidden layers of 100 sigmoid units on MNIST, batch 60,
50,000 SGD steps, with and without BN (``experiments/bn_mnist.py``).

Both scales are the paper's scale: the MLP is tiny and the scanned training
loop of ``bn_jax.training.loop.Trainer`` runs 50k steps in about a minute
per run on one CPU core, so nothing is reduced on CPU.

Not stated in the paper (documented choices, configurable): the learning rate
(0.5, plain SGD, constant), the initial weight scale ("small random Gaussian":
N(0, 0.1^2) for every weight matrix), which unit is "typical" (``unit``), and
on which examples the percentiles are taken (``probe_size`` fixed test
images, the network in training mode -- BN normalizes by the probe set's
statistics -- and also, stored in the JSON, in inference mode).
"""
import os
import runpy

import ml_collections

_SHARED = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "exp_common.py"))


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  # Measurements: test accuracy every eval_every steps, percentiles of the
  # last hidden layer's sigmoid input `unit` every chunk_steps steps.
  return _SHARED["bn_paper_mlp_config"](
      scale, norms=("none", "bn"), activation="sigmoid",
      num_train_steps=50_000, learning_rate=0.5, eval_every=500, unit=0,
      probe_size=1000)
