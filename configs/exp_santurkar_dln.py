"""Experiment 3b: Santurkar et al. (2018), ICS of a deep linear network.

A deep linear network (``bn_jax.models`` 'deep_linear': 25 weight matrices of
width 100, no nonlinearity) on synthetic Gaussian data (inputs N(0, I_64),
labels argmax of a fixed random linear teacher, 10 classes), with and without
BN between the layers; ICS (Def. 2.1) and the landscape probes at
``num_points`` steps (``experiments/santurkar_dln.py``).

The paper's depth is ~25 and its width/data are unverified (PAPERS.md):
configurable. The DLN is cheap: cpu and paper scale differ only in length.
"""
import ml_collections


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  if scale not in ("cpu", "paper"):
    raise ValueError(f"scale must be 'cpu' or 'paper', got {scale!r}.")
  cpu = scale == "cpu"
  c = ml_collections.ConfigDict()
  c.scale = scale
  c.data_dir = ""
  c.synthetic = ml_collections.ConfigDict(dict(
      num_train=8192, num_test=2048, dim=64, num_classes=10, noise=0.0))
  c.norms = ("none", "bn")
  c.model_kwargs = ml_collections.ConfigDict(dict(depth=25, width=100))
  c.train_subset = 0
  c.test_subset = 0
  c.batch_size = 128
  c.eval_batch_size = 1024
  c.num_train_steps = 2000 if cpu else 10_000
  c.learning_rate = 0.01
  c.momentum = 0.0
  c.weight_decay = 0.0
  c.schedule = "constant"
  c.decay_boundaries = (0.5, 0.75)
  c.seed = 0
  c.chunk_steps = 100
  c.scan = True                 # dense layers only: scanned chunks are fast
  c.analysis_method = "map"
  c.num_points = 6 if cpu else 21
  c.probe_size = 512
  c.tracked_layers = (2, -1)
  c.step_size_range = (0.25, 4.0)
  c.num_step_sizes = 5
  return c
