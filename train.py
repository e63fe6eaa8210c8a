r"""Trains and evaluates models with different normalizations.

  python train.py                                   # the default comparison
  python train.py --config configs/mnist_mlp.py --workdir /tmp/mnist \
      --config.num_train_steps=2000

With no arguments this runs ``configs/default.py``: the BN paper's MLP
experiment in miniature on scikit-learn's 8x8 digits (no download), with no
normalization vs BN vs CBN, and writes a results table and plots into
``./workdir/default``.

``config.norms`` lists the normalizations to compare; each one trains in its
own sub-directory ``<workdir>/<norm>`` (checkpoints, ``metrics.jsonl``,
TensorBoard events, ``summary.json``, ``curves.png``); the comparison is in
``<workdir>/results.md``, ``results.json`` and ``comparison.png``.
Restarting with the same workdir resumes every run from its last checkpoint.

The file reads top to bottom: create the model and the train state, the
jitted ``train_step``/``eval_step`` (from :mod:`bn_jax.training.steps`,
single-device or data parallel with SyncBN), evaluation, the training loop,
the comparison over norms, and ``main``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import tqdm

from bn_jax.analysis import training_hooks
from bn_jax.training import (checkpoint, config_validation,
                             input_pipeline, metrics as metrics_lib, optim,
                             parallel, plots, train_state)
from bn_jax.training.train_state import TrainingDiverged

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                    "plots (default: ./workdir/<config file name>).")
config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Training configuration file (a Python file "
    "with get_config()); override fields with --config.<key>=<value>.",
    lock_config=True)


# 1. The model and the train state.

def create_model(config, norm: str, num_classes: int,
                 axis_name: Optional[str] = None):
  """The model of ``config.model`` with normalization ``norm``."""
  from bn_jax.models import create_model as create
  norm_kwargs = config.norm_kwargs.get(norm)
  return create(
      config.model, num_classes=num_classes, norm=norm,
      norm_kwargs=None if norm_kwargs is None else norm_kwargs.to_dict(),
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      axis_name=axis_name, **config.model_kwargs.to_dict())


def create_state(config, model, *, input_shape, num_train_steps: int):
  """``(state, learning_rate_fn, tx)``; the state is on the host's device."""
  learning_rate_fn = optim.create_learning_rate_fn(config, num_train_steps)
  tx = optim.create_optimizer(config, learning_rate_fn)
  state = train_state.create_train_state(
      jax.random.PRNGKey(config.seed), model, tx, input_shape)
  return state, learning_rate_fn, tx


# 2. train_step / eval_step: bn_jax.training.steps, jitted (state donated)
#    by bn_jax.training.parallel.make_step_functions.

# 3. Evaluation: exact over the test set (padded last batch, masked).

def evaluate(step_fns: parallel.StepFunctions, state, test_ds, config) -> dict:
  """Test loss and accuracy with the running statistics (``train=False``)."""
  totals = None
  batches = input_pipeline.eval_iterator(test_ds, config)
  for batch in _prefetch(batches, step_fns.batch_sharding):
    sums = step_fns.eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"test_loss": float(totals["loss_sum"]) / count,
          "test_accuracy": float(totals["correct"]) / count,
          "test_examples": float(totals["count"])}


def precise_bn_state(config, state, single_model, train_ds):
  """The state with PreciseBN population statistics (Wu & Johnson, 2021)
  over ``config.precise_bn_batches`` training batches, the weights frozen.
  Used for evaluation only; training continues from the EMA statistics."""
  from bn_jax import precise_batch_stats
  if not jax.tree.leaves(state.batch_stats):
    return state  # no batch-statistics layer (none/gn/ln)
  batches = input_pipeline.train_iterator(
      train_ds, config, start_step=0,
      seed_offset=1 + int(jax.device_get(state.step)))
  batch_stats = precise_batch_stats(
      lambda v, b, **kw: single_model.apply(v, b["image"], **kw),
      {"params": state.params, "batch_stats": state.batch_stats},
      (jax.tree.map(jnp.asarray, b) for b in batches),
      num_batches=config.precise_bn_batches, train=True,
      rngs={"noise": jax.random.fold_in(state.rng, 2)})
  return state.replace(batch_stats=batch_stats)


def evaluate_with_statistics(config, step_fns, state, single_model, train_ds,
                             test_ds) -> dict:
  """Test metrics with the EMA running statistics (``test_*``) and, when
  ``config.precise_bn_batches > 0``, also with PreciseBN population statistics
  (``precise_bn_test_*``): both, so the EMA's lag is visible (Wu & Johnson)."""
  test = evaluate(step_fns, state, test_ds, config)
  if config.precise_bn_batches > 0 and jax.tree.leaves(state.batch_stats):
    precise = evaluate(step_fns, precise_bn_state(config, state, single_model,
                                                  train_ds), test_ds, config)
    test.update({f"precise_bn_{k}": v for k, v in precise.items()
                 if k != "test_examples"})
  return test


def _prefetch(iterator, sharding):
  from bn_jax.data import prefetch_to_device
  return prefetch_to_device(iterator, size=2, sharding=sharding)


# 4. The training loop of one normalization.

def num_train_steps_of(config, train_ds) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  per_epoch = input_pipeline.steps_per_epoch(train_ds, config.batch_size)
  return max(int(math.ceil(config.num_epochs * per_epoch)), 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       norm: Optional[str] = None, data=None,
                       stop_after_steps: Optional[int] = None):
  """Trains ``config.model`` with ``norm`` in ``workdir``; returns
  ``(state, summary)``.

  Resumes from the latest checkpoint in ``workdir/checkpoints``.
  ``stop_after_steps`` stops the run early (after that many steps of this
  call, with a checkpoint), as a pre-emption would; the learning-rate
  schedule still spans ``num_train_steps``.

  Raises:
    TrainingDiverged: the loss or the state became NaN/inf; the message names
      the step and the last (finite) checkpoint, which is left intact.
  """
  config_validation.validate_config(config)
  norm = config.norms[0] if norm is None else norm
  os.makedirs(workdir, exist_ok=True)
  train_ds, test_ds = input_pipeline.load_train_test(config) if data is None \
      else data
  num_train_steps = num_train_steps_of(config, train_ds)

  step_fns = parallel.make_step_functions(
      optim.create_learning_rate_fn(config, num_train_steps),
      data_parallel=config.data_parallel)
  per_device_batch = config.batch_size // step_fns.num_shards
  input_shape = (per_device_batch,) + tuple(train_ds.images.shape[1:])
  model = create_model(config, norm, train_ds.num_classes,
                       axis_name=step_fns.axis_name)
  single_model = model if step_fns.axis_name is None else create_model(
      config, norm, train_ds.num_classes)
  state, learning_rate_fn, tx = create_state(
      config, model, input_shape=input_shape, num_train_steps=num_train_steps)

  checkpointer = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.keep_checkpoints)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state)
    logging.info("Resumed %s from step %d.", workdir, checkpointer.latest_step())
  state = step_fns.put_state(state)
  start_step = int(jax.device_get(state.step))
  writer = metrics_lib.MetricsWriter(workdir)
  writer.truncate_after(start_step)
  analysis_fn = (training_hooks.make_analysis_fn(config, single_model, tx)
                 if config.analysis else None)

  end_step = num_train_steps if stop_after_steps is None else min(
      num_train_steps, start_step + stop_after_steps)
  batches = _prefetch(input_pipeline.train_iterator(
      train_ds, config, start_step=start_step), step_fns.batch_sharding)

  def due(step, every):
    return every > 0 and step % every == 0

  def maybe_save(state, step):
    if not config.save_checkpoints:
      return
    # Never write a non-finite state: the last checkpoint must stay usable.
    if not bool(train_state.state_is_finite(state)):
      raise TrainingDiverged(
          step, "the parameters/statistics/optimizer state",
          checkpointer.latest_step(), checkpointer.directory)
    checkpointer.save(state)

  pending = []          # device metrics of steps not yet logged
  timed_steps = 0       # steps in the throughput window (compile excluded)
  total_timed_steps = 0
  train_seconds = 0.0
  last_train = {}
  window_start = time.perf_counter()
  bar = tqdm.tqdm(total=num_train_steps, initial=start_step, unit="step",
                  desc=norm, disable=not config.progress_bar, leave=True,
                  dynamic_ncols=True)
  try:
    for step in range(start_step + 1, end_step + 1):
      batch = next(batches)
      if analysis_fn is not None and due(step, config.analysis_every):
        # Measured at the state before this step's update; its time is kept
        # out of the throughput.
        t0 = time.perf_counter()
        writer.write(step - 1, analysis_fn(state, batch))
        window_start += time.perf_counter() - t0
      state, step_metrics = step_fns.train_step(state, batch)
      pending.append(step_metrics)
      if step == start_step + 1:
        # The first step compiles: keep it out of the throughput.
        jax.block_until_ready(step_metrics)
        window_start = time.perf_counter()
      else:
        timed_steps += 1
      bar.update(1)

      is_last = step == end_step
      eval_now = due(step, config.eval_every) or step == num_train_steps
      save_now = due(step, config.checkpoint_every) or is_last
      if not (due(step, config.log_every) or is_last or eval_now or save_now):
        continue
      # Host sync: logs the window, checks every pending loss is finite.
      host = jax.device_get(pending)
      first = step - len(host) + 1
      for i, m in enumerate(host):
        if not math.isfinite(float(m["loss"])):
          writer.write(first + i, {"train_loss": float(m["loss"])})
          raise TrainingDiverged(first + i, f"the training loss "
                                 f"({float(m['loss'])})",
                                 checkpointer.latest_step(),
                                 checkpointer.directory)
      elapsed = time.perf_counter() - window_start
      train_seconds += elapsed
      last_train = {
          "train_loss": sum(float(m["loss"]) for m in host) / len(host),
          "train_accuracy": sum(float(m["accuracy"]) for m in host) / len(host),
          "learning_rate": float(host[-1]["learning_rate"]),
      }
      total_timed_steps += timed_steps
      if timed_steps and elapsed > 0:
        last_train["steps_per_sec"] = timed_steps / elapsed
        last_train["examples_per_sec"] = (timed_steps * config.batch_size /
                                          elapsed)
      writer.write(step, last_train)
      bar.set_postfix(loss=f"{last_train['train_loss']:.4f}",
                      acc=f"{last_train['train_accuracy']:.3f}",
                      ex_s=f"{last_train.get('examples_per_sec', 0):.0f}")
      pending, timed_steps = [], 0

      if eval_now:
        test = evaluate_with_statistics(config, step_fns, state, single_model,
                                        train_ds, test_ds)
        writer.write(step, test)
        logging.info("%s step %d: %s", norm, step, test)
      if save_now:
        maybe_save(state, step)
      writer.flush()
      window_start = time.perf_counter()
  finally:
    bar.close()
    writer.close()
    checkpointer.close()

  records = metrics_lib.read_metrics(workdir)
  if start_step == num_train_steps:  # nothing left to train: evaluate again
    records.append(dict(step=start_step, **evaluate_with_statistics(
        config, step_fns, state, single_model, train_ds, test_ds)))
  final_step = int(jax.device_get(state.step))
  summary = {
      "norm": norm,
      "steps": final_step,
      "num_train_steps": num_train_steps,
      "test_accuracy": metrics_lib.last_value(records, "test_accuracy"),
      "test_loss": metrics_lib.last_value(records, "test_loss"),
      "precise_bn_test_accuracy": metrics_lib.last_value(
          records, "precise_bn_test_accuracy"),
      "train_loss": metrics_lib.last_value(records, "train_loss"),
      # Over this call's steps, the compiling first step excluded; a call
      # that trained nothing reports the last recorded window.
      "examples_per_sec": (
          total_timed_steps * config.batch_size / train_seconds
          if total_timed_steps and train_seconds > 0
          else metrics_lib.last_value(records, "examples_per_sec")),
      "train_seconds": train_seconds,
      "status": "ok" if final_step == num_train_steps else "stopped",
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if config.plots:
    plots.plot_runs({norm: records}, os.path.join(workdir, "curves.png"),
                    title=f"{config.model} / {config.dataset} / {norm}")
  return state, summary


# 5. The comparison over config.norms, and main.

def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> list:
  """Trains every norm of ``config.norms`` in ``<workdir>/<norm>``; writes
  ``results.md``, ``results.json`` and ``comparison.png``; returns the rows.

  A diverging run is recorded (status ``diverged at step N``) and the others
  still run.
  """
  config_validation.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data = input_pipeline.load_train_test(config)
  rows, runs = [], {}
  for norm in config.norms:
    run_dir = os.path.join(workdir, norm)
    try:
      _, summary = train_and_evaluate(config, run_dir, norm=norm, data=data)
    except TrainingDiverged as e:
      logging.error("%s", e)
      print(f"[{norm}] {e}", file=sys.stderr)
      summary = {"norm": norm, "steps": e.step,
                 "status": f"diverged at step {e.step}"}
      records = metrics_lib.read_metrics(run_dir)
      summary["train_loss"] = metrics_lib.last_value(records, "train_loss")
    rows.append(summary)
    runs[norm] = metrics_lib.read_metrics(run_dir)

  table = metrics_lib.results_table(rows)
  title = (f"{config.model} on {config.dataset}, batch {config.batch_size}, "
           f"{config.optimizer} lr {config.learning_rate}")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"# {title}\n\n{table}\n")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": json.loads(config.to_json_best_effort()),
               "results": rows}, f, indent=2)
  if config.plots:
    plots.plot_runs(runs, os.path.join(workdir, "comparison.png"), title=title)
  print(f"\n{title}\n{table}\n\nResults, metrics and plots in "
        f"{os.path.abspath(workdir)}")
  return rows


def default_workdir() -> str:
  name = os.path.splitext(os.path.basename(
      config_flags.get_config_filename(FLAGS["config"])))[0]
  return os.path.join(".", "workdir", name)


def _quiet_orbax_info(record) -> bool:
  """absl log filter: orbax logs every checkpoint step at INFO; keep its
  warnings and errors, drop the rest so the progress and results stay
  readable."""
  return (record.levelno > logging.converter.STANDARD_INFO
          or "orbax" not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax_info)
  config = FLAGS.config
  # Fail on bad values before loading data or compiling anything.
  config_validation.validate_config(config)
  workdir = FLAGS.workdir or default_workdir()
  logging.info("JAX devices: %s", jax.devices())
  rows = run_comparison(config, workdir)
  if any(r["status"].startswith("diverged") for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
