"""Experiment 3c: Santurkar et al. (2018), l_p normalization vs BN.

VGG-11 on CIFAR-10 with BN and with l_p batch normalization (BN's standard
deviation replaced by the average l_p norm of the centred activations,
p = 1, 2, inf; ``bn_jax.nn.LpNorm``), same scale and recipe as
``configs/exp_santurkar_vgg.py`` (``experiments/santurkar_lp.py``). Reports
test accuracy and how Gaussian the pre-activations are (excess kurtosis,
0 for a Gaussian) -- the paper: l_p-normalized networks train as well as or
better than BN without Gaussian-like distributions.
"""
import os
import runpy

import ml_collections

_SHARED = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "exp_common.py"))


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  return _SHARED["santurkar_vgg_config"](
      scale, include_bn=True, ps=(1.0, 2.0, float("inf")))
