"""Experiment 3c: Santurkar et al. (2018), l_p normalization vs BN.

VGG-11 on CIFAR-10 with BN and with l_p batch normalization (BN's standard
deviation replaced by the average l_p norm of the centred activations,
p = 1, 2, inf; ``bn_jax.nn.LpNorm``), same scale and recipe as
``configs/exp_santurkar_vgg.py`` (``experiments/santurkar_lp.py``). Reports
test accuracy and how Gaussian the pre-activations are (excess kurtosis,
0 for a Gaussian) -- the paper: l_p-normalized networks train as well as or
better than BN without Gaussian-like distributions.
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
  c.include_bn = True
  c.ps = (1.0, 2.0, float("inf"))
  c.model_kwargs = ml_collections.ConfigDict(dict(
      variant="vgg11", width_multiplier=0.125 if cpu else 1.0))
  c.train_subset = 10_000 if cpu else 0
  c.test_subset = 2_000 if cpu else 0
  c.batch_size = 64 if cpu else 128
  c.eval_batch_size = 500
  c.num_train_steps = 800 if cpu else 15_600
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.schedule = "constant"
  c.decay_boundaries = (0.5, 0.75)
  c.seed = 0
  c.chunk_steps = 50
  c.scan = False
  c.analysis_method = "vmap"
  c.num_points = 5 if cpu else 20
  c.probe_size = 256
  c.tracked_layers = (2, -1)
  c.step_size_range = (0.25, 4.0)
  c.num_step_sizes = 5
  return c
