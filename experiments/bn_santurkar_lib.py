"""Shared pieces of the BN-paper and Santurkar et al. experiment scripts.

Used by ``experiments/bn_mnist.py``, ``bn_learning_rates.py`` and
``santurkar_{vgg,dln,lp}.py``. Everything here is glue over the library:

* the model is ``bn_jax.models.create_model``, the optimizer and schedule
  ``bn_jax.training.optim``, the state ``bn_jax.training.create_train_state``,
  the step ``bn_jax.training.train_step`` / ``eval_step``, the data
  ``bn_jax.training.input_pipeline`` (itself over ``bn_jax.data``);
* what is added is speed: :class:`Run` stacks ``chunk`` training batches and
  runs them in ONE jitted ``lax.scan`` of the library's ``train_step``, so a
  tiny model (the BN paper's 3x100 MLP, ~0.1 ms of math per step) is not
  dominated by Python dispatch; measurements happen between chunks.

The command line of every script is the same::

  python experiments/<name>.py [--workdir DIR] [--scale cpu|paper] \
      [--config.key=value ...]

``--scale`` picks ``get_config(scale)`` of the script's config file
(``configs/exp_<name>.py``); ``--config.key=value`` overrides after that.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python experiments/x.py` from anywhere
  sys.path.insert(0, _REPO)

from bn_jax.models import create_model  # noqa: E402
from bn_jax.training import (create_train_state, eval_step,  # noqa: E402
                             input_pipeline, optim, train_step)

SCALES = ("cpu", "paper")


# ---------------------------------------------------------------------------
# Command line: --workdir, --scale, --config (a config file with
# get_config(scale)).

def scale_from_argv(argv) -> str:
  """The ``--scale`` value in ``argv`` (read before absl parses the config
  flag, whose default ``<file>:<scale>`` depends on it)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--scale="):
      value = arg.split("=", 1)[1]
    elif arg == "--scale" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    if value not in SCALES:
      raise SystemExit(f"--scale must be one of {SCALES}, got {value!r}.")
    return value
  return "cpu"


def define_flags(name: str, config_file: str):
  """Defines --workdir, --scale and --config (``config_file:<scale>``)."""
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", os.path.join(".", "workdir", "experiments",
                                              name),
                      "Output directory (plots, results.json, metrics).")
  flags.DEFINE_enum("scale", "cpu", list(SCALES),
                    "cpu: the reduced CPU setting; paper: the paper's scale "
                    "(meant for an accelerator).")
  config_flags.DEFINE_config_file(
      "config", f"{config_file}:{scale_from_argv(sys.argv)}",
      "Experiment config; override fields with --config.<key>=<value>.",
      lock_config=True)
  return flags.FLAGS


def config_path(name: str) -> str:
  return os.path.join(_REPO, "configs", name)


# ---------------------------------------------------------------------------
# A training run whose steps run in scanned chunks.

class TrainSettings:
  """What ``bn_jax.training.optim`` reads from a config, as an object.

  Built from the experiment config so that one experiment can train several
  runs with different learning rates.
  """

  def __init__(self, *, learning_rate, optimizer="sgd", momentum=0.0,
               weight_decay=0.0, schedule="constant",
               decay_boundaries=(0.5, 0.75), decay_factor=0.1,
               warmup_steps=0, grad_clip_norm=0.0, nesterov=False,
               adam_b1=0.9, adam_b2=0.999):
    self.learning_rate = float(learning_rate)
    self.optimizer = optimizer
    self.momentum = float(momentum)
    self.weight_decay = float(weight_decay)
    self.schedule = schedule
    self.decay_boundaries = tuple(decay_boundaries)
    self.decay_factor = float(decay_factor)
    self.warmup_steps = int(warmup_steps)
    self.grad_clip_norm = float(grad_clip_norm)
    self.nesterov = bool(nesterov)
    self.adam_b1 = adam_b1
    self.adam_b2 = adam_b2


class DataSettings:
  """What ``bn_jax.training.input_pipeline`` reads from a config."""

  def __init__(self, *, dataset, batch_size, seed=0, augment=False,
               data_dir="", data_source="auto", eval_batch_size=1000,
               synthetic=None):
    self.dataset = dataset
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.augment = bool(augment)
    self.data_dir = data_dir
    self.data_source = data_source
    self.eval_batch_size = int(eval_batch_size)
    self.synthetic = synthetic or {}


def load_data(data: DataSettings):
  """``(train_ds, test_ds)`` through the library's input pipeline."""
  return input_pipeline.load_train_test(data)


def subset(ds, num: int, seed: int = 0):
  """The first ``num`` examples of a random permutation (fixed by seed) of an
  ArrayDataset / SyntheticDataset; ``num <= 0`` keeps everything.

  The per-channel normalization statistics stay those of the full train set.
  """
  if num <= 0 or num >= len(ds.labels):
    return ds
  index = np.sort(np.random.default_rng(seed).permutation(len(ds.labels))[
      :num])
  return ds._replace(images=ds.images[index], labels=ds.labels[index]) if (
      hasattr(ds, "_replace")) else _replace_dataclass(ds, index)


def _replace_dataclass(ds, index):
  import dataclasses
  return dataclasses.replace(ds, images=ds.images[index],
                             labels=ds.labels[index])


def stacked_batches(iterator: Iterator[dict], count: int) -> dict:
  """``count`` batches of ``iterator`` stacked on a new leading axis."""
  batches = [next(iterator) for _ in range(count)]
  return {k: np.stack([b[k] for b in batches]) for k in ("image", "label")}


def epoch_index_batches(num_examples: int, batch_size: int, *, seed: int,
                        start_step: int = 0) -> Iterator[np.ndarray]:
  """Endless example-index batches in the library's training order.

  Epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(N)`` cut into
  ``N // batch_size`` batches (remainder dropped): exactly the order of
  ``bn_jax.data.epoch_batches`` / ``input_pipeline.train_iterator`` without
  augmentation (tests/test_experiments_bn_santurkar.py checks it).
  """
  per_epoch = num_examples // batch_size
  if per_epoch < 1:
    raise ValueError(f"batch_size={batch_size} is larger than the "
                     f"{num_examples} training examples.")
  epoch, skip = divmod(start_step, per_epoch)
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    for k in range(skip, per_epoch):
      yield order[k * batch_size:(k + 1) * batch_size]
    skip = 0
    epoch += 1


def normalized_arrays(ds) -> tuple[jax.Array, jax.Array]:
  """All of ``ds`` normalized as in training (no augmentation), on device."""
  batch = next(input_pipeline.epoch_iterator(
      ds, len(ds.labels), seed=0, epoch=0, shuffle=False, augment=False,
      remainder="keep"))
  return jnp.asarray(batch["image"]), jnp.asarray(batch["label"])


class Run:
  """One model + optimizer trained in scanned chunks of steps.

  Without augmentation the whole (normalized) training set lives on the
  device and a chunk is only a ``[steps, batch]`` array of example indices
  (the library's order, :func:`epoch_index_batches`); with augmentation the
  chunk is ``steps`` stacked batches of ``input_pipeline.train_iterator``.

  Args:
    model: a flax module from ``create_model``.
    train: :class:`TrainSettings`.
    data: :class:`DataSettings`.
    train_ds, test_ds: datasets (``load_data``).
    num_train_steps: length of the schedule.
    seed: parameter init / noise seed.
    device_data: ``(images, labels)`` from :func:`normalized_arrays`, to
      share one device copy between runs (computed if None).
    scan: run a chunk as one ``lax.scan`` (best for tiny dense models).
      ``False`` dispatches one jitted step at a time: XLA:CPU runs
      convolutions inside a scanned loop ~100x slower than in a plain jitted
      step (measured: VGG-11/4 batch 128, 26 s vs ~0.3 s per step), so conv
      nets use ``scan=False``.
  """

  def __init__(self, model, train: TrainSettings, data: DataSettings,
               train_ds, test_ds, *, num_train_steps: int, seed: int = 0,
               device_data=None, scan: bool = True):
    self.model = model
    self.data = data
    self.train_ds, self.test_ds = train_ds, test_ds
    self.num_train_steps = int(num_train_steps)
    self.learning_rate_fn = optim.create_learning_rate_fn(
        train, self.num_train_steps)
    self.tx = optim.create_optimizer(train, self.learning_rate_fn)
    input_shape = (data.batch_size,) + tuple(train_ds.images.shape[1:])
    self.state = create_train_state(jax.random.PRNGKey(seed), model, self.tx,
                                    input_shape)
    self.step = 0
    self.on_device = not data.augment
    if self.on_device:
      self._images, self._labels = (device_data if device_data is not None
                                    else normalized_arrays(train_ds))
      self._batches = epoch_index_batches(len(train_ds.labels),
                                          data.batch_size, seed=data.seed)
    else:
      self._batches = input_pipeline.train_iterator(train_ds, data)
    step_fn = functools.partial(train_step,
                                learning_rate_fn=self.learning_rate_fn)

    def body(state, batch):
      state, metrics = step_fn(state, batch)
      return state, (metrics["loss"], metrics["accuracy"])

    @jax.jit
    def run_chunk(state, chunk):
      state, (losses, accs) = jax.lax.scan(body, state, chunk)
      return state, losses, accs

    @jax.jit
    def run_index_chunk(state, images, labels, indices):
      def indexed_body(state, index):
        return body(state, {"image": images[index], "label": labels[index]})
      state, (losses, accs) = jax.lax.scan(indexed_body, state, indices)
      return state, losses, accs

    @jax.jit
    def run_index_step(state, images, labels, index):
      return body(state, {"image": images[index], "label": labels[index]})

    self.scan = bool(scan)
    self._run_chunk = run_chunk
    self._run_index_chunk = run_index_chunk
    self._run_step = jax.jit(body)
    self._run_index_step = run_index_step
    self._eval_step = jax.jit(eval_step)
    self.train_seconds = 0.0
    self.timed_steps = 0
    self._compiled_for = set()
    self._eval_batches = {}

  def train(self, num_steps: int) -> dict:
    """Trains ``num_steps`` steps (one scan); returns mean loss/accuracy and
    whether everything stayed finite."""
    t0 = time.perf_counter()
    if not self.scan:
      state, metrics = self.state, []
      for _ in range(num_steps):
        if self.on_device:
          state, m = self._run_index_step(state, self._images, self._labels,
                                          jnp.asarray(next(self._batches)))
        else:
          batch = next(self._batches)
          state, m = self._run_step(state, {"image": batch["image"],
                                            "label": batch["label"]})
        metrics.append(m)
      losses, accs = (np.asarray(v) for v in zip(*jax.device_get(metrics)))
      num_steps_compiled = 1  # one compilation for every chunk length
    elif self.on_device:
      indices = np.stack([next(self._batches) for _ in range(num_steps)])
      state, losses, accs = self._run_index_chunk(
          self.state, self._images, self._labels, jnp.asarray(indices))
    else:
      chunk = stacked_batches(self._batches, num_steps)
      state, losses, accs = self._run_chunk(self.state, chunk)
    if self.scan:
      num_steps_compiled = num_steps
      losses, accs = jax.device_get((losses, accs))
    elapsed = time.perf_counter() - t0
    # The first call of a chunk length compiles; keep it out of the timing.
    if num_steps_compiled in self._compiled_for:
      self.train_seconds += elapsed
      self.timed_steps += num_steps
    self._compiled_for.add(num_steps_compiled)
    self.state = state
    self.step += num_steps
    finite = bool(np.all(np.isfinite(losses)))
    return {"train_loss": float(np.mean(losses)) if finite else float("nan"),
            "train_accuracy": float(np.mean(accs)), "finite": finite}

  def evaluate(self, ds=None) -> dict:
    """Loss/accuracy over ``ds`` (default: the test set), running stats."""
    ds = self.test_ds if ds is None else ds
    if id(ds) not in self._eval_batches:  # normalize once, keep on device
      self._eval_batches[id(ds)] = [
          jax.tree.map(jnp.asarray, b)
          for b in input_pipeline.eval_iterator(ds, self.data)]
    totals = np.zeros(3)
    for batch in self._eval_batches[id(ds)]:
      sums = self._eval_step(self.state, batch)
      totals += np.asarray([float(sums["loss_sum"]), float(sums["correct"]),
                            float(sums["count"])])
    count = max(totals[2], 1.0)
    return {"test_loss": float(totals[0] / count),
            "test_accuracy": float(totals[1] / count)}

  @property
  def variables(self) -> dict:
    return {"params": self.state.params, "batch_stats": self.state.batch_stats}

  def seconds_per_step(self) -> Optional[float]:
    return (self.train_seconds / self.timed_steps) if self.timed_steps else None


def fixed_batch(ds, data: DataSettings, size: int, seed: int = 1234) -> dict:
  """A fixed batch (normalized like training, no augmentation) of ``size``
  examples of ``ds``: the probe batch of the measurements."""
  del data  # the normalization is the dataset's own (train-set statistics)
  batch = next(input_pipeline.epoch_iterator(
      ds, size, seed=seed, epoch=0, shuffle=True, augment=False,
      remainder="drop"))
  return {"image": jnp.asarray(batch["image"]),
          "label": jnp.asarray(batch["label"])}


# ---------------------------------------------------------------------------
# Results.

def steps_to_reach(steps, accuracies, target: float) -> Optional[int]:
  """First logged step whose accuracy is >= target (None if never)."""
  for s, a in zip(steps, accuracies):
    if a >= target:
      return int(s)
  return None


def write_json(path: str, obj) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(_jsonable(obj), f, indent=1, sort_keys=False)
  return path


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(obj).tolist())
  if isinstance(obj, (np.floating, float)):
    value = float(obj)
    return value if math.isfinite(value) else str(value)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  return obj


def figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.2):
  """A matplotlib Figure (Agg, no pyplot state) and its axes grid."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def save(fig, path: str, dpi: int = 90) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


def build_model(name: str, *, num_classes: int, norm: str, norm_kwargs=None,
                **model_kwargs):
  return create_model(name, num_classes=num_classes, norm=norm,
                      norm_kwargs=norm_kwargs, **model_kwargs)


def log(message: str) -> None:
  print(message, flush=True)


def to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())
