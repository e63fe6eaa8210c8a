"""What every experiment script shares: command line, library settings, data,
training loops, results files and plots.

Used by ``experiments/bn_mnist.py``, ``bn_learning_rates.py``,
``santurkar_{vgg,dln,lp}.py``, ``cbn_small_batch.py`` and
``rethinking_batch.py``. Everything here is glue over the library:

* the model is ``bn_jax.models.create_model``, the optimizer and schedule
  ``bn_jax.training.optim``, the state ``bn_jax.training.create_train_state``,
  the steps ``bn_jax.training.train_step`` / ``eval_step``, the data
  ``bn_jax.training.input_pipeline`` (itself over ``bn_jax.data``), all read
  from one :func:`library_config` (``bn_jax.training.base_config`` with the
  experiment's values);
* two training loops: :class:`Run` stacks ``chunk`` training batches and runs
  them in ONE jitted ``lax.scan`` of the library's ``train_step`` (a tiny
  model like the BN paper's 3x100 MLP, ~0.1 ms of math per step, is not
  dominated by Python dispatch; measurements happen between chunks), and
  :func:`train_stepwise`, one jitted (state-donating) step per dispatch over
  the library's batch iterator, for convolutional nets.

The command line of every script is the same::

  python experiments/<name>.py [--workdir DIR] [--scale cpu|paper] \
      [--config.key=value ...]

``--scale`` picks ``get_config(scale)`` of the script's config file
(``configs/exp_<name>.py``); ``--config.key=value`` overrides after that.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python experiments/x.py` from anywhere
  sys.path.insert(0, _REPO)

from bn_jax.models import create_model  # noqa: E402
from bn_jax.training import (base_config, create_train_state,  # noqa: E402
                             eval_step, input_pipeline, optim, train_step)

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


def config_path(name: str) -> str:
  """``configs/<name>`` of this checkout."""
  return os.path.join(_REPO, "configs", name)


def define_flags(name: str, config_file: str):
  """Defines --workdir, --scale and --config (``config_file:<scale>``).

  Only called when a script runs as ``__main__``: importing a script (tests,
  other experiments) must not define absl flags twice.
  """
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", os.path.join(".", "workdir", "experiments",
                                              name),
                      "Output directory (plots, results.json, per-run files).")
  flags.DEFINE_enum("scale", "cpu", list(SCALES),
                    "cpu: the reduced CPU setting; paper: the paper's scale "
                    "(meant for an accelerator).")
  config_flags.DEFINE_config_file(
      "config", f"{config_file}:{scale_from_argv(sys.argv)}",
      "Experiment config; override fields with --config.<key>=<value>.",
      lock_config=True)
  return flags.FLAGS


def run_script(name: str, config_name: str,
               experiment: Callable[..., dict]) -> None:
  """The ``__main__`` of a script: flags, then ``experiment(config, workdir)``.

  Args:
    name: the script's name (the default workdir
      ``./workdir/experiments/<name>``).
    config_name: its config file under ``configs/``.
    experiment: ``(config, workdir) -> results``.
  """
  from absl import app
  flags = define_flags(name, config_path(config_name))

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.config
    if config.scale != flags.scale:
      raise app.UsageError(f"--scale={flags.scale} but the config was built "
                           f"for scale {config.scale!r}.")
    experiment(config, flags.workdir)

  app.run(main)


# ---------------------------------------------------------------------------
# Library settings.

def library_config(base=None, **fields):
  """``bn_jax.training.base_config()`` (or a copy of ``base``, an earlier
  result) with ``fields`` set: what the library's optimizer, schedule and
  input pipeline read.

  One experiment trains several runs (other learning rates, batch sizes), so
  each run gets its own. Raises KeyError for a field the library does not
  know (a typo would otherwise be silently ignored).
  """
  settings = (base_config() if base is None
              else base.copy_and_resolve_references())
  for key, value in fields.items():
    if key not in settings:
      raise KeyError(f"library_config: {key!r} is not a key of "
                     f"bn_jax.training.base_config().")
    settings[key] = value
  return settings


# ---------------------------------------------------------------------------
# Data.

def load_data(settings):
  """``(train_ds, test_ds)`` through the library's input pipeline
  (``settings.dataset``, ``data_dir``, ``data_source``, ``synthetic``)."""
  return input_pipeline.load_train_test(settings)


def select_examples(ds, index: np.ndarray):
  """``ds`` (an ``ArrayDataset`` or ``SyntheticDataset``) restricted to the
  examples ``index``; everything else (normalization statistics, name,
  split) stays."""
  if hasattr(ds, "_replace"):
    return ds._replace(images=ds.images[index], labels=ds.labels[index])
  return dataclasses.replace(ds, images=ds.images[index],
                             labels=ds.labels[index])


def subset(ds, num: int, seed: int = 0):
  """The first ``num`` examples of a random permutation (fixed by seed) of
  ``ds`` (in their original order); ``num <= 0`` keeps everything.

  The per-channel normalization statistics stay those of the full train set.
  """
  if num <= 0 or num >= len(ds.labels):
    return ds
  index = np.sort(np.random.default_rng(seed).permutation(len(ds.labels))[
      :num])
  return select_examples(ds, index)


def first_examples(ds, num: int):
  """The first ``num`` examples of ``ds``; ``num <= 0`` keeps everything."""
  if num <= 0 or num >= len(ds.labels):
    return ds
  return select_examples(ds, np.arange(num))


def to_device(batch: dict) -> dict:
  """A host batch's ``image`` and ``label`` as device arrays."""
  return {"image": jnp.asarray(batch["image"]),
          "label": jnp.asarray(batch["label"])}


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


def fixed_batch(ds, size: int, seed: int = 1234) -> dict:
  """A fixed batch (normalized like training, no augmentation) of ``size``
  examples of ``ds``, on device: a probe / measurement batch."""
  return to_device(next(input_pipeline.epoch_iterator(
      ds, size, seed=seed, epoch=0, shuffle=True, augment=False,
      remainder="drop")))


def leading_batches(ds, batch_size: int, limit: int) -> list:
  """The first ``limit // batch_size`` full batches of ``ds`` in order
  (normalized, no augmentation), on device; reused at every evaluation."""
  out = []
  for batch in input_pipeline.epoch_iterator(
      ds, batch_size, seed=0, epoch=0, shuffle=False, augment=False,
      remainder="drop"):
    if len(out) * batch_size >= limit:
      break
    out.append(to_device(batch))
  return out


# ---------------------------------------------------------------------------
# Training pieces shared by both loops.

def init_training(model, settings, *, num_train_steps: int,
                  input_shape: tuple, seed: int):
  """``(state, learning_rate_fn, tx)`` of ``model`` under ``settings``
  (a :func:`library_config`), initialized from ``PRNGKey(seed)``."""
  learning_rate_fn = optim.create_learning_rate_fn(settings, num_train_steps)
  tx = optim.create_optimizer(settings, learning_rate_fn)
  state = create_train_state(jax.random.PRNGKey(seed), model, tx,
                             tuple(input_shape))
  return state, learning_rate_fn, tx


def evaluate(eval_fn, state, batches: Iterable[dict]) -> dict:
  """Exact test loss/accuracy over ``batches`` (padded, masked): the sums of
  ``eval_fn`` (a jitted ``bn_jax.training.eval_step``), added in float64."""
  totals = np.zeros(3, np.float64)
  for batch in batches:
    sums = eval_fn(state, batch)
    totals += np.asarray(jax.device_get(
        (sums["loss_sum"], sums["correct"], sums["count"])), np.float64)
  count = max(totals[2], 1.0)
  return {"test_loss": float(totals[0] / count),
          "test_accuracy": float(totals[1] / count),
          "test_examples": int(totals[2])}


def is_due(step: int, every: int, last: int) -> bool:
  """Whether to measure at ``step``: every ``every`` steps and at the end."""
  return step % every == 0 or step == last


def train_stepwise(step_fn, state, batches: Iterator[dict], num_steps: int, *,
                   sync_every: int, sync_at: Iterable[int] = (),
                   on_sync: Optional[Callable] = None):
  """``num_steps`` training steps, one jitted dispatch each.

  The host reads the metrics back only every ``sync_every`` steps, at the
  steps of ``sync_at`` and at the last step (a sync per step would stall the
  dispatch queue); then it checks them for NaN/inf and calls
  ``on_sync(step, state)``.

  Args:
    step_fn: ``(state, batch) -> (state, metrics)`` (jitted).
    state: the initial state.
    batches: host batches with ``image`` and ``label``.
    num_steps, sync_every, sync_at, on_sync: see above.

  Returns:
    ``(state, curve, status, first_step_seconds)``: ``curve`` holds
    ``(step, mean loss, mean accuracy)`` over the steps since the previous
    sync; ``status`` is ``'ok'`` or ``'diverged at step N'`` (the first step
    whose loss was not finite; training stops at the sync that sees it);
    ``first_step_seconds`` the time to the end of step 1 (compilation).
  """
  sync_at = set(sync_at)
  curve, pending, status = [], [], "ok"
  t_start = time.perf_counter()
  first_step_seconds = 0.0
  for step in range(1, num_steps + 1):
    batch = next(batches)
    state, metrics = step_fn(state, {"image": batch["image"],
                                     "label": batch["label"]})
    pending.append((metrics["loss"], metrics["accuracy"]))
    if step == 1:
      jax.block_until_ready(metrics)
      first_step_seconds = time.perf_counter() - t_start
    if not is_due(step, sync_every, num_steps) and step not in sync_at:
      continue
    window = np.asarray(jax.device_get(pending), np.float64)
    pending = []
    bad = np.flatnonzero(~np.isfinite(window[:, 0]))
    if bad.size:
      status = f"diverged at step {step - len(window) + 1 + bad[0]}"
      break
    curve.append((step, float(window[:, 0].mean()),
                  float(window[:, 1].mean())))
    if on_sync is not None:
      on_sync(step, state)
  return state, curve, status, first_step_seconds


def jit_train_step(learning_rate_fn):
  """The library's ``train_step``, jitted, donating the state."""
  return jax.jit(functools.partial(train_step,
                                   learning_rate_fn=learning_rate_fn),
                 donate_argnums=(0,))


# ---------------------------------------------------------------------------
# A training run whose steps run in scanned chunks.

DIVERGED = "diverged (non-finite loss) before step {step}"


class Run:
  """One model + optimizer trained in scanned chunks of steps.

  Without augmentation the whole (normalized) training set lives on the
  device and a chunk is only a ``[steps, batch]`` array of example indices
  (the library's order, :func:`epoch_index_batches`); with augmentation the
  chunk is ``steps`` stacked batches of ``input_pipeline.train_iterator``.

  Args:
    model: a flax module from ``create_model``.
    settings: a :func:`library_config` (optimizer, schedule, ``batch_size``,
      ``seed`` of the data order, ``augment``, ``eval_batch_size``).
    train_ds, test_ds: datasets (:func:`load_data`).
    num_train_steps: length of the schedule.
    seed: parameter init / noise seed.
    device_data: ``(images, labels)`` from :func:`normalized_arrays`, to
      share one device copy between runs (computed if None).
    scan: run a chunk as one ``lax.scan`` (best for tiny dense models).
      ``False`` dispatches one jitted step at a time: XLA:CPU runs
      convolutions inside a scanned loop ~100x slower than in a plain jitted
      step (measured: VGG-11/4 batch 128, 26 s vs ~0.3 s per step), so conv
      nets use ``scan=False``.

  Attributes:
    curve: ``(step, mean train loss, mean train accuracy)`` per chunk.
    status: ``'ok'`` or, after a chunk with a non-finite loss,
      ``'diverged (non-finite loss) before step N'``.
  """

  def __init__(self, model, settings, train_ds, test_ds, *,
               num_train_steps: int, seed: int = 0, device_data=None,
               scan: bool = True):
    self.model = model
    self.settings = settings
    self.train_ds, self.test_ds = train_ds, test_ds
    self.num_train_steps = int(num_train_steps)
    input_shape = (settings.batch_size,) + tuple(train_ds.images.shape[1:])
    self.state, self.learning_rate_fn, self.tx = init_training(
        model, settings, num_train_steps=self.num_train_steps,
        input_shape=input_shape, seed=seed)
    self.step = 0
    self.curve = []
    self.status = "ok"
    self.on_device = not settings.augment
    if self.on_device:
      self._images, self._labels = (device_data if device_data is not None
                                    else normalized_arrays(train_ds))
      self._batches = epoch_index_batches(len(train_ds.labels),
                                          settings.batch_size,
                                          seed=settings.seed)
    else:
      self._batches = input_pipeline.train_iterator(train_ds, settings)
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
    whether everything stayed finite (and appends them to ``curve``)."""
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
    out = {"train_loss": float(np.mean(losses)) if finite else float("nan"),
           "train_accuracy": float(np.mean(accs)), "finite": finite}
    self.curve.append((self.step, out["train_loss"], out["train_accuracy"]))
    if not finite:
      self.status = DIVERGED.format(step=self.step)
    return out

  def train_chunks(self, until: int, chunk_steps: int) -> Iterator[dict]:
    """Trains up to step ``until`` in chunks of at most ``chunk_steps``,
    yielding each chunk's :meth:`train` output (measure between chunks);
    stops at the first chunk whose loss is not finite (``status``)."""
    while self.step < until and self.status == "ok":
      out = self.train(min(chunk_steps, until - self.step))
      if out["finite"]:
        yield out

  def evaluate(self, ds=None) -> dict:
    """Loss/accuracy over ``ds`` (default: the test set), running stats."""
    ds = self.test_ds if ds is None else ds
    if id(ds) not in self._eval_batches:  # normalize once, keep on device
      self._eval_batches[id(ds)] = [
          jax.tree.map(jnp.asarray, b)
          for b in input_pipeline.eval_iterator(ds, self.settings)]
    out = evaluate(self._eval_step, self.state, self._eval_batches[id(ds)])
    return {"test_loss": out["test_loss"],
            "test_accuracy": out["test_accuracy"]}

  @property
  def variables(self) -> dict:
    return {"params": self.state.params, "batch_stats": self.state.batch_stats}

  def seconds_per_step(self) -> Optional[float]:
    return (self.train_seconds / self.timed_steps) if self.timed_steps else None


def build_model(name: str, *, num_classes: int, norm: str, norm_kwargs=None,
                **model_kwargs):
  return create_model(name, num_classes=num_classes, norm=norm,
                      norm_kwargs=norm_kwargs, **model_kwargs)


# ---------------------------------------------------------------------------
# Runs cached on disk (an interrupted sweep resumes).

def fingerprint(config, extra, *, ignore: Iterable[str] = ()) -> str:
  """A hash of ``config`` (without the keys ``ignore``: those that select
  runs or only change logging) and ``extra`` (the run's own settings)."""
  ignore = set(ignore)
  keys = {k: v for k, v in config.to_dict().items() if k not in ignore}
  text = json.dumps([keys, extra], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_run(path: str, run_fingerprint: str, train: Callable[[], dict], *,
               log=print) -> dict:
  """The record in ``path`` if it was made with ``run_fingerprint``, else
  ``train()``'s record, saved there (with its fingerprint)."""
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("fingerprint") == run_fingerprint:
      log(f"[{os.path.splitext(os.path.basename(path))[0]}] done before")
      return old
  record = train()
  record["fingerprint"] = run_fingerprint
  write_json(path, record, significant_digits=None)
  return record


# ---------------------------------------------------------------------------
# Results.

def steps_to_reach(steps, accuracies, target: float) -> Optional[int]:
  """First logged step whose accuracy is >= target (None if never)."""
  for s, a in zip(steps, accuracies):
    if a >= target:
      return int(s)
  return None


def write_json(path: str, obj, *, significant_digits: Optional[int] = 7
               ) -> str:
  """Writes ``obj`` (NumPy/JAX values allowed) as JSON: floats rounded to
  ``significant_digits`` (None: exact), NaN/inf as strings, innermost lists
  on one line."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = json.dumps(_jsonable(obj, significant_digits), indent=1)
  # Innermost lists (of numbers/strings) on one line: readable and compact.
  text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]",
                lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]",
                text)
  with open(path, "w") as f:
    f.write(text)
  return path


def _jsonable(obj, digits):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v, digits) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v, digits) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(obj).tolist(), digits)
  if isinstance(obj, (np.floating, float)):
    value = float(obj)
    if not math.isfinite(value):
      return str(value)
    # 7 significant digits: float32 precision, and a JSON a third the size.
    return value if digits is None else float(f"{value:.{digits}g}")
  if isinstance(obj, (np.integer,)):
    return int(obj)
  return obj


def save_results(workdir: str, results: dict, t0: float, *,
                 summary: Iterable[str] = ()) -> dict:
  """Adds ``total_wall_seconds`` (since ``t0``) to ``results``, writes
  ``<workdir>/results.json``, logs the ``summary`` lines and where it all
  went."""
  results["total_wall_seconds"] = time.perf_counter() - t0
  write_json(os.path.join(workdir, "results.json"), results)
  for line in summary:
    log(line)
  log(f"wrote {os.path.abspath(workdir)} in "
      f"{results['total_wall_seconds']:.0f}s")
  return results


def log(message: str) -> None:
  print(message, flush=True)


def to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


# ---------------------------------------------------------------------------
# Plots (matplotlib's object API on Agg: no pyplot state, no display).

def figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.2,
           **subplots_kwargs):
  """A Figure and its ``[nrows, ncols]`` axes grid (``subplots_kwargs``, e.g.
  ``sharey=True``, go to ``Figure.subplots``)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False, **subplots_kwargs)
  return fig, axes


def save(fig, path: str, dpi: int = 90) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path
