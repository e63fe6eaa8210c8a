r"""Experiment 5: Rethinking "Batch" in BatchNorm (Wu & Johnson, 2021).

  python experiments/rethinking_batch.py --workdir ./workdir/experiments/rethinking_batch
  python experiments/rethinking_batch.py --scale paper      # GPU, ResNet-20
  python experiments/rethinking_batch.py --config.ema_momenta='(0.99,)'

Part A, EMA vs PreciseBN over training: one BN model is trained per EMA
momentum in ``config.ema_momenta`` (the weights are the same in every run:
training normalizes with batch statistics, the momentum only changes the
running statistics). At each of ``config.eval_steps`` the test set is
evaluated three ways by :func:`bn_jax.analysis.statistics_consistency`:
with the EMA running statistics, with PreciseBN population statistics of the
current weights (:func:`bn_jax.precise_batch_stats` over
``config.precise_bn_batches`` training batches) and with each test batch's
own statistics. The claim: EMA statistics lag (large momentum) or are noisy
(small momentum) and are worst early in training; PreciseBN is not.

Part B, normalization batch size: the total batch ``config.batch_size`` is
normalized in ghost batches of ``config.ghost_batch_sizes`` (norm
``'ghost'``; ``ghost == batch_size`` is BN). At the end: test accuracy with
EMA / PreciseBN / ghost-batch statistics, and on a fixed training subset the
accuracy in training-mode normalization vs with population statistics (the
train-test inconsistency of the normalization) and vs the test accuracy (the
generalization gap). The claim: very small normalization batches add noise
and train-test inconsistency; 32-128 is the sweet spot (ImageNet).

Outputs in the workdir: ``results.json`` and the plots
``ema_vs_precise.png``, ``ghost_batch.png``; ``runs/<run>.json`` per run (a
rerun skips runs whose JSON matches the current settings).
"""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import common  # noqa: E402
from bn_jax import precise_batch_stats  # noqa: E402
from bn_jax.analysis import statistics_consistency  # noqa: E402
from bn_jax.models import create_model  # noqa: E402
from bn_jax.training import input_pipeline, loop  # noqa: E402

NAME = "rethinking_batch"
# Config keys that select runs or only change logging: not in a run's
# fingerprint, so changing them keeps the finished runs.
NOT_FINGERPRINTED = ("log_every", "ema_momenta", "ghost_batch_sizes")


# ----------------------------------------------------------------------------
# Data, model, training pieces.

def training_config(config):
  """The library settings: optimizer, schedule and input pipeline."""
  return common.library_config(
      dataset=config.dataset, data_dir=config.data_dir, seed=int(config.seed),
      augment=bool(config.augment), batch_size=int(config.batch_size),
      eval_batch_size=int(config.eval_batch_size),
      num_train_steps=int(config.num_train_steps), optimizer="sgd",
      learning_rate=float(config.learning_rate),
      momentum=float(config.momentum),
      weight_decay=float(config.weight_decay), schedule=config.schedule,
      warmup_steps=int(config.warmup_steps))


def load_data(config):
  """Train (its first ``config.train_subset`` examples if > 0; the
  normalization statistics stay the full train set's) and test splits."""
  train, test = input_pipeline.load_train_test(training_config(config))
  return input_pipeline.first_examples(train, config.train_subset), test


def precise_batches(train_ds, tconfig, num: int, seed_offset: int) -> list:
  """``num`` shuffled training batches for PreciseBN (a stream other than
  the training order)."""
  it = input_pipeline.train_iterator(train_ds, tconfig,
                                     seed_offset=1000 + seed_offset)
  return [input_pipeline.to_device(b) for _, b in zip(range(num), it)]


def stats_divergence(ema, population) -> dict:
  """How far the EMA statistics are from the population ones, averaged over
  every feature of every layer: ``|mu_ema - mu_pop| / sigma_pop`` and
  ``|log(var_ema / var_pop)|``."""
  mean_err, var_err = [], []

  def visit(e, p):
    if isinstance(p, dict) and "mean" in p and "var" in p and not isinstance(
        p["mean"], dict):
      sigma = np.sqrt(np.asarray(p["var"], np.float64) + 1e-5)
      mean_err.append(np.abs(np.asarray(e["mean"], np.float64) -
                             np.asarray(p["mean"], np.float64)) / sigma)
      var_err.append(np.abs(np.log((np.asarray(e["var"], np.float64) + 1e-5) /
                                   (np.asarray(p["var"], np.float64) + 1e-5))))
      return
    for k in p:
      visit(e[k], p[k])
  visit(jax.device_get(ema), jax.device_get(population))
  return {"mean_abs_z": float(np.mean(np.concatenate(mean_err))),
          "var_abs_log_ratio": float(np.mean(np.concatenate(var_err)))}


# ----------------------------------------------------------------------------
# One run: train, evaluating at the requested steps.

def train_run(config, name: str, norm: str, norm_kwargs: dict, data,
              eval_sets: dict, *, eval_steps, log=print) -> dict:
  """Trains one model; at every step in ``eval_steps`` evaluates each of
  ``eval_sets`` (name -> list of full batches) with EMA, PreciseBN and
  batch statistics."""
  train_ds, _ = data
  tconfig = training_config(config)
  num_steps = int(config.num_train_steps)
  model = create_model(config.model, num_classes=train_ds.num_classes,
                       norm=norm, norm_kwargs=norm_kwargs,
                       **config.model_kwargs.to_dict())
  state, lr_fn, _ = loop.create_state(
      tconfig, model, num_train_steps=num_steps,
      input_shape=(tconfig.batch_size,) + tuple(train_ds.images.shape[1:]),
      seed=config.seed)
  eval_steps = sorted(set(int(s) for s in eval_steps if 0 <= s <= num_steps))
  evals = []
  eval_seconds = 0.0

  def evaluate(step, state):
    nonlocal eval_seconds
    if step not in eval_steps:
      return
    t_eval = time.perf_counter()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    population = precise_batch_stats(
        lambda v, b, **kw: model.apply(v, b["image"], **kw), variables,
        precise_batches(train_ds, tconfig, int(config.precise_bn_batches),
                        seed_offset=step),
        train=True)
    out = {"step": step,
           "stats_divergence": stats_divergence(state.batch_stats,
                                                population)}
    for set_name, batches in eval_sets.items():
      out[set_name] = statistics_consistency(
          model, variables, batches, population_stats=population)
    evals.append(out)
    eval_seconds += time.perf_counter() - t_eval

  t0 = time.perf_counter()
  evaluate(0, state)
  result = loop.train_loop(
      loop.step_functions(lr_fn).train_step, state,
      input_pipeline.train_iterator(train_ds, tconfig), end_step=num_steps,
      sync_every=config.log_every, sync_at=eval_steps,
      on_sync=lambda step, state, _: evaluate(step, state))
  curve, status = result.curve, result.status
  total = time.perf_counter() - t0
  record = dict(name=name, norm=norm, norm_kwargs=norm_kwargs, status=status,
                num_steps=num_steps, train_curve=curve, evals=evals,
                seconds=dict(total=round(total, 1),
                             eval=round(eval_seconds, 1)))
  last = evals[-1] if evals else {}
  test = last.get("test", {})
  log(f"[{name}] {status}: final test acc ema "
      f"{test.get('ema/accuracy', float('nan')):.4f} precise "
      f"{test.get('precise/accuracy', float('nan')):.4f} batch "
      f"{test.get('batch/accuracy', float('nan')):.4f}; {total:.1f}s "
      f"({eval_seconds:.1f}s evaluating)")
  return record


# ----------------------------------------------------------------------------
# The two sweeps.

def run_experiment(config, workdir: str, *, log=print) -> dict:
  t0 = time.perf_counter()
  data = load_data(config)
  train_ds, test_ds = data
  eval_sets = {
      "test": input_pipeline.leading_batches(test_ds, config.eval_batch_size,
                                     len(test_ds.labels)),
      "train_subset": input_pipeline.leading_batches(
          train_ds, config.eval_batch_size, config.train_eval_examples),
  }
  log(f"data: {config.dataset} train {train_ds.images.shape}, eval on "
      f"{sum(len(b['label']) for b in eval_sets['test'])} test / "
      f"{sum(len(b['label']) for b in eval_sets['train_subset'])} train "
      f"examples")

  def cached(name, train, extra):
    return common.cached_run(
        os.path.join(workdir, "runs", f"{name}.json"),
        common.fingerprint(config, extra, ignore=NOT_FINGERPRINTED), train,
        log=log)

  ema_runs = {}
  for m in config.ema_momenta:
    name = f"ema_momentum_{m:g}"
    ema_runs[str(m)] = cached(name, lambda m=m, name=name: train_run(
        config, name, "bn", {"momentum": float(m)}, data,
        {"test": eval_sets["test"]}, eval_steps=config.eval_steps, log=log),
                              ["ema", m])

  ghost_runs = {}
  for g in config.ghost_batch_sizes:
    if config.batch_size % g or config.eval_batch_size % g:
      raise ValueError(f"config.ghost_batch_sizes: {g} must divide "
                       f"config.batch_size={config.batch_size} and "
                       f"config.eval_batch_size={config.eval_batch_size}.")
    name = f"ghost_{g}"
    ghost_runs[str(g)] = cached(name, lambda g=g, name=name: train_run(
        config, name, "ghost", {"ghost_batch_size": int(g),
                                "momentum": float(config.ghost_momentum)},
        data, eval_sets, eval_steps=(config.num_train_steps,), log=log),
                                ["ghost", g])
  wall = time.perf_counter() - t0

  results = {"experiment": NAME, "config": config.to_dict(),
             "ema_vs_precise": summarize_ema(ema_runs),
             "ghost_batch": summarize_ghost(config, ghost_runs),
             "seconds": {k: v["seconds"] for k, v in
                         {**{f"ema_{k}": r for k, r in ema_runs.items()},
                          **{f"ghost_{k}": r for k, r in
                             ghost_runs.items()}}.items()},
             "wall_seconds_this_call": round(wall, 1),
             "device": str(jax.devices()[0])}
  common.write_json(os.path.join(workdir, "results.json"), results,
                    significant_digits=None)
  plot_ema(ema_runs, os.path.join(workdir, "ema_vs_precise.png"))
  plot_ghost(config, results["ghost_batch"],
             os.path.join(workdir, "ghost_batch.png"))
  log(format_tables(results))
  log(f"wall time this call: {wall:.0f}s; results in "
      f"{os.path.abspath(workdir)}")
  return results


def summarize_ema(ema_runs) -> dict:
  """Per momentum: test accuracy with EMA/precise/batch statistics and the
  statistics divergence at every evaluated step."""
  out = {}
  for m, run in ema_runs.items():
    rows = []
    for e in run["evals"]:
      t = e["test"]
      rows.append({"step": e["step"],
                   "ema_accuracy": t["ema/accuracy"],
                   "precise_accuracy": t["precise/accuracy"],
                   "batch_accuracy": t["batch/accuracy"],
                   "ema_loss": t["ema/loss"], "precise_loss": t["precise/loss"],
                   "batch_loss": t["batch/loss"],
                   **{f"ema_vs_pop_{k}": v
                      for k, v in e["stats_divergence"].items()}})
    out[m] = {"status": run["status"], "evals": rows}
  return out


def summarize_ghost(config, ghost_runs) -> dict:
  out = {}
  for g, run in ghost_runs.items():
    if not run["evals"]:
      out[g] = {"status": run["status"]}
      continue
    e = run["evals"][-1]
    test, train = e["test"], e["train_subset"]
    tail = run["train_curve"][-max(len(run["train_curve"]) // 10, 1):]
    out[g] = {
        "status": run["status"],
        "test_accuracy_ema": test["ema/accuracy"],
        "test_accuracy_precise": test["precise/accuracy"],
        "test_accuracy_batch": test["batch/accuracy"],
        "test_loss_ema": test["ema/loss"],
        "test_loss_precise": test["precise/loss"],
        "test_loss_batch": test["batch/loss"],
        "train_accuracy_batch": train["batch/accuracy"],
        "train_accuracy_precise": train["precise/accuracy"],
        "train_accuracy_ema": train["ema/accuracy"],
        "train_loss_batch": train["batch/loss"],
        "train_loss_precise": train["precise/loss"],
        # Train-test inconsistency of the normalization: the same training
        # examples, normalized as in training vs with population statistics.
        "normalization_gap": train["batch/accuracy"] -
                             train["precise/accuracy"],
        # Generalization gap with population statistics.
        "generalization_gap": train["precise/accuracy"] -
                              test["precise/accuracy"],
        # What the usual train-vs-test comparison shows: both together.
        "train_test_gap": train["batch/accuracy"] - test["precise/accuracy"],
        "final_train_loss_steps": float(np.mean([c[1] for c in tail])),
        "stats_divergence": e["stats_divergence"],
    }
  return out


def format_tables(results) -> str:
  lines = ["EMA vs PreciseBN (test accuracy %, ema / precise / batch):",
           "| step | " + " | ".join(f"m={m}" for m in results["ema_vs_precise"])
           + " |"]
  lines.append("|---" * (len(results["ema_vs_precise"]) + 1) + "|")
  runs = list(results["ema_vs_precise"].values())
  for i, row in enumerate(runs[0]["evals"]):
    cells = []
    for r in runs:
      e = r["evals"][i]
      cells.append(f"{100 * e['ema_accuracy']:.1f} / "
                   f"{100 * e['precise_accuracy']:.1f} / "
                   f"{100 * e['batch_accuracy']:.1f}")
    lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
  lines += ["", "Ghost batch sweep (accuracy %):",
            "| ghost | test ema | test precise | test batch | train batch | "
            "train precise | norm. gap | gen. gap |",
            "|---|---|---|---|---|---|---|---|"]
  for g, r in results["ghost_batch"].items():
    if "test_accuracy_ema" not in r:
      lines.append(f"| {g} | {r['status']} |")
      continue
    lines.append(
        f"| {g} | {100 * r['test_accuracy_ema']:.2f} | "
        f"{100 * r['test_accuracy_precise']:.2f} | "
        f"{100 * r['test_accuracy_batch']:.2f} | "
        f"{100 * r['train_accuracy_batch']:.2f} | "
        f"{100 * r['train_accuracy_precise']:.2f} | "
        f"{100 * r['normalization_gap']:+.2f} | "
        f"{100 * r['generalization_gap']:+.2f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Plots.

def plot_ema(ema_runs, path) -> None:
  import matplotlib
  fig, axes = common.figure(2, width=5, height=3.8)
  axes = axes[0]
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (m, run) in enumerate(ema_runs.items()):
    evals = run["evals"]
    s = [max(e["step"], 1) for e in evals]   # step 0 drawn at 1 (log axis)
    c = colors[i % len(colors)]
    axes[0].plot(s, [100 * e["test"]["ema/accuracy"] for e in evals],
                 "o-", color=c, label=f"EMA, momentum {m}")
    axes[1].plot(s, [e["stats_divergence"]["var_abs_log_ratio"]
                     for e in evals], "o-", color=c,
                 label=f"momentum {m}")
  first = next(iter(ema_runs.values()))["evals"]
  s = [max(e["step"], 1) for e in first]
  axes[0].plot(s, [100 * e["test"]["precise/accuracy"] for e in first], "k--",
               lw=2, label="PreciseBN")
  axes[0].plot(s, [100 * e["test"]["batch/accuracy"] for e in first], "k:",
               label="batch statistics")
  axes[0].set_ylabel("test accuracy (%)")
  axes[1].set_ylabel("mean |log(var_EMA / var_pop)|")
  axes[1].set_yscale("log")
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel("training step (0 drawn at 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_title("evaluation statistics over training")
  axes[1].set_title("EMA vs population variance")
  common.save(fig, path)


def plot_ghost(config, ghost, path) -> None:
  gs = [g for g in ghost if "test_accuracy_ema" in ghost[g]]
  if not gs:
    return
  x = [int(g) for g in gs]
  fig, axes = common.figure(2, width=5, height=3.8)
  axes = axes[0]
  for key, label, style in (
      ("test_accuracy_ema", "test, EMA stats", "o-"),
      ("test_accuracy_precise", "test, PreciseBN", "s--"),
      ("test_accuracy_batch", "test, ghost-batch stats", "^:"),
      ("train_accuracy_batch", "train subset, ghost-batch stats (train mode)",
       "v-")):
    axes[0].plot(x, [100 * ghost[g][key] for g in gs], style, label=label)
  for key, label, style in (
      ("normalization_gap", "train: train-mode minus PreciseBN", "o-"),
      ("generalization_gap", "PreciseBN: train minus test", "s--"),
      ("train_test_gap", "train (train mode) minus test (PreciseBN)", "^:")):
    axes[1].plot(x, [100 * ghost[g][key] for g in gs], style, label=label)
  axes[1].axhline(0, color="k", lw=0.5)
  axes[0].set_ylabel("accuracy (%)")
  axes[1].set_ylabel("accuracy gap (points)")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.set_xlabel(f"normalization (ghost) batch size, total batch "
                  f"{config.batch_size}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  common.save(fig, path)


if __name__ == "__main__":
  common.run_script(NAME, "exp_rethinking_batch.py", run_experiment)
