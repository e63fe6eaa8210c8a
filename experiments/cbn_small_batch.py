r"""Experiment 4: Cross-Iteration BN at small batch sizes (Yao et al., 2021).

  python experiments/cbn_small_batch.py --workdir ./workdir/experiments/cbn_small_batch
  python experiments/cbn_small_batch.py --scale paper     # GPU, ResNet-18
  python experiments/cbn_small_batch.py --config.batch_sizes='(4,2)'

The paper's claim (ResNet-18 on ImageNet, top-1 vs images per iteration):
BN collapses below batch 8, batch renorm (BRN) helps a little, GN is flat but
below BN at large batch, naive CBN (stale statistics averaged without the
Taylor compensation, ``rho = 0``) is about BN, and CBN stays close to
large-batch BN.

The grid: every method of ``config.methods`` (bn, gn, brn, naive_cbn, cbn,
cbn_nograd) at every per-step batch size of ``config.batch_sizes``, for every
seed of ``config.seeds``, each run trained on the same number of training
SAMPLES (so batch 2 takes 16x the steps of batch 32, with the learning rate
scaled linearly), then evaluated on the whole test set twice: with the
running (EMA) statistics and with PreciseBN population statistics
(``config.precise_bn_samples`` training samples under the final weights, in
batches of ``config.precise_bn_batch_size``; Wu & Johnson, 2021). CBN uses
the library's defaults (running-statistics momentum 0.9, gradient through
the compensation); ``cbn_nograd`` is CBN with ``compensation_grad=False``,
the official code's gradient. Every CBN run also measures the staleness of
its window (:func:`bn_jax.analysis.cbn_staleness`) at
``config.staleness_fractions`` of its steps: how far a past batch's
statistics have moved at the current weights, against that batch's sampling
noise, before and after compensation. Plus a CBN ablation at
``config.ablation_batch_size`` over the window ``k`` and the burn-in. The
scale is set by ``configs/exp_cbn_small_batch.py`` (``--scale cpu``
default, ``--scale paper``).

Outputs in the workdir: ``runs/<run>.json`` (one per run and seed; a rerun
skips runs whose JSON matches the current settings, so an interrupted sweep
resumes), ``results.json`` (every number, per seed and summarized),
``results.md`` (the tables), ``accuracy_vs_batch.png`` (the paper's
figure, mean and spread over seeds), ``ablation.png`` and
``train_curves.png``.

The training step is :func:`bn_jax.training.steps.train_step` (jitted, one
host dispatch per step: on XLA:CPU a ``lax.scan`` over steps was ~5x slower
for these convolutions), the model :class:`bn_jax.models.CifarResNet`.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from typing import NamedTuple, Optional

import jax
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import common  # noqa: E402
from bn_jax.analysis.cbn_staleness import cbn_staleness  # noqa: E402
from bn_jax.data import ArrayDataset, channel_stats  # noqa: E402
from bn_jax.models import CifarResNet  # noqa: E402
from bn_jax.training import input_pipeline, loop  # noqa: E402

NAME = "cbn_small_batch"
METHODS = ("bn", "gn", "brn", "naive_cbn", "cbn", "cbn_nograd")
CBN_METHODS = ("naive_cbn", "cbn", "cbn_nograd")
# Config keys that select runs or only change logging: not in a run's
# fingerprint, so changing them keeps the finished runs.
NOT_FINGERPRINTED = ("log_every", "compilation_cache", "methods",
                     "batch_sizes", "ablation_windows",
                     "ablation_burn_in_fractions", "ablation_batch_size",
                     "cbn_max_batch_size", "seeds")


# ----------------------------------------------------------------------------
# Runs of the grid.

class RunSpec(NamedTuple):
  """One training run: a method at a batch size from a seed (CBN: window and
  burn-in). ``cell`` names the run without its seed."""
  name: str
  method: str
  batch_size: int
  window: Optional[int] = None
  burn_in_fraction: Optional[float] = None
  group: str = "grid"          # 'grid' or 'ablation'
  seed: int = 0
  cell: str = ""


def run_specs(config) -> list[RunSpec]:
  """For every seed: the main grid (method x batch size), then the CBN
  ablation. Run names are ``<cell>_s<seed>``."""
  for m in config.methods:
    if m not in METHODS:
      raise ValueError(f"config.methods contains an unknown method {m!r}; "
                       f"known: {METHODS}.")
  if not config.seeds:
    raise ValueError("config.seeds must name at least one seed.")
  cells = []
  for b in config.batch_sizes:
    for m in config.methods:
      cbn = m in CBN_METHODS
      if cbn and b > config.cbn_max_batch_size:
        continue
      cells.append((f"{m}_b{b}", m, int(b),
                    int(config.cbn_window) if cbn else None,
                    float(config.cbn_burn_in_fraction) if cbn else None,
                    "grid"))
  b = int(config.ablation_batch_size)
  for k in config.ablation_windows:
    cells.append((f"cbn_k{k}_b{b}", "cbn", b, int(k),
                  float(config.cbn_burn_in_fraction), "ablation"))
  for f in config.ablation_burn_in_fractions:
    cells.append((f"cbn_burnin{f:g}_b{b}", "cbn", b, int(config.cbn_window),
                  float(f), "ablation"))
  return [RunSpec(f"{cell}_s{seed}", m, bs, window=k, burn_in_fraction=f,
                  group=group, seed=int(seed), cell=cell)
          for seed in config.seeds
          for cell, m, bs, k, f, group in cells]


def num_steps_of(config, batch_size: int) -> int:
  return max(int(config.train_samples) // batch_size, 1)


def norm_of(config, spec: RunSpec, num_steps: int) -> tuple[str, dict]:
  """(bn_jax.models norm name, its norm_kwargs) for a run."""
  m = spec.method
  if m == "bn":
    return "bn", dict(momentum=float(config.bn_momentum))
  if m == "gn":
    return "gn", dict(num_groups=int(config.gn_num_groups))
  if m == "brn":
    frac = lambda f: max(int(round(f * num_steps)), 0)
    warmup = frac(config.brn_warmup_fraction)
    return "brn", dict(
        momentum=float(config.bn_momentum), warmup_steps=warmup,
        r_max_steps=max(frac(config.brn_r_max_fraction), warmup),
        d_max_steps=max(frac(config.brn_d_max_fraction), warmup))
  # CBN: plain BN for the burn-in, then the compensated window (rho = 1) or
  # the uncompensated one (naive CBN, rho = 0). Every other setting is the
  # library's default (running-statistics momentum 0.9, gradient through the
  # compensation), except cbn_nograd: the official code's gradient.
  kwargs = dict(window=int(spec.window),
                burn_in=int(round(spec.burn_in_fraction * num_steps)),
                rho=0.0 if m == "naive_cbn" else 1.0)
  if m == "cbn_nograd":
    kwargs["compensation_grad"] = False
  return "cbn", kwargs


def training_config(config, batch_size: int, num_steps: int, seed: int):
  """The library settings of one run: optimizer, schedule (linear lr
  scaling, warm-up + cosine) and input pipeline."""
  return common.library_config(
      dataset=config.dataset, data_dir=config.data_dir, seed=int(seed),
      augment=bool(config.augment), batch_size=batch_size,
      eval_batch_size=int(config.eval_batch_size), num_train_steps=num_steps,
      optimizer="sgd",
      learning_rate=(float(config.base_learning_rate) * batch_size /
                     float(config.base_batch_size)),
      momentum=float(config.momentum),
      weight_decay=float(config.weight_decay), schedule="cosine",
      warmup_steps=int(round(float(config.warmup_fraction) * num_steps)))


# ----------------------------------------------------------------------------
# Data.

def downsample_images(images: np.ndarray, factor: int) -> np.ndarray:
  """Average-pools uint8 NHWC images by ``factor`` (rounded back to uint8)."""
  if factor == 1:
    return images
  n, h, w, c = images.shape
  if h % factor or w % factor:
    raise ValueError(f"config.downsample={factor} must divide the image size "
                     f"{h}x{w}.")
  pooled = images.reshape(n, h // factor, factor, w // factor, factor, c)
  pooled = pooled.astype(np.float32).mean(axis=(2, 4))
  return np.clip(np.rint(pooled), 0, 255).astype(np.uint8)


def load_data(config) -> tuple[ArrayDataset, ArrayDataset]:
  """Train/test splits, subset and downsampled as configured; the
  normalization statistics are recomputed on the (reduced) train split."""
  train, test = input_pipeline.load_train_test(common.library_config(
      dataset=config.dataset, data_dir=config.data_dir))
  train = input_pipeline.first_examples(train, config.train_subset)
  factor = int(config.downsample)
  train_images = downsample_images(train.images, factor)
  mean, std = channel_stats(train_images)

  def reduced(ds, images):
    return dataclasses.replace(ds, images=np.ascontiguousarray(images),
                               mean=mean, std=std)

  return (reduced(train, train_images),
          reduced(test, downsample_images(test.images, factor)))


# ----------------------------------------------------------------------------
# One run.

def init_run(config, spec: RunSpec, train_ds):
  """The untrained model and state of one run, exactly as the sweep builds
  them: ``(model, state, lr_fn, tconfig, num_steps, norm, norm_kwargs)``."""
  num_steps = num_steps_of(config, spec.batch_size)
  tconfig = training_config(config, spec.batch_size, num_steps, spec.seed)
  norm, norm_kwargs = norm_of(config, spec, num_steps)
  model = CifarResNet(num_classes=train_ds.num_classes,
                      stage_sizes=tuple(config.stage_sizes),
                      width=int(config.width), shortcut=config.shortcut,
                      norm=norm, norm_kwargs=norm_kwargs)
  state, lr_fn, _ = loop.create_state(
      tconfig, model, num_train_steps=num_steps,
      input_shape=(spec.batch_size,) + train_ds.image_shape, seed=spec.seed)
  return model, state, lr_fn, tconfig, num_steps, norm, norm_kwargs


def precise_bn_evaluation(config, state, model, eval_step, train_ds, test_ds,
                          tconfig) -> dict:
  """Test metrics with PreciseBN population statistics: the count-weighted
  moments of ``config.precise_bn_samples`` training samples (a stream other
  than the training order's, in batches of ``config.precise_bn_batch_size``)
  under the final weights. ``{}`` for a norm without batch statistics."""
  if not jax.tree.leaves(state.batch_stats) or not config.precise_bn_samples:
    return {}
  precise = loop.precise_bn_state_from_dataset(
      state, model.apply, train_ds, tconfig,
      samples=config.precise_bn_samples,
      batch_size=config.precise_bn_batch_size, seed_offset=1)
  metrics = loop.evaluate(eval_step, precise,
                          input_pipeline.eval_iterator(test_ds, tconfig))
  return {f"precise_bn_{k}": v for k, v in metrics.items()}


def staleness_summary(model, state, past_batches, rho: float) -> dict:
  """Per CBN layer, :meth:`LayerStaleness.summary` of its window against the
  ``past_batches`` (newest first) at the current weights."""
  layers = cbn_staleness(
      lambda v, b, **kw: model.apply(v, b["image"], **kw),
      {"params": state.params, "batch_stats": state.batch_stats},
      past_batches, rho=rho, train=True)
  return {name: layer.summary() for name, layer in layers.items()}


def train_run(config, spec: RunSpec, data, *, log=print) -> dict:
  """Trains one run from scratch and evaluates it; returns its record."""
  train_ds, test_ds = data
  model, state, lr_fn, tconfig, num_steps, norm, norm_kwargs = init_run(
      config, spec, train_ds)
  record = dict(spec._asdict(), norm=norm, norm_kwargs=norm_kwargs,
                num_steps=num_steps, train_samples=num_steps * spec.batch_size,
                learning_rate=tconfig.learning_rate,
                warmup_steps=tconfig.warmup_steps)
  step_fns = loop.step_functions(lr_fn)
  batches = input_pipeline.train_iterator(train_ds, tconfig)
  # CBN runs stop at the staleness steps to measure their window against
  # the batches it holds (kept here, newest last).
  cbn = spec.method in CBN_METHODS
  stops = sorted({min(max(int(round(f * num_steps)), 1), num_steps)
                  for f in config.staleness_fractions}) if cbn else []
  recent = collections.deque(maxlen=max(int(spec.window or 1) - 1, 1))
  curve, staleness, status, step = [], {}, "ok", 0
  first_step = train_seconds = 0.0
  for end in stops + [num_steps]:
    if end <= step:
      continue
    t0 = time.perf_counter()
    result = loop.train_loop(
        step_fns.train_step, state, batches, start_step=step, end_step=end,
        sync_every=config.log_every,
        before_step=lambda s, st, batch: recent.append(batch) if cbn else None)
    if step == 0:
      first_step = result.first_step_seconds
      train_seconds -= first_step
    train_seconds += time.perf_counter() - t0
    state, status, step = result.state, result.status, end
    curve += [(s, loss) for s, loss, _ in result.curve]
    if status != "ok":
      break
    if end in stops:
      staleness[str(end)] = dict(
          learning_rate=float(lr_fn(end - 1)),
          layers=staleness_summary(model, state, list(reversed(recent)),
                                   rho=float(norm_kwargs["rho"])))
  t_trained = time.perf_counter()
  # (step, mean train loss over the window): the accuracy is not recorded.
  record["train_curve"] = curve
  tail = [l for s, l in curve[-max(len(curve) // 10, 1):]]
  record["final_train_loss"] = float(np.mean(tail)) if tail else None
  record["status"] = status
  if cbn:
    record["staleness"] = staleness
  if status == "ok":
    record.update(loop.evaluate(step_fns.eval_step, state,
                                input_pipeline.eval_iterator(test_ds,
                                                             tconfig)))
    record.update(precise_bn_evaluation(config, state, model,
                                        step_fns.eval_step, train_ds,
                                        test_ds, tconfig))
  else:
    record.update(test_loss=None, test_accuracy=None, test_examples=0)
  t_end = time.perf_counter()
  record["seconds"] = dict(
      first_step_incl_compile=round(first_step, 2),
      train=round(train_seconds, 2),
      eval=round(t_end - t_trained, 2), total=round(
          first_step + train_seconds + t_end - t_trained, 2))
  acc = record["test_accuracy"]
  pacc = record.get("precise_bn_test_accuracy")
  log(f"[{spec.name}] {num_steps} steps of {spec.batch_size}, "
      f"lr {tconfig.learning_rate:.4g}: test acc "
      f"{'-' if acc is None else f'{acc:.4f}'}"
      f"{'' if pacc is None else f' (PreciseBN {pacc:.4f})'} "
      f"({record['status']}), {record['seconds']['total']:.1f}s "
      f"(compile+1st {record['seconds']['first_step_incl_compile']:.1f}s)")
  return record


# ----------------------------------------------------------------------------
# The sweep, the plots.

def spread(values) -> Optional[dict]:
  """Mean, sample standard deviation (ddof 1; 0 for one value), min, max
  and the values themselves; None if any run diverged or none ran."""
  if not values or any(v is None for v in values):
    return None
  v = np.asarray(values, np.float64)
  return dict(mean=float(v.mean()),
              std=float(v.std(ddof=1)) if v.size > 1 else 0.0,
              min=float(v.min()), max=float(v.max()), values=list(values))


def summarize(config, specs, records) -> dict:
  """Per cell (run without its seed): EMA and PreciseBN test accuracy over
  the seeds, and the median staleness over seeds and layers."""
  by_cell = collections.defaultdict(list)
  for spec in specs:
    by_cell[spec.cell].append(records[spec.name])
  cells = {}
  for cell, runs in by_cell.items():
    summary = dict(
        method=runs[0]["method"], batch_size=runs[0]["batch_size"],
        seeds=[r["seed"] for r in runs],
        test_accuracy=spread([r["test_accuracy"] for r in runs]),
        precise_bn_test_accuracy=spread(
            [r.get("precise_bn_test_accuracy") for r in runs]))
    if "staleness" in runs[0]:
      summary["staleness"] = staleness_medians(runs)
    cells[cell] = summary
  return cells


STALENESS_KEYS = ("stale_mean", "compensated_mean", "stale_var",
                  "compensated_var", "mean_gain", "var_gain")


def staleness_medians(runs) -> dict:
  """``{stop fraction index: {key: median over seeds and layers}}`` with the
  learning rate at the stop (the same for every seed)."""
  out = {}
  for stop in runs[0]["staleness"]:
    layers = [layer for r in runs if stop in r.get("staleness", {})
              for layer in r["staleness"][stop]["layers"].values()]
    if not layers:
      continue
    out[stop] = dict(
        learning_rate=runs[0]["staleness"][stop]["learning_rate"],
        **{k: float(np.median([l[k] for l in layers]))
           for k in STALENESS_KEYS})
  return out


def run_sweep(config, workdir: str, *, log=print) -> dict:
  """Runs (or resumes) every run of the grid; writes results and plots."""
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  if config.compilation_cache:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  specs = run_specs(config)
  t0 = time.perf_counter()
  data = load_data(config)
  log(f"data: train {data[0].images.shape}, test {data[1].images.shape} "
      f"({time.perf_counter() - t0:.1f}s); {len(specs)} runs")
  records = {spec.name: common.cached_run(
      os.path.join(workdir, "runs", f"{spec.name}.json"),
      common.fingerprint(config, spec._asdict(), ignore=NOT_FINGERPRINTED),
      lambda spec=spec: train_run(config, spec, data, log=log), log=log)
      for spec in specs}
  wall = time.perf_counter() - t0

  cells = summarize(config, specs, records)
  results = {
      "experiment": NAME,
      "config": config.to_dict(),
      "cells": cells,
      "runs": {k: {kk: vv for kk, vv in r.items() if kk != "train_curve"}
               for k, r in records.items()},
      "sweep_seconds_this_call": round(wall, 1),
      "device": str(jax.devices()[0]),
  }
  common.write_json(os.path.join(workdir, "results.json"), results,
                    significant_digits=None)
  tables = format_tables(config, cells)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(tables + "\n")
  plot_results(config, records, specs, cells, workdir)
  log(tables)
  log(f"sweep wall time this call: {wall:.0f}s; results in "
      f"{os.path.abspath(workdir)}")
  return results


def _cell_text(stats) -> str:
  """``mean ± std`` in % (``diverged`` / ``not run``)."""
  if stats is None:
    return "diverged"
  return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def format_tables(config, cells) -> str:
  """Markdown: accuracy with running statistics, with PreciseBN, the
  ablation, and the staleness of every CBN cell."""
  seeds = ", ".join(str(s) for s in config.seeds)
  out = []
  for key, title in (("test_accuracy", "running (EMA) statistics"),
                     ("precise_bn_test_accuracy", "PreciseBN statistics")):
    out += [f"Test accuracy (%), {title}: mean ± std over seeds {seeds}", "",
            "| method | " + " | ".join(f"b={b}" for b in config.batch_sizes)
            + " |", "|---" * (len(config.batch_sizes) + 1) + "|"]
    for m in config.methods:
      row = [_cell_text(cells[f"{m}_b{b}"][key]) if f"{m}_b{b}" in cells
             else "not run" for b in config.batch_sizes]
      if key == "precise_bn_test_accuracy" and m == "gn":
        row = ["(no batch statistics)"] * len(row)
      out.append(f"| {_LABELS.get(m, m)} | " + " | ".join(row) + " |")
    out.append("")
  ablation = [(c, v) for c, v in cells.items()
              if c.startswith(("cbn_k", "cbn_burnin"))]
  if ablation:
    out += [f"CBN ablation at batch {config.ablation_batch_size} "
            "(test accuracy %, EMA / PreciseBN)", "",
            "| run | EMA | PreciseBN |", "|---|---|---|"]
    for c, v in ablation:
      out.append(f"| {c} | {_cell_text(v['test_accuracy'])} | "
                 f"{_cell_text(v['precise_bn_test_accuracy'])} |")
    out.append("")
  out += ["Staleness of the CBN window (median over seeds, layers, ages and "
          "channels; |entry - fresh| in units of the batch's sampling "
          "noise; gain = stale error / compensated error)", "",
          "| cell | step | lr | stale mean | compensated mean | stale var | "
          "compensated var | mean gain | var gain |",
          "|---|---|---|---|---|---|---|---|---|"]
  for c, v in cells.items():
    for stop, st in v.get("staleness", {}).items():
      out.append(f"| {c} | {stop} | {st['learning_rate']:.3g} | " +
                 " | ".join(f"{st[k]:.3g}" for k in STALENESS_KEYS) + " |")
  return "\n".join(out)


_LABELS = {"bn": "BN", "gn": "GN", "brn": "BRN", "naive_cbn": "naive CBN",
           "cbn": "CBN", "cbn_nograd": "CBN, official gradient"}


def plot_results(config, records, specs, cells, workdir) -> None:
  # The paper's figure: accuracy vs batch size per iteration, mean over
  # seeds with min-max bars; EMA (solid) and PreciseBN (dashed).
  fig, axes = common.figure(2, width=5.5, height=4, sharey=True)
  sizes = list(config.batch_sizes)
  for ax, key, title in ((axes[0, 0], "test_accuracy", "running statistics"),
                         (axes[0, 1], "precise_bn_test_accuracy",
                          "PreciseBN statistics")):
    for i, m in enumerate(config.methods):  # one colour per method in both
      xs, ys, lo, hi = [], [], [], []
      for b in sizes:
        st = cells.get(f"{m}_b{b}", {}).get(key)
        if st is None:
          continue
        xs.append(b)
        ys.append(100 * st["mean"])
        lo.append(100 * (st["mean"] - st["min"]))
        hi.append(100 * (st["max"] - st["mean"]))
      if xs:
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3,
                    color=f"C{i}", label=_LABELS.get(m, m))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.invert_xaxis()
    ax.set_xlabel("batch size per iteration")
    ax.set_title(f"{title} ({len(config.seeds)} seeds, min-max)")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("test accuracy (%)")
  axes[0, 0].legend(fontsize=7)
  common.save(fig, os.path.join(workdir, "accuracy_vs_batch.png"), dpi=100)

  # Ablation at one batch size, with BN / naive CBN / default CBN as
  # references: mean over seeds, min-max bars.
  b = config.ablation_batch_size
  names = [n for n in (f"bn_b{b}", f"naive_cbn_b{b}", f"cbn_b{b}",
                       f"cbn_nograd_b{b}") if n in cells]
  names += list(dict.fromkeys(s.cell for s in specs if s.group == "ablation"))
  stats = [cells[n]["test_accuracy"] for n in names]
  if len(names) > 1 and all(st is not None for st in stats):
    fig, axes = common.figure(1, width=7, height=3.5)
    ax = axes[0, 0]
    labels = []
    for n in names:
      r = next(r for r in records.values() if r["cell"] == n)
      if r["method"] == "cbn" and r["group"] == "ablation":
        labels.append(f"CBN k={r['window']}\nburn-in {r['burn_in_fraction']:g}")
      else:
        labels.append(_LABELS.get(r["method"], r["method"]).replace(", ",
                                                                      "\n"))
    means = [100 * st["mean"] for st in stats]
    ax.bar(range(len(names)), means, yerr=[
        [m - 100 * st["min"] for m, st in zip(means, stats)],
        [100 * st["max"] - m for m, st in zip(means, stats)]], capsize=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("test accuracy (%), running statistics")
    ax.set_title(f"CBN window / burn-in ablation, batch {b}")
    ax.set_ylim(max(min(100 * st["min"] for st in stats) - 10, 0), None)
    common.save(fig, os.path.join(workdir, "ablation.png"), dpi=100)

  # Training loss against samples seen, one panel per batch size (first
  # seed).
  seed = config.seeds[0]
  fig, axes = common.figure(len(sizes), width=3, height=3, sharey=True)
  for ax, bs in zip(axes[0], sizes):
    for m in config.methods:
      curve = records.get(f"{m}_b{bs}_s{seed}", {}).get("train_curve", [])
      if curve:
        s, l = zip(*curve)
        ax.plot(np.asarray(s) * bs, l, label=_LABELS.get(m, m))
    ax.set_title(f"batch {bs}, seed {seed}")
    ax.set_xlabel("samples seen")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("train loss (window mean)")
  axes[0][-1].legend(fontsize=7)
  common.save(fig, os.path.join(workdir, "train_curves.png"), dpi=80)


if __name__ == "__main__":
  common.run_script(NAME, "exp_cbn_small_batch.py", run_sweep)
