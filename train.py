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
single-device or data parallel with SyncBN), evaluation, one norm's run (the
library's :func:`bn_jax.training.loop.train_loop` with this file's hooks:
logging, evaluation with PreciseBN, analysis, checkpoints, NaN stop), the
comparison over norms, and ``main``.

Speed (issue 11; benchmarks/RESULTS.md, "Main job"): the training batches
come from ``config.input_pipeline`` (:func:`training_feed`: without
augmentation the normalized set stays on the device and only example
indices travel), ``config.steps_per_dispatch`` steps run per dispatch as one
``lax.scan`` (auto: dense models on CPU, everything on GPU/TPU), the test
set is put on the device once per run, finished runs are plotted in a
background thread, and ``main`` turns on JAX's persistent compilation cache
(``--compilation_cache``), so a second run loads what the first compiled.
"""
from __future__ import annotations

import functools
import importlib
import itertools
import json
import math
import os
import sys
import threading
from typing import Optional

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import tqdm

from bn_jax.training import (checkpoint, config_validation,
                             input_pipeline, loop, metrics as metrics_lib,
                             optim, parallel, plots, steps, train_state)
from bn_jax.training.train_state import TrainingDiverged

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                    "plots (default: ./workdir/<config file name>).")
flags.DEFINE_string(
    "compilation_cache", os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "bn_jax", "jax_compilation_cache"),
    "Directory of JAX's persistent compilation cache: a later run of the "
    "same programs (same code, shapes, JAX and XLA flags) loads the compiled "
    "executables instead of compiling them again (the same executables: the "
    "same results). '' turns it off.")
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


# 2. train_step / eval_step: bn_jax.training.steps, jitted (state donated)
#    by bn_jax.training.parallel.make_step_functions; the state:
create_state = loop.create_state

# 3. Evaluation: exact over the test set (padded last batch, masked), with
#    the EMA statistics and, when config.precise_bn_samples > 0, PreciseBN's.

def evaluate(step_fns: parallel.StepFunctions, state, test_ds,
             config=None) -> dict:
  """Test loss and accuracy with the running statistics (``train=False``)
  over ``test_ds``: a dataset (batched by ``config.eval_batch_size``), or
  its batches already on the device (a list, made once per run)."""
  if not isinstance(test_ds, list):
    test_ds = _prefetch(input_pipeline.eval_iterator(test_ds, config),
                        step_fns.batch_sharding)
  return loop.evaluate(step_fns.eval_step, state, test_ds)


def precise_bn_state(config, state, single_model, train_ds):
  """The state with PreciseBN population statistics over
  ``config.precise_bn_samples`` training samples (in batches of
  ``config.precise_bn_batch_size``, rounded up to whole batches) of a stream
  other than the training order's
  (:func:`bn_jax.training.loop.precise_bn_state_from_dataset`)."""
  return loop.precise_bn_state_from_dataset(
      state, single_model.apply, train_ds, config,
      samples=config.precise_bn_samples,
      batch_size=config.precise_bn_batch_size,
      seed_offset=1 + int(jax.device_get(state.step)))


def evaluate_with_statistics(config, step_fns, state, single_model, train_ds,
                             test_ds) -> dict:
  """Test metrics with the EMA running statistics (``test_*``) and, when
  ``config.precise_bn_samples > 0``, also with PreciseBN population statistics
  (``precise_bn_test_*``): both, so the EMA's lag is visible (Wu & Johnson)."""
  test = evaluate(step_fns, state, test_ds, config)
  if config.precise_bn_samples > 0 and jax.tree.leaves(state.batch_stats):
    precise = evaluate(step_fns, precise_bn_state(config, state, single_model,
                                                  train_ds), test_ds, config)
    test.update({f"precise_bn_{k}": v for k, v in precise.items()
                 if k != "test_examples"})
  return test


def _prefetch(iterator, sharding):
  from bn_jax.data import prefetch_to_device
  return prefetch_to_device(iterator, size=2, sharding=sharding)


# 4. The training loop of one normalization.

# 'host' without augmentation keeps a normalized float32 copy of the
# training set on the device up to this size (else batches are streamed).
_DEVICE_COPY_BYTES = 2 ** 31


def training_feed(config, step_fns: parallel.StepFunctions, learning_rate_fn,
                  train_ds, *, start_step: int, steps_per_dispatch: int):
  """``(step_fn, multi_step_fn, batches)`` for :func:`loop.train_loop`: the
  batches of steps ``start_step + 1, ...`` by ``config.input_pipeline``.

  * Data parallel: host batches, sharded over the devices, one step per
    dispatch (``step_fns.train_step``).
  * ``'host'`` without augmentation or analysis: the normalized set on the device (up
    to 2 GiB), the host sends each step's example indices (the host order:
    the same batches as the NumPy pipeline, bit for bit).
  * ``'host'`` otherwise: NumPy batches (stacked per dispatch when
    ``steps_per_dispatch > 1``).
  * ``'device'``: the uint8 set on the device; a step's batch is
    ``bn_jax.data.batch_at(step)``, a pure function of ``(seed, step)``.
  """
  if config.data_parallel:
    return step_fns.train_step, None, _prefetch(input_pipeline.train_iterator(
        train_ds, config, start_step=start_step), step_fns.batch_sharding)
  step_fn = functools.partial(steps.train_step,
                              learning_rate_fn=learning_rate_fn)
  gather, data = None, None
  if config.input_pipeline == "device":
    from bn_jax.data import device_pipeline
    data = device_pipeline.put_on_device(
        train_ds, padding=device_pipeline.CROP_PADDING if config.augment
        else 0)
    gather = loop.device_pipeline_gather(
        batch_size=config.batch_size, seed=config.seed, augment=config.augment)
    batches = itertools.count(start_step)  # batch_at's 0-based steps
  elif (not config.augment and not config.analysis and
        train_ds.images.size * 4 <= _DEVICE_COPY_BYTES):
    # (Analysis instruments see each step's batch of images: host batches.)
    data = input_pipeline.normalized_arrays(train_ds)
    gather = loop.index_gather
    batches = input_pipeline.epoch_index_batches(
        len(train_ds.labels), config.batch_size, seed=config.seed,
        start_step=start_step)
  else:
    batches = input_pipeline.train_iterator(train_ds, config,
                                            start_step=start_step)
    if steps_per_dispatch == 1:
      return step_fns.train_step, None, _prefetch(batches, None)
  run = loop.step_runner(step_fn, scan=steps_per_dispatch > 1, gather=gather,
                         donate=True)
  run_with_data = lambda state, batch: run(state, batch, data)
  if steps_per_dispatch > 1:
    return None, run_with_data, batches
  return run_with_data, None, batches


def num_train_steps_of(config, train_ds) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  per_epoch = input_pipeline.steps_per_epoch(train_ds, config.batch_size)
  return max(int(math.ceil(config.num_epochs * per_epoch)), 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       norm: Optional[str] = None, data=None,
                       stop_after_steps: Optional[int] = None,
                       validate: bool = True,
                       background: Optional[list] = None):
  """Trains ``config.model`` with ``norm`` in ``workdir``; returns
  ``(state, summary)``.

  Resumes from the latest checkpoint in ``workdir/checkpoints``.
  ``stop_after_steps`` stops the run early (after that many steps of this
  call, with a checkpoint), as a pre-emption would; the learning-rate
  schedule still spans ``num_train_steps``. ``validate=False`` skips
  :func:`validate_config` (the caller ran it). ``background``: a list to
  append the futures of work left running in a background thread (the
  run's plot) to; the caller waits for them. None: done before returning.

  Raises:
    TrainingDiverged: the loss or the state became NaN/inf; the message names
      the step and the last (finite) checkpoint, which is left intact.
  """
  if validate:  # run_comparison validated it already
    config_validation.validate_config(config)
  norm = config.norms[0] if norm is None else norm
  os.makedirs(workdir, exist_ok=True)
  train_ds, test_ds = input_pipeline.load_train_test(config) if data is None \
      else data
  num_train_steps = num_train_steps_of(config, train_ds)

  learning_rate_fn = optim.create_learning_rate_fn(config, num_train_steps)
  step_fns = parallel.make_step_functions(learning_rate_fn,
                                          data_parallel=config.data_parallel)
  per_device_batch = config.batch_size // step_fns.num_shards
  input_shape = (per_device_batch,) + tuple(train_ds.images.shape[1:])
  model = create_model(config, norm, train_ds.num_classes,
                       axis_name=step_fns.axis_name)
  single_model = model if step_fns.axis_name is None else create_model(
      config, norm, train_ds.num_classes)
  state, _, tx = create_state(
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
  analysis_fn = None
  if config.analysis:  # imported only when used (seconds)
    from bn_jax.analysis import training_hooks
    analysis_fn = training_hooks.make_analysis_fn(config, single_model, tx)

  end_step = num_train_steps if stop_after_steps is None else min(
      num_train_steps, start_step + stop_after_steps)
  steps_per_dispatch = loop.resolve_steps_per_dispatch(config)
  train_fn, multi_step_fn, batches = training_feed(
      config, step_fns, learning_rate_fn, train_ds, start_step=start_step,
      steps_per_dispatch=steps_per_dispatch)
  # The test set, normalized and on the device once for the whole run.
  eval_batches = list(_prefetch(input_pipeline.eval_iterator(test_ds, config),
                                step_fns.batch_sharding))

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

  def before_step(step, state, batch):
    # Measured at the state before this step's update.
    if analysis_fn is not None and due(step, config.analysis_every):
      writer.write(step - 1, analysis_fn(state, batch))

  def on_sync(step, state, window):
    if "steps_per_sec" in window:
      window["examples_per_sec"] = window["steps_per_sec"] * config.batch_size
    writer.write(step, window)
    bar.update(step - bar.n)
    bar.set_postfix(loss=f"{window['train_loss']:.4f}",
                    acc=f"{window['train_accuracy']:.3f}",
                    ex_s=f"{window.get('examples_per_sec', 0):.0f}")
    if due(step, config.eval_every) or step == num_train_steps:
      test = evaluate_with_statistics(config, step_fns, state, single_model,
                                      train_ds, eval_batches)
      writer.write(step, test)
      logging.info("%s step %d: %s", norm, step, test)
    if due(step, config.checkpoint_every) or step == end_step:
      maybe_save(state, step)
    writer.flush()

  # Host syncs: every log_every steps and wherever an evaluation or a
  # checkpoint is due (the last step always syncs).
  sync_at = [s for s in range(start_step + 1, end_step + 1)
             if due(s, config.eval_every) or due(s, config.checkpoint_every)
             or s == num_train_steps]
  bar = tqdm.tqdm(total=num_train_steps, initial=start_step, unit="step",
                  desc=norm, disable=not config.progress_bar, leave=True,
                  dynamic_ncols=True)
  try:
    result = loop.train_loop(
        train_fn, state, batches, start_step=start_step,
        end_step=end_step, sync_every=config.log_every, sync_at=sync_at,
        on_sync=on_sync,
        before_step=before_step if analysis_fn is not None else None,
        steps_per_dispatch=steps_per_dispatch, multi_step_fn=multi_step_fn)
    state = result.state
    if result.diverged is not None:
      step, loss = result.diverged
      writer.write(step, {"train_loss": loss})
      raise TrainingDiverged(step, f"the training loss ({loss})",
                             checkpointer.latest_step(),
                             checkpointer.directory)
  finally:
    bar.close()
    writer.close()
    checkpointer.close()

  records = metrics_lib.read_metrics(workdir)
  if start_step == num_train_steps:  # nothing left to train: evaluate again
    records.append(dict(step=start_step, **evaluate_with_statistics(
        config, step_fns, state, single_model, train_ds, eval_batches)))
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
          result.timed_steps * config.batch_size / result.train_seconds
          if result.timed_steps and result.train_seconds > 0
          else metrics_lib.last_value(records, "examples_per_sec")),
      "train_seconds": result.train_seconds,
      "status": "ok" if final_step == num_train_steps else "stopped",
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if config.plots:
    plot = functools.partial(
        plots.plot_runs, {norm: records}, os.path.join(workdir, "curves.png"),
        title=f"{config.model} / {config.dataset} / {norm}")
    if background is None:
      plot()
    else:  # drawn while the next run compiles and trains
      background.append(_background_executor().submit(plot))
  return state, summary


@functools.lru_cache(maxsize=1)
def _background_executor():
  """One worker thread for the plots (matplotlib, mostly Python) of finished
  runs: the next run's compilation and training run in XLA, which releases
  the GIL, so on 2 cores they overlap."""
  from concurrent.futures import ThreadPoolExecutor
  return ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots")


# 5. The comparison over config.norms, and main.

def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> list:
  """Trains every norm of ``config.norms`` in ``<workdir>/<norm>`` (for a
  config in parts, every part's norms in ``<workdir>/<part>/<norm>``);
  writes ``results.md``, ``results.json`` and ``comparison.png``; returns the
  rows.

  A diverging run is recorded (status ``diverged at step N``) and the others
  still run.
  """
  # Fails on bad values (naming the key) before loading data or compiling.
  config_validation.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  rows, figure, titles, datasets, background = [], {}, [], {}, []
  for part, part_config in config_validation.config_parts(config):
    data_key = (part_config.dataset, part_config.data_dir,
                part_config.data_source)
    if data_key not in datasets:
      datasets[data_key] = input_pipeline.load_train_test(part_config)
    runs = {}
    for norm in part_config.norms:
      run_dir = os.path.join(workdir, part, norm)
      try:
        _, summary = train_and_evaluate(part_config, run_dir, norm=norm,
                                        data=datasets[data_key],
                                        validate=False, background=background)
      except TrainingDiverged as e:
        logging.error("%s", e)
        print(f"[{part}/{norm}] {e}", file=sys.stderr)
        summary = {"norm": norm, "steps": e.step,
                   "status": f"diverged at step {e.step}"}
        records = metrics_lib.read_metrics(run_dir)
        summary["train_loss"] = metrics_lib.last_value(records, "train_loss")
      if part:
        summary = {"part": part, **summary}
      rows.append(summary)
      runs[norm] = metrics_lib.read_metrics(run_dir)
    title = (f"{part_config.model} on {part_config.dataset}, batch "
             f"{part_config.batch_size}, {part_config.optimizer} lr "
             f"{part_config.learning_rate}")
    titles.append(f"{part}: {title}" if part else title)
    figure[titles[-1]] = runs

  table = metrics_lib.results_table(rows)
  heading = "\n".join(f"# {t}" if len(titles) == 1 else f"- {t}"
                      for t in titles)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"{heading}\n\n{table}\n")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": json.loads(config.to_json_best_effort()),
               "results": rows}, f, indent=2)
  if config.plots:
    background.append(_background_executor().submit(
        plots.plot_comparison, figure, os.path.join(workdir, "comparison.png")))
  for future in background:
    future.result()  # raises what a plot raised
  print(f"\n{heading}\n{table}\n\nResults, metrics and plots in "
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


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in ``directory`` ('' = off), for
  every program (the eager init's small ones too: they are most of a tiny
  model's compilations), at most 1 GiB (least recently used evicted)."""
  if not directory:
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", 2 ** 30)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  enable_compilation_cache(FLAGS.compilation_cache)
  # Imported while the data loads and the first model compiles.
  threading.Thread(target=importlib.import_module, args=("orbax.checkpoint",),
                   daemon=True).start()
  logging.get_absl_handler().addFilter(_quiet_orbax_info)
  config = FLAGS.config
  workdir = FLAGS.workdir or default_workdir()
  logging.info("JAX devices: %s", jax.devices())
  rows = run_comparison(config, workdir)
  if any(r["status"].startswith("diverged") for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
