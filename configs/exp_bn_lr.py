"""Experiment 2: BN paper (Ioffe & Szegedy 2015), Sec. 4.2.2, learning rates.

The paper's ImageNet/Inception comparison (Inception, BN-Baseline, BN-x5,
BN-x30, BN-x5-Sigmoid; steps to reach Inception's best accuracy, and each
network's best accuracy) is an ImageNet-scale experiment we cannot run. We
transfer its PROTOCOL to the MNIST MLP of experiment 1
(``experiments/bn_learning_rates.py``):

* the baseline "Inception" is the 3x100 MLP with ReLU (Inception uses ReLU)
  and no BN at a base learning rate; "BN-Baseline" adds BN at the same rate;
  "BN-x5"/"BN-x30" multiply the rate by 5/30; "BN-x5-Sigmoid" uses sigmoid
  units; "Sigmoid, no BN, x5" is the paper's remark that Inception with
  sigmoid and no BN does not train; "no BN x5/x30" are our controls (does the
  higher rate need BN?);
* the target accuracy is the baseline's best test accuracy (the paper's
  72.2% was Inception's best), measured every ``eval_every`` steps.

``runs`` entries are ``'<norm>/<activation>/x<learning-rate multiplier>'``.
Everything else as experiment 1: batch 60, plain SGD with a constant rate
(the paper also changed dropout, L2, decay and more with the higher rates;
we do not), N(0, 0.1^2) initial weights. The base rate 0.05 is ours
(the paper's Inception rate does not transfer to an MLP).

Scale: cpu = 20,000 steps per run (8 runs); paper = 50,000 steps (the
MNIST experiment's length; the Inception runs were millions of steps).
"""
import os
import runpy

import ml_collections

_SHARED = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "exp_common.py"))


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  return _SHARED["bn_paper_mlp_config"](
      scale, runs=("none/relu/x1", "bn/relu/x1", "bn/relu/x5", "bn/relu/x30",
                   "bn/sigmoid/x5", "none/sigmoid/x5", "none/relu/x5",
                   "none/relu/x30"),
      baseline="none/relu/x1",
      num_train_steps=20_000 if scale == "cpu" else 50_000,
      base_learning_rate=0.05, eval_every=250)
