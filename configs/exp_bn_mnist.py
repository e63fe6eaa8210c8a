"""Experiment 1: BN paper (Ioffe & Szegedy 2015), Section 4.1, Figure 1.

3 fully connected hidden layers of 100 sigmoid units on MNIST, batch 60,
50,000 SGD steps, with and without BN (``experiments/bn_mnist.py``).

Both scales are the paper's scale: the MLP is tiny and the scanned training
loop of ``experiments/bn_santurkar_lib.py`` runs 50k steps in about a minute
per run on one CPU core, so nothing is reduced on CPU.

Not stated in the paper (documented choices, configurable): the learning rate
(0.5, plain SGD, constant), the initial weight scale ("small random Gaussian":
N(0, 0.1^2) for every weight matrix), which unit is "typical" (``unit``), and
on which examples the percentiles are taken (``probe_size`` fixed test
images, the network in training mode -- BN normalizes by the probe set's
statistics -- and also, stored in the JSON, in inference mode).
"""
import ml_collections


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  if scale not in ("cpu", "paper"):
    raise ValueError(f"scale must be 'cpu' or 'paper', got {scale!r}.")
  c = ml_collections.ConfigDict()
  c.scale = scale
  c.dataset = "mnist"
  c.data_dir = ""
  c.norms = ("none", "bn")
  c.hidden = (100, 100, 100)
  c.activation = "sigmoid"
  c.kernel_init_std = 0.1
  c.batch_size = 60
  c.num_train_steps = 50_000
  c.learning_rate = 0.5
  c.momentum = 0.0
  c.seed = 0
  # Measurements: test accuracy every eval_every steps, percentiles of the
  # last hidden layer's sigmoid input `unit` every chunk_steps steps.
  c.chunk_steps = 250
  c.eval_every = 500
  c.unit = 0
  c.probe_size = 1000
  return c
