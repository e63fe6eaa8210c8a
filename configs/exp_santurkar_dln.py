"""Experiment 3b: Santurkar et al. (2018), ICS of a deep linear network.

A deep linear network (``bn_jax.models`` 'deep_linear': 25 weight matrices of
width 100, no nonlinearity) on synthetic Gaussian data (inputs N(0, I_64),
labels argmax of a fixed random linear teacher, 10 classes), with and without
BN between the layers; ICS (Def. 2.1) and the landscape probes at
``num_points`` steps (``experiments/santurkar_dln.py``).

The paper's depth is ~25 and its width/data are unverified (PAPERS.md):
configurable. The DLN is cheap: cpu and paper scale differ only in length.
"""
import os
import runpy

import ml_collections

_SHARED = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "exp_common.py"))


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  cpu = scale == "cpu"
  return _SHARED["santurkar_config"](
      scale, synthetic=ml_collections.ConfigDict(dict(
          num_train=8192, num_test=2048, dim=64, num_classes=10, noise=0.0)),
      norms=("none", "bn"),
      model_kwargs=ml_collections.ConfigDict(dict(depth=25, width=100)),
      batch_size=128, eval_batch_size=1024,
      num_train_steps=2000 if cpu else 10_000, learning_rate=0.01,
      momentum=0.0, weight_decay=0.0, chunk_steps=100,
      scan=True,  # dense layers only: scanned chunks are fast
      analysis_method="map", num_points=6 if cpu else 21, probe_size=512)
