"""CBN's gradient through the compensation, measured on the digits MLP at 2
examples per step (issue 10, items 2 and 7).

Setting (``configs/digits_small_batch_cbn.py`` at batch 2): the 3x100
sigmoid MLP, plain SGD lr 0.1, 3000 steps, CBN window 8, burn-in 300, every
other CBN setting at its default. Variants: ``bn``; ``cbn``;
``cbn_cg`` (``compensation_grad=True``); ``cbn_m99`` (the former running
statistics momentum 0.99, official gradient). ``cbn`` is the official
code's gradient (``compensation_grad=False``); this measurement made
``compensation_grad=True`` the default. Per seed and variant it reports

* drift: every 100 steps, the population (whole training set, PreciseBN)
  mean of each layer's raw pre-normalization activations; the drift is the
  mean over channels and 100-step intervals after burn-in of
  ``|mu_{t+100} - mu_t| / sigma_t``;
* test accuracy with the running (EMA) statistics and with PreciseBN
  statistics (the 1,442 training images as one batch, weights frozen, CBN
  windows emptied so that every layer normalizes with that batch's own
  statistics), and their gap;
* for CBN, the staleness diagnostic (``bn_jax.analysis.cbn_staleness``) at
  steps 1000, 2000 and 3000: a past batch's statistics recomputed at the
  current weights against the stale and the compensated entries, in units of
  the batch's sampling noise.

Training is the library's (``bn_jax.training.loop``: ``create_state``,
``step_functions``, ``train_loop`` with its ``on_sync``/``before_step``
hooks for the measurements), on the library's input pipeline. Usage::

  python experiments/cbn_compensation_grad.py --seeds 0 1 2 \
      --out docs/results/cbn_compensation_grad/results.json \
      | tee docs/results/cbn_compensation_grad/log.txt

(``docs/results/cbn_compensation_grad/``: that run, 3 seeds.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import common  # noqa: E402
from bn_jax.analysis.cbn_staleness import cbn_staleness  # noqa: E402
from bn_jax.models import create_model  # noqa: E402
from bn_jax.nn.precise_bn import BATCH_MOMENTS, BATCH_STATS  # noqa: E402
from bn_jax.nn.precise_bn import without_cbn_windows  # noqa: E402
from bn_jax.training import input_pipeline, loop  # noqa: E402

VARIANTS = {
    "bn": ("bn", {}),
    "cbn": ("cbn", {"compensation_grad": False}),
    "cbn_cg": ("cbn", {"compensation_grad": True}),
    "cbn_m99": ("cbn", {"momentum": 0.99, "compensation_grad": False}),
}


def run(variant, seed, *, steps=3000, batch=2, lr=0.1, window=8,
        burn_in=300, every=100, staleness_at=(1000, 2000, 3000)):
  norm, extra = VARIANTS[variant]
  kwargs = dict(window=window, burn_in=burn_in, **extra) if norm == "cbn" \
      else dict(extra)
  model = create_model("mlp", num_classes=10, norm=norm, norm_kwargs=kwargs,
                       hidden=(100, 100, 100), activation="sigmoid")
  config = common.library_config(
      dataset="digits", batch_size=batch, seed=seed, optimizer="sgd",
      learning_rate=lr, momentum=0.0, schedule="constant",
      num_train_steps=steps)
  train_ds, test_ds = input_pipeline.load_train_test(config)
  state, lr_fn, _ = loop.create_state(
      config, model, num_train_steps=steps,
      input_shape=(batch,) + train_ds.image_shape, seed=seed)
  step_fns = loop.step_functions(lr_fn)
  # The whole training set as one batch: the population of every layer.
  whole = next(input_pipeline.eval_iterator(train_ds, common.library_config(
      config, eval_batch_size=len(train_ds.labels))))
  x_all = whole["image"][:len(train_ds.labels)]

  @jax.jit
  def population_moments(state):
    # Weights frozen; every layer's batch_moments hook stores its population
    # moments (CBN windows emptied: each layer sees only this batch).
    _, upd = model.apply(
        {"params": state.params,
         "batch_stats": without_cbn_windows(state.batch_stats)},
        x_all, train=True, mutable=[BATCH_STATS, BATCH_MOMENTS])
    return upd[BATCH_MOMENTS]

  def layer_means(moments):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(moments)[0]:
      key = "/".join(p.key for p in path[:-1])
      out.setdefault(key, {})[path[-1].key] = np.asarray(leaf)
    return {k: (v["mean"], v["var"]) for k, v in out.items()}

  history, staleness, recent = [], {}, []

  def record_batch(step, state, batch):
    del step, state
    recent.insert(0, {"image": batch["image"]})
    del recent[window - 1:]

  def measure(step, state, window_metrics):
    del window_metrics
    if step % every == 0:
      history.append((step, layer_means(population_moments(state))))
    if norm == "cbn" and step in staleness_at:
      rep = cbn_staleness(
          lambda v, b, **kw: model.apply(v, b["image"], **kw),
          {"params": state.params, "batch_stats": state.batch_stats},
          recent, train=True)
      staleness[step] = {k: v.summary() for k, v in rep.items()}

  t0 = time.time()
  result = loop.train_loop(
      step_fns.train_step, state, input_pipeline.train_iterator(train_ds,
                                                                config),
      end_step=steps, sync_every=every, sync_at=staleness_at,
      on_sync=measure, before_step=record_batch)
  if result.status != "ok":
    raise RuntimeError(f"{variant} seed {seed}: {result.status}")
  state = result.state
  drift = {}
  for (s0, a), (s1, b) in zip(history, history[1:]):
    if s0 < burn_in:
      continue
    for layer in a:
      mu0, var0 = a[layer]
      mu1, _ = b[layer]
      drift.setdefault(layer, []).append(
          float(np.mean(np.abs(mu1 - mu0) / np.sqrt(var0 + 1e-12))))

  def accuracy(state):
    return float(loop.evaluate(step_fns.eval_step, state,
                               input_pipeline.eval_iterator(test_ds, config))
                 ["test_accuracy"])
  ema_acc = accuracy(state)
  # PreciseBN with the whole training set as one batch.
  precise_acc = accuracy(loop.precise_bn_state(
      state, model.apply, iter([{"image": x_all}]), num_batches=1))
  return dict(variant=variant, seed=seed, ema_acc=ema_acc,
              precise_acc=precise_acc, gap=ema_acc - precise_acc,
              drift_per_100={k: float(np.mean(v)) for k, v in drift.items()},
              staleness=staleness, seconds=time.time() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  results = []
  for seed in args.seeds:
    for variant in args.variants:
      r = run(variant, seed, steps=args.steps)
      results.append(r)
      drift = " ".join(f"{k.split('/')[0]}={v:.3f}"
                       for k, v in sorted(r["drift_per_100"].items()))
      print(f"{variant:8s} seed {seed}: EMA {r['ema_acc']:.4f} PreciseBN "
            f"{r['precise_acc']:.4f} gap {r['gap']:+.4f} | drift/100 "
            f"{drift} | {r['seconds']:.0f}s", flush=True)
      for at, layers in r["staleness"].items():
        for name, s in sorted(layers.items()):
          print(f"    step {at} {name}: stale mean {s['stale_mean']:.3f} "
                f"comp {s['compensated_mean']:.3f} (x noise), gain "
                f"{s['mean_gain']:.2f}; var stale {s['stale_var']:.3f} comp "
                f"{s['compensated_var']:.3f}", flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
