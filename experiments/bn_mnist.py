r"""Experiment 1: BN paper, MNIST (Ioffe & Szegedy 2015, Sec. 4.1, Fig. 1).

  python experiments/bn_mnist.py [--workdir DIR] [--scale cpu|paper] \
      [--config.num_train_steps=...]

A 3x100 sigmoid MLP, batch 60, 50,000 SGD steps, with and without BN
(``configs/exp_bn_mnist.py``; the CPU scale IS the paper's scale). Measures

* Fig. 1(a): test accuracy (all 10,000 test images, BN with its running
  statistics) every ``eval_every`` steps;
* Fig. 1(b,c): the {15, 50, 85}th percentiles of the input to one sigmoid
  (``unit``) of the last hidden layer over training, on a fixed probe set of
  ``probe_size`` test images, via ``bn_jax.analysis.ActivationTracker`` --
  in training mode (BN normalizes by the probe set's own statistics: what a
  sigmoid sees during training; plotted) and in inference mode (BN with its
  running statistics; in the JSON) -- plus every layer's per-unit mean/std
  drift.

Writes to ``--workdir``: ``results.json``, ``fig1a_test_accuracy.png``,
``fig1bc_percentiles.png``, ``drift.png``.
"""
from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from bn_jax import analysis  # noqa: E402
from bn_jax.models import create_model  # noqa: E402
from bn_jax.training import input_pipeline, loop  # noqa: E402

LABELS = {"none": "Without BN", "bn": "With BN"}
ACCURACY_TARGETS = (0.90, 0.95, 0.97, 0.98)


def make_capture(model):
  """Jitted ``(variables, x, train) -> intermediates`` (sown preacts)."""
  def capture(variables, x, train):
    return analysis.capture_preactivations(model, variables, x, train=train)
  return jax.jit(capture, static_argnums=2)


def setup_data(config):
  """``(settings, train_ds, test_ds, device_data)`` of the BN paper's MLP
  experiments (also ``bn_learning_rates.py``): the library settings without
  the learning rate, the data, the normalized training set on the device."""
  settings = common.library_config(
      dataset=config.dataset, batch_size=config.batch_size, seed=config.seed,
      data_dir=config.data_dir, eval_batch_size=1000,
      momentum=config.momentum)
  train_ds, test_ds = input_pipeline.load_train_test(settings)
  return (settings, train_ds, test_ds,
          input_pipeline.normalized_arrays(train_ds))


def mlp_run(config, data, *, norm: str, activation: str,
            learning_rate: float) -> loop.Trainer:
  """The paper's MLP (``config.hidden``, N(0, kernel_init_std^2) weights)
  with ``norm`` and ``activation``, ready to train at ``learning_rate``."""
  settings, train_ds, test_ds, device_data = data
  model = create_model(
      "mlp", num_classes=train_ds.num_classes, norm=norm,
      hidden=tuple(config.hidden), activation=activation,
      kernel_init_std=config.kernel_init_std)
  return loop.Trainer(
      model, common.library_config(settings, learning_rate=learning_rate),
      train_ds, test_ds, num_train_steps=config.num_train_steps,
      seed=config.seed, device_data=device_data)


def train_one(config, norm: str, data, probe) -> dict:
  """Trains one MLP (``norm``) and returns its curves and summaries."""
  run = mlp_run(config, data, norm=norm, activation=config.activation,
                learning_rate=config.learning_rate)
  capture = make_capture(run.model)
  trackers = {mode: analysis.ActivationTracker(unit=config.unit, layer=-1)
              for mode in ("eval", "train")}

  def record():
    for mode, tracker in trackers.items():
      tracker.record(run.step, capture(run.variables, probe["image"],
                                       mode == "train"))

  eval_steps, eval_acc, eval_loss = [], [], []

  def evaluate():
    ev = run.evaluate()
    eval_steps.append(run.step)
    eval_acc.append(ev["test_accuracy"])
    eval_loss.append(ev["test_loss"])

  record()
  evaluate()
  t0 = time.perf_counter()
  for _ in run.train_chunks(config.num_train_steps, config.chunk_steps):
    record()
    if loop.is_due(run.step, config.eval_every, config.num_train_steps):
      evaluate()
  wall = time.perf_counter() - t0
  common.log(f"[{norm}] {run.status}: step {run.step}, test acc "
             f"{eval_acc[-1]:.4f} (max {max(eval_acc):.4f}), {wall:.0f}s")

  histories = {mode: t.history() for mode, t in trackers.items()}
  last_layer = [k[:-len("/mean_drift")] for k in histories["eval"]
                if k.endswith("/mean_drift")][-1]
  return {
      "status": run.status,
      "steps": eval_steps, "test_accuracy": eval_acc, "test_loss": eval_loss,
      "final_test_accuracy": eval_acc[-1],
      "max_test_accuracy": max(eval_acc),
      "steps_to_reach": {f"{t:g}": common.steps_to_reach(eval_steps,
                                                         eval_acc, t)
                         for t in ACCURACY_TARGETS},
      "accuracy_at": {str(s): a for s, a in zip(eval_steps, eval_acc)
                      if s in (1000, 2000, 5000, 10_000, 20_000, 50_000)},
      "percentiles": {mode: {"steps": h["steps"],
                             "percentiles": h["percentiles"],
                             "values": h["percentile_values"]}
                      for mode, h in histories.items()},
      "percentile_stability": {mode: percentile_stability(h, config)
                               for mode, h in histories.items()},
      "drift": {mode: {k: v for k, v in h.items()
                       if k.endswith(("/mean", "/std", "/mean_drift",
                                      "/std_drift"))}
                for mode, h in histories.items()},
      "last_layer": last_layer,
      "wall_seconds": wall,
      "seconds_per_step": run.seconds_per_step(),
  }


def percentile_stability(history: dict, config) -> dict:
  """How much the tracked unit's percentiles move, in two windows.

  ``whole``: step 0 to the end. ``late``: from 10% of training to the end
  (after the fast initial phase), the part of Fig. 1(b,c) where the paper's
  un-normalized network keeps drifting. Each: the change of the median, the
  change of the 15-85 spread, and the range (max - min) of the median.
  """
  steps = np.asarray(history["steps"])
  values = np.asarray(history["percentile_values"])  # [T, 3] = p15, p50, p85
  out = {}
  for name, start in (("whole", 0), ("late", config.num_train_steps // 10)):
    sel = steps >= start
    v = values[sel]
    if len(v) < 2:
      continue
    spread = v[:, 2] - v[:, 0]
    out[name] = {
        "from_step": int(steps[sel][0]),
        "median_change": float(v[-1, 1] - v[0, 1]),
        "median_range": float(v[:, 1].max() - v[:, 1].min()),
        "spread_start": float(spread[0]),
        "spread_end": float(spread[-1]),
    }
  return out


def plot(results: dict, config, workdir: str) -> list[str]:
  from bn_jax.analysis import plotting
  paths = []
  fig, axes = common.figure(1)
  ax = axes[0, 0]
  for norm, res in results.items():
    ax.plot(res["steps"], res["test_accuracy"], label=LABELS.get(norm, norm))
  ax.set_xlabel("training step")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0.85, 1.0)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("(a) MNIST 3x100 sigmoid MLP, batch 60")
  paths.append(common.save(fig, os.path.join(workdir, "fig1a_test_accuracy.png")))

  histories = {f"{LABELS.get(n, n)} (unit {config.unit}, last hidden layer)": {
      "steps": r["percentiles"]["train"]["steps"],
      "percentiles": r["percentiles"]["train"]["percentiles"],
      "percentile_values": r["percentiles"]["train"]["values"]}
      for n, r in results.items()}
  fig = plotting.plot_percentiles(
      histories, title="(b, c) {15, 50, 85}th percentiles of a sigmoid input")
  paths.append(plotting.save_figure(
      fig, os.path.join(workdir, "fig1bc_percentiles.png"), dpi=90))

  # Per-layer drift of the per-unit means, relative to the initial std.
  fig, axes = common.figure(len(results))
  for ax, (norm, res) in zip(axes[0], results.items()):
    drift = res["drift"]["train"]
    steps = res["percentiles"]["train"]["steps"]
    for key in drift:
      if key.endswith("/mean_drift"):
        layer = key[:-len("/mean_drift")]
        scale = max(float(np.asarray(drift[f"{layer}/std"])[0]), 1e-12)
        ax.plot(steps, np.asarray(drift[key]) / scale,
                label=layer.split("/")[0])
    ax.set_title(f"{LABELS.get(norm, norm)}: mean |mu_t - mu_0| / std_0")
    ax.set_xlabel("training step")
    ax.legend()
  paths.append(common.save(fig, os.path.join(workdir, "drift.png")))
  return paths


def run_experiment(config, workdir: str) -> dict:
  """Trains every norm of ``config.norms``; writes JSON + plots."""
  t0 = time.perf_counter()
  data = setup_data(config)
  probe = input_pipeline.fixed_batch(data[2], config.probe_size)
  results = {norm: train_one(config, norm, data, probe)
             for norm in config.norms}
  out = {"experiment": "bn_mnist", "config": common.to_dict(config),
         "results": results}
  plot(results, config, workdir)
  return common.save_results(workdir, out, t0, summary=[
      f"{norm}: final {r['final_test_accuracy']:.4f} max "
      f"{r['max_test_accuracy']:.4f} steps_to {r['steps_to_reach']} "
      f"stability {r['percentile_stability']['eval']}"
      for norm, r in results.items()])


if __name__ == "__main__":
  common.run_script("bn_mnist", "exp_bn_mnist.py", run_experiment)
