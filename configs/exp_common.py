"""Settings the experiment configs (``configs/exp_*.py``) share.

Not a config itself (no ``get_config``). The config files are loaded by path
(``ml_collections.config_flags``, the tests), not imported as a package, so
each loads this file by path too::

  shared = runpy.run_path(os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "exp_common.py"))
  c = shared["new_config"](scale, dataset="mnist")
"""
import ml_collections

SCALES = ("cpu", "paper")


def new_config(scale: str, **fields) -> ml_collections.ConfigDict:
  """A config for ``scale`` (``'cpu'``: the reduced CPU setting, ``'paper'``:
  the paper's scale) with ``scale``, ``seed = 0``, ``data_dir = ''``
  (bn_jax.data's default, ``../shared/data``) and ``fields``."""
  if scale not in SCALES:
    raise ValueError(f"scale must be 'cpu' or 'paper', got {scale!r}.")
  c = ml_collections.ConfigDict()
  c.scale = scale
  c.seed = 0
  c.data_dir = ""
  c.update(fields)
  return c


def bn_paper_mlp_config(scale: str, **fields) -> ml_collections.ConfigDict:
  """The BN paper's MNIST network and SGD (exp_bn_mnist, exp_bn_lr): 3
  hidden layers of 100, N(0, 0.1^2) initial weights, batch 60, plain SGD
  (no momentum), ``chunk_steps`` training steps between measurements."""
  return new_config(scale, dataset="mnist", hidden=(100, 100, 100),
                    kernel_init_std=0.1, batch_size=60, momentum=0.0,
                    chunk_steps=250, **fields)


def santurkar_config(scale: str, **fields) -> ml_collections.ConfigDict:
  """What the Santurkar et al. configs (exp_santurkar_{vgg,lp,dln}) share:
  whole datasets unless ``train_subset``/``test_subset`` > 0, a constant
  learning rate (``decay_boundaries`` only for ``schedule='step'``), and
  the measurements: activation trackers on the 3rd and the last layer, the
  landscape probe at ``num_step_sizes`` geometric step sizes in
  ``step_size_range`` times the learning rate."""
  defaults = dict(train_subset=0, test_subset=0, schedule="constant",
                  decay_boundaries=(0.5, 0.75), tracked_layers=(2, -1),
                  step_size_range=(0.25, 4.0), num_step_sizes=5)
  return new_config(scale, **{**defaults, **fields})


def santurkar_vgg_config(scale: str, **fields) -> ml_collections.ConfigDict:
  """The CIFAR-10 VGG recipe of exp_santurkar_{vgg,lp,noise} (see
  exp_santurkar_vgg's docstring for the choices).

  cpu: VGG-11 at an eighth of the width on a fixed random 10,000-image
  training subset (2,000 test images), batch 64, 800 steps, 5 measurement
  points; paper: full width, all images, batch 128, 15,600 steps (40 epochs
  of 390), 20 points. Conv nets train one jitted step per dispatch
  (``scan=False``) with vmapped instruments: XLA:CPU runs convolutions inside
  loops (lax.scan / lax.map) ~100x slower (bn_jax.training.loop.Trainer).
  """
  cpu = scale == "cpu"
  return santurkar_config(
      scale, dataset="cifar10",  # 'digits' for the smoke tests
      model_kwargs=ml_collections.ConfigDict(dict(
          variant="vgg11", width_multiplier=0.125 if cpu else 1.0)),
      train_subset=10_000 if cpu else 0, test_subset=2_000 if cpu else 0,
      batch_size=64 if cpu else 128, eval_batch_size=500,
      num_train_steps=800 if cpu else 15_600, learning_rate=0.05,
      momentum=0.9, weight_decay=5e-4, chunk_steps=50, scan=False,
      analysis_method="vmap", num_points=5 if cpu else 20, probe_size=256,
      **fields)
