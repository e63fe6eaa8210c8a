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

A small SGD loop of its own (a measurement of the library API, independent
of ``train.py``). Usage::

  python experiments/cbn_compensation_grad.py --seeds 0 1 2 \
      --out experiments/cbn_compensation_grad.json

(``experiments/cbn_compensation_grad.{json,txt}``: that run, 3 seeds.)
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax.analysis.cbn_staleness import cbn_staleness
from bn_jax.data.datasets import load_dataset
from bn_jax.models import create_model
from bn_jax.nn.precise_bn import without_cbn_windows

VARIANTS = {
    "bn": ("bn", {}),
    "cbn": ("cbn", {"compensation_grad": False}),
    "cbn_cg": ("cbn", {"compensation_grad": True}),
    "cbn_m99": ("cbn", {"momentum": 0.99, "compensation_grad": False}),
}


def _arrays(split):
  ds = load_dataset("digits", split)
  x = (ds.images.astype(np.float32) / 255.0 - ds.mean) / ds.std
  return x.reshape(len(x), -1), ds.labels


def run(variant, seed, *, steps=3000, batch=2, lr=0.1, window=8,
        burn_in=300, every=100, staleness_at=(1000, 2000, 3000)):
  norm, extra = VARIANTS[variant]
  kwargs = dict(window=window, burn_in=burn_in, **extra) if norm == "cbn" \
      else dict(extra)
  model = create_model("mlp", num_classes=10, norm=norm, norm_kwargs=kwargs,
                       hidden=(100, 100, 100), activation="sigmoid")
  x_train, y_train = _arrays("train")
  x_test, y_test = _arrays("test")
  variables = model.init(jax.random.PRNGKey(seed), jnp.asarray(x_train[:2]),
                         train=False)

  @jax.jit
  def train_step(variables, x, y):
    def loss_fn(params):
      logits, upd = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, x,
          train=True, mutable=["batch_stats"])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1)), upd
    grads, upd = jax.grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - lr * g, variables["params"], grads)
    return {"params": params, "batch_stats": upd["batch_stats"]}

  @jax.jit
  def accuracy(variables):
    logits = model.apply(variables, jnp.asarray(x_test), train=False)
    return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_test))

  apply_fn = lambda v, b, **kw: model.apply(v, b, **kw)  # noqa: E731
  x_all = jnp.asarray(x_train)

  @jax.jit
  def population_moments(variables):
    # PreciseBN with the whole training set as one batch (weights frozen;
    # every layer's batch_moments hook stores its population moments).
    _, upd = model.apply(
        {"params": variables["params"],
         "batch_stats": without_cbn_windows(variables["batch_stats"])},
        x_all,
        train=True, mutable=["batch_stats", "batch_moments"])
    return upd["batch_moments"]

  def precise(variables):
    def swap(stats, moments):
      if "mean" in moments:
        return dict(stats, mean=moments["mean"], var=moments["var"])
      return {k: swap(stats[k], moments[k]) if k in moments else stats[k]
              for k in stats}
    return {"params": variables["params"],
            "batch_stats": swap(variables["batch_stats"],
                                population_moments(variables))}

  def layer_means(moments):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(moments)[0]:
      key = "/".join(p.key for p in path[:-1])
      out.setdefault(key, {})[path[-1].key] = np.asarray(leaf)
    return {k: (v["mean"], v["var"]) for k, v in out.items()}

  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(x_train))
                          for _ in range(steps * batch // len(x_train) + 2)])
  history, staleness, recent = [], {}, []
  t0 = time.time()
  for step in range(steps):
    idx = order[step * batch:(step + 1) * batch]
    xb, yb = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
    variables = train_step(variables, xb, yb)
    recent = [xb] + recent[:window - 2]
    done = step + 1
    if done % every == 0:
      history.append((done, layer_means(population_moments(variables))))
    if norm == "cbn" and done in staleness_at:
      rep = cbn_staleness(apply_fn, variables, recent, train=True)
      staleness[done] = {k: v.summary() for k, v in rep.items()}
  drift = {}
  for (s0, a), (s1, b) in zip(history, history[1:]):
    if s0 < burn_in:
      continue
    for layer in a:
      mu0, var0 = a[layer]
      mu1, _ = b[layer]
      drift.setdefault(layer, []).append(
          float(np.mean(np.abs(mu1 - mu0) / np.sqrt(var0 + 1e-12))))
  ema_acc = float(accuracy(variables))
  precise_acc = float(accuracy(precise(variables)))
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
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
