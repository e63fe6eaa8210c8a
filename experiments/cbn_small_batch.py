r"""Experiment 4: Cross-Iteration BN at small batch sizes (Yao et al., 2021).

  python experiments/cbn_small_batch.py --workdir ./workdir/experiments/cbn_small_batch
  python experiments/cbn_small_batch.py --scale paper     # GPU, ResNet-18
  python experiments/cbn_small_batch.py --config.batch_sizes='(4,2)'

The paper's claim (ResNet-18 on ImageNet, top-1 vs images per iteration):
BN collapses below batch 8, batch renorm (BRN) helps a little, GN is flat but
below BN at large batch, naive CBN (stale statistics averaged without the
Taylor compensation, ``rho = 0``) is about BN, and CBN stays close to
large-batch BN.

The grid: every method of ``config.methods`` (bn, gn, brn, naive_cbn, cbn) at
every per-step batch size of ``config.batch_sizes``, each run trained from
the same seed on the same number of training SAMPLES (so batch 2 takes 16x
the steps of batch 32, with the learning rate scaled linearly), then
evaluated on the whole test set with the running statistics; plus a CBN
ablation at ``config.ablation_batch_size`` over the window ``k`` and the
burn-in. The scale is set by ``configs/exp_cbn_small_batch.py``
(``--scale cpu`` default, ``--scale paper``).

Outputs in the workdir: ``runs/<run>.json`` (one per run; a rerun skips runs
whose JSON matches the current settings, so an interrupted sweep resumes),
``results.json`` (every number), ``accuracy_vs_batch.png`` (the paper's
figure), ``ablation.png`` and ``train_curves.png``.

The training step is :func:`bn_jax.training.steps.train_step` (jitted, one
host dispatch per step: on XLA:CPU a ``lax.scan`` over steps was ~5x slower
for these convolutions), the model :class:`bn_jax.models.CifarResNet`.
"""
from __future__ import annotations

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
from bn_jax.data import ArrayDataset, channel_stats  # noqa: E402
from bn_jax.models import CifarResNet  # noqa: E402
from bn_jax.training import input_pipeline, loop  # noqa: E402

NAME = "cbn_small_batch"
METHODS = ("bn", "gn", "brn", "naive_cbn", "cbn")
# Config keys that select runs or only change logging: not in a run's
# fingerprint, so changing them keeps the finished runs.
NOT_FINGERPRINTED = ("log_every", "compilation_cache", "methods",
                     "batch_sizes", "ablation_windows",
                     "ablation_burn_in_fractions", "ablation_batch_size",
                     "cbn_max_batch_size")


# ----------------------------------------------------------------------------
# Runs of the grid.

class RunSpec(NamedTuple):
  """One training run: a method at a batch size (CBN: window and burn-in)."""
  name: str
  method: str
  batch_size: int
  window: Optional[int] = None
  burn_in_fraction: Optional[float] = None
  group: str = "grid"          # 'grid' or 'ablation'


def run_specs(config) -> list[RunSpec]:
  """The main grid (method x batch size), then the CBN ablation."""
  for m in config.methods:
    if m not in METHODS:
      raise ValueError(f"config.methods contains an unknown method {m!r}; "
                       f"known: {METHODS}.")
  specs = []
  for b in config.batch_sizes:
    for m in config.methods:
      cbn = m in ("cbn", "naive_cbn")
      if cbn and b > config.cbn_max_batch_size:
        continue
      specs.append(RunSpec(
          f"{m}_b{b}", m, int(b),
          window=int(config.cbn_window) if cbn else None,
          burn_in_fraction=float(config.cbn_burn_in_fraction) if cbn else None))
  b = int(config.ablation_batch_size)
  for k in config.ablation_windows:
    specs.append(RunSpec(f"cbn_k{k}_b{b}", "cbn", b, window=int(k),
                         burn_in_fraction=float(config.cbn_burn_in_fraction),
                         group="ablation"))
  for f in config.ablation_burn_in_fractions:
    specs.append(RunSpec(f"cbn_burnin{f:g}_b{b}", "cbn", b,
                         window=int(config.cbn_window),
                         burn_in_fraction=float(f), group="ablation"))
  return specs


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
  # the uncompensated one (naive CBN, rho = 0).
  return "cbn", dict(
      window=int(spec.window), momentum=float(config.bn_momentum),
      burn_in=int(round(spec.burn_in_fraction * num_steps)),
      rho=0.0 if m == "naive_cbn" else 1.0)


def training_config(config, batch_size: int, num_steps: int):
  """The library settings of one run: optimizer, schedule (linear lr
  scaling, warm-up + cosine) and input pipeline."""
  return common.library_config(
      dataset=config.dataset, data_dir=config.data_dir, seed=int(config.seed),
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
  tconfig = training_config(config, spec.batch_size, num_steps)
  norm, norm_kwargs = norm_of(config, spec, num_steps)
  model = CifarResNet(num_classes=train_ds.num_classes,
                      stage_sizes=tuple(config.stage_sizes),
                      width=int(config.width), shortcut=config.shortcut,
                      norm=norm, norm_kwargs=norm_kwargs)
  state, lr_fn, _ = loop.create_state(
      tconfig, model, num_train_steps=num_steps,
      input_shape=(spec.batch_size,) + train_ds.image_shape, seed=config.seed)
  return model, state, lr_fn, tconfig, num_steps, norm, norm_kwargs


def train_run(config, spec: RunSpec, data, *, log=print) -> dict:
  """Trains one run from scratch and evaluates it; returns its record."""
  train_ds, test_ds = data
  _, state, lr_fn, tconfig, num_steps, norm, norm_kwargs = init_run(
      config, spec, train_ds)
  record = dict(spec._asdict(), norm=norm, norm_kwargs=norm_kwargs,
                num_steps=num_steps, train_samples=num_steps * spec.batch_size,
                learning_rate=tconfig.learning_rate,
                warmup_steps=tconfig.warmup_steps)
  t_start = time.perf_counter()
  step_fns = loop.step_functions(lr_fn)
  result = loop.train_loop(
      step_fns.train_step, state,
      input_pipeline.train_iterator(train_ds, tconfig), end_step=num_steps,
      sync_every=config.log_every)
  state, curve, record["status"] = result.state, result.curve, result.status
  first_step = result.first_step_seconds
  t_trained = time.perf_counter()
  # (step, mean train loss over the window): the accuracy is not recorded.
  record["train_curve"] = curve = [(step, loss) for step, loss, _ in curve]
  tail = [l for s, l in curve[-max(len(curve) // 10, 1):]]
  record["final_train_loss"] = float(np.mean(tail)) if tail else None
  if record["status"] == "ok":
    record.update(loop.evaluate(step_fns.eval_step, state,
                                  input_pipeline.eval_iterator(test_ds,
                                                               tconfig)))
  else:
    record.update(test_loss=None, test_accuracy=None, test_examples=0)
  t_end = time.perf_counter()
  t_compiled = t_start + first_step
  record["seconds"] = dict(
      first_step_incl_compile=round(t_compiled - t_start, 2),
      train=round(t_trained - t_compiled, 2),
      eval=round(t_end - t_trained, 2), total=round(t_end - t_start, 2))
  acc = record["test_accuracy"]
  log(f"[{spec.name}] {num_steps} steps of {spec.batch_size}, "
      f"lr {tconfig.learning_rate:.4g}: test acc "
      f"{'-' if acc is None else f'{acc:.4f}'} ({record['status']}), "
      f"{record['seconds']['total']:.1f}s "
      f"(compile+1st {record['seconds']['first_step_incl_compile']:.1f}s)")
  return record


# ----------------------------------------------------------------------------
# The sweep, the plots.

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

  grid = {m: {str(b): records[f"{m}_b{b}"]["test_accuracy"]
              for b in config.batch_sizes if f"{m}_b{b}" in records}
          for m in config.methods}
  results = {
      "experiment": NAME,
      "config": config.to_dict(),
      "test_accuracy": grid,
      "ablation": {s.name: records[s.name]["test_accuracy"]
                   for s in specs if s.group == "ablation"},
      "runs": {k: {kk: vv for kk, vv in r.items() if kk != "train_curve"}
               for k, r in records.items()},
      "sweep_seconds_this_call": round(wall, 1),
      "device": str(jax.devices()[0]),
  }
  common.write_json(os.path.join(workdir, "results.json"), results,
                    significant_digits=None)
  plot_results(config, records, specs, workdir)
  log(format_table(config, grid))
  log(f"sweep wall time this call: {wall:.0f}s; results in "
      f"{os.path.abspath(workdir)}")
  return results


def format_table(config, grid) -> str:
  head = "| method | " + " | ".join(f"b={b}" for b in config.batch_sizes)
  lines = [head + " |", "|---" * (len(config.batch_sizes) + 1) + "|"]
  for m, row in grid.items():
    cells = ["not run" if str(b) not in row else
             "diverged" if row[str(b)] is None else f"{100 * row[str(b)]:.1f}"
             for b in config.batch_sizes]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


_LABELS = {"bn": "BN", "gn": "GN", "brn": "BRN", "naive_cbn": "naive CBN",
           "cbn": "CBN"}


def plot_results(config, records, specs, workdir) -> None:
  # The paper's figure: accuracy vs batch size per iteration.
  fig, axes = common.figure(1, width=5.5, height=4)
  ax = axes[0, 0]
  sizes = list(config.batch_sizes)
  for m in config.methods:
    xs = [b for b in sizes if f"{m}_b{b}" in records]
    accs = [records[f"{m}_b{b}"]["test_accuracy"] for b in xs]
    ys = [np.nan if a is None else 100 * a for a in accs]
    ax.plot(xs, ys, marker="o", label=_LABELS.get(m, m))
  ax.set_xscale("log", base=2)
  ax.set_xticks(sizes)
  ax.set_xticklabels([str(b) for b in sizes])
  ax.invert_xaxis()
  ax.set_xlabel("batch size per iteration")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{config.dataset}, {config.train_samples} train samples/run")
  ax.grid(alpha=0.3)
  ax.legend()
  common.save(fig, os.path.join(workdir, "accuracy_vs_batch.png"), dpi=100)

  # Ablation at one batch size, with BN / default CBN as references.
  b = config.ablation_batch_size
  names = [n for n in (f"bn_b{b}", f"naive_cbn_b{b}", f"cbn_b{b}")
           if n in records]
  names += [s.name for s in specs if s.group == "ablation"]
  if len(names) > 1:
    fig, axes = common.figure(1, width=6, height=3.5)
    ax = axes[0, 0]
    accs = [records[n]["test_accuracy"] for n in names]
    labels = []
    for n in names:
      r = records[n]
      if r["method"] == "cbn":
        labels.append(f"CBN k={r['window']}\nburn-in {r['burn_in_fraction']:g}")
      else:
        labels.append(_LABELS.get(r["method"], r["method"]))
    ax.bar(range(len(names)), [0 if a is None else 100 * a for a in accs])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"CBN window / burn-in ablation, batch {b}")
    lo = min(100 * a for a in accs if a is not None) if any(
        a is not None for a in accs) else 0
    ax.set_ylim(max(lo - 10, 0), None)
    common.save(fig, os.path.join(workdir, "ablation.png"), dpi=100)

  # Training loss against samples seen, one panel per batch size.
  fig, axes = common.figure(len(sizes), width=3, height=3, sharey=True)
  for ax, bs in zip(axes[0], sizes):
    for m in config.methods:
      curve = records.get(f"{m}_b{bs}", {}).get("train_curve", [])
      if curve:
        s, l = zip(*curve)
        ax.plot(np.asarray(s) * bs, l, label=_LABELS.get(m, m))
    ax.set_title(f"batch {bs}")
    ax.set_xlabel("samples seen")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("train loss (window mean)")
  axes[0][-1].legend(fontsize=7)
  common.save(fig, os.path.join(workdir, "train_curves.png"), dpi=80)


if __name__ == "__main__":
  common.run_script(NAME, "exp_cbn_small_batch.py", run_sweep)
