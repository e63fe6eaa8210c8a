r"""Experiment 3a: Santurkar et al. (2018) on a CIFAR-10 VGG.

  python experiments/santurkar_vgg.py [--workdir DIR] [--scale cpu|paper] \
      [--config.key=value ...]

Standard VGG vs VGG+BN vs VGG+noisy BN (``configs/exp_santurkar_vgg.py``),
trained side by side; at ``num_points`` evenly spaced steps (step 0
included) each run is measured with the library's instruments on a fresh
training batch:

* test accuracy (running statistics) -- Santurkar Fig. 1/2 (left);
* distribution stability of the pre-activations (the inputs to the ReLUs,
  training mode, a fixed probe batch; noisy BN with fresh noise each time):
  ``bn_jax.analysis.ActivationTracker`` -- percentiles of one unit of an early
  and of the last conv layer, and every layer's per-unit mean/std drift from
  the first measurement (Fig. 2);
* ICS (Def. 2.1): ``bn_jax.analysis.internal_covariate_shift`` with the
  run's real optimizer step (``optax_update_fn``) -- per layer
  ``||G - G'||`` and ``cos(G, G')`` (Fig. 5);
* landscape (Fig. 4): ``bn_jax.analysis.landscape_probe`` along the
  gradient -- loss range, gradient predictiveness, effective beta-smoothness
  (for ``config.landscape_norms``).

Writes ``results.json`` and ``accuracy.png``, ``stability.png``, ``ics.png``,
``landscape.png`` into ``--workdir``. ``santurkar_dln.py``,
``santurkar_lp.py`` and ``santurkar_noise.py`` reuse :func:`measure_variants`,
the summaries and plots.
"""
from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from bn_jax import analysis  # noqa: E402
from bn_jax.models import create_model  # noqa: E402
from bn_jax.training import input_pipeline, loop  # noqa: E402

# What --sweep plots (e.g. --sweep learning_rate=0.05,0.01), per run.
SWEEP_QUANTITIES = ("ics_after_init/mean_relative_l2_diff",
                    "ics_after_init/mean_cosine",
                    "landscape/mean_after_init/lr_times_beta_smoothness",
                    "final_test_accuracy")

LABELS = {"none": "Standard", "bn": "Standard + BN", "noisy_bn": "BN + noise",
          "lp": "l_p"}


def measurement_steps(num_train_steps: int, num_points: int) -> list[int]:
  """``num_points`` evenly spaced steps from 0 to ``num_train_steps``."""
  return sorted({int(round(s)) for s in np.linspace(0, num_train_steps,
                                                    num_points)})


def make_instruments(model, tx, step_sizes, *, ics: bool, landscape: bool,
                     method: str = "map"):
  """Jitted measurement functions of one model (see module docstring).

  ``method``: the instruments' ``'map'`` (sequential ``lax.map``) or
  ``'vmap'``; conv nets use ``'vmap'`` because XLA:CPU runs convolutions in a
  loop body very slowly (see ``loop.Trainer``).
  """
  loss_fn = analysis.make_loss_fn(model, train=True)

  def measure(params, batch_stats, opt_state, batch):
    out = {}
    if ics:
      out.update(analysis.internal_covariate_shift(
          loss_fn, params, batch_stats, batch,
          update_fn=analysis.optax_update_fn(tx, opt_state), method=method,
          layers=model.layer_names()))  # the model's own forward order
    if landscape:
      out.update(analysis.landscape_probe(loss_fn, params, batch_stats, batch,
                                          step_sizes=step_sizes,
                                          method=method))
    return out

  def capture(variables, x, rng):
    return analysis.capture_preactivations(model, variables, x, train=True,
                                           rngs={"noise": rng})

  return jax.jit(measure), jax.jit(capture)


def excess_kurtosis(intermediates) -> dict[str, float]:
  """Per layer: the mean over units of the pre-activations' excess kurtosis
  (0 for a Gaussian), float64 NumPy."""
  out = {}
  for name, values in analysis.preactivations(intermediates).items():
    v = np.asarray(values, np.float64)
    v = v.reshape(-1, v.shape[-1])
    centered = v - v.mean(axis=0)
    var = (centered ** 2).mean(axis=0)
    kurt = (centered ** 4).mean(axis=0) / np.maximum(var, 1e-30) ** 2 - 3.0
    out[name] = float(np.mean(kurt[var > 0])) if np.any(var > 0) else 0.0
  return out


class MeasureData(NamedTuple):
  """What every run of a Santurkar script trains and is measured on."""
  settings: object        # common.library_config: data, optimizer, schedule
  train_ds: object
  test_ds: object
  device_data: tuple      # the normalized training set on the device
  probe: dict             # fixed batch: pre-activation percentiles / drift
  measure_batches: list   # one fixed batch per measurement point: ICS etc.


def setup_data(config, *, dataset: str) -> MeasureData:
  """Data, its device copy, the probe batch and the measurement batches."""
  settings = common.library_config(
      dataset=dataset, batch_size=config.batch_size, seed=config.seed,
      data_dir=config.data_dir, eval_batch_size=config.eval_batch_size,
      learning_rate=config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, schedule=config.schedule,
      decay_boundaries=tuple(config.decay_boundaries))
  if "synthetic" in config:
    settings.synthetic = config.synthetic
  train_ds, test_ds = input_pipeline.load_train_test(settings)
  train_ds = input_pipeline.subset(train_ds, config.train_subset,
                                   seed=config.seed)
  test_ds = input_pipeline.subset(test_ds, config.test_subset,
                                  seed=config.seed)
  points = measurement_steps(config.num_train_steps, config.num_points)
  return MeasureData(
      settings, train_ds, test_ds, input_pipeline.normalized_arrays(train_ds),
      probe=input_pipeline.fixed_batch(train_ds, config.probe_size,
                                       seed=1234),
      measure_batches=[
          input_pipeline.fixed_batch(train_ds, config.batch_size,
                                     seed=2000 + k)
          for k in range(len(points))])


def train_and_measure(config, data: MeasureData, *, label: str, norm: str,
                      norm_kwargs, model_name: str, ics: bool,
                      landscape: bool) -> dict:
  """Trains one run (``model_name`` with ``config.model_kwargs``), measuring
  at ``measurement_steps``; returns its records."""
  model = create_model(model_name, num_classes=data.train_ds.num_classes,
                       norm=norm, norm_kwargs=norm_kwargs,
                       **dict(config.model_kwargs))
  run = loop.Trainer(model, data.settings, data.train_ds, data.test_ds,
                     num_train_steps=config.num_train_steps, seed=config.seed,
                     device_data=data.device_data, scan=config.scan)
  step_sizes = analysis.geometric_step_sizes(
      config.learning_rate * config.step_size_range[0],
      config.learning_rate * config.step_size_range[1],
      num=config.num_step_sizes)
  measure, capture = make_instruments(model, run.tx, step_sizes, ics=ics,
                                      landscape=landscape,
                                      method=config.analysis_method)
  trackers = {f"layer{layer}": analysis.ActivationTracker(unit=0, layer=layer)
              for layer in config.tracked_layers}
  points = measurement_steps(config.num_train_steps, config.num_points)
  records = []
  t0 = time.perf_counter()
  measure_seconds = 0.0
  for k, point in enumerate(points):
    for _ in run.train_chunks(point, config.chunk_steps):
      pass
    if run.status != "ok":
      break
    t1 = time.perf_counter()
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 99), point)
    batch = dict(data.measure_batches[k], rng=rng)
    rec = {"step": run.step}
    if ics or landscape:
      rec.update(analysis.to_python(jax.device_get(measure(
          run.state.params, run.state.batch_stats, run.state.opt_state,
          batch))))
    inter = capture(run.variables, data.probe["image"], rng)
    for name, tracker in trackers.items():
      for key, value in tracker.record(run.step, inter).items():
        rec[f"{name}/{key}"] = value
    rec["kurtosis"] = excess_kurtosis(inter)
    rec.update(run.evaluate())
    measure_seconds += time.perf_counter() - t1
    records.append(rec)
    common.log(f"[{label}] step {run.step}: test acc "
               f"{rec['test_accuracy']:.4f}"
               + (f", loss range {rec['landscape/loss_range']:.3g}, beta "
                  f"{rec['landscape/beta_smoothness']:.3g}" if landscape
                  else "")
               + (f", ics loss {rec['ics/loss']:.3g}" if ics else ""))
  wall = time.perf_counter() - t0
  return {"label": label, "norm": norm, "norm_kwargs": norm_kwargs,
          "status": run.status, "records": records,
          "train_curve": run.curve, "step_sizes": step_sizes,
          "trackers": {n: t.history() for n, t in trackers.items()},
          "final_test_accuracy": records[-1]["test_accuracy"],
          "max_test_accuracy": max(r["test_accuracy"] for r in records),
          "wall_seconds": wall, "measure_seconds": measure_seconds,
          "seconds_per_step": run.seconds_per_step()}


class Variant(NamedTuple):
  """One run of a Santurkar script: a norm and which instruments it gets."""
  label: str
  norm: str
  norm_kwargs: dict | None = None
  ics: bool = False
  landscape: bool = False


def measure_variants(config, variants, *, dataset: str,
                     model_name: str) -> tuple[MeasureData, dict]:
  """:func:`setup_data` once, then :func:`train_and_measure` for every
  :class:`Variant`; returns the data and ``{label: run}``."""
  data = setup_data(config, dataset=dataset)
  runs = {}
  for v in variants:
    runs[v.label] = train_and_measure(
        config, data, label=v.label, norm=v.norm, norm_kwargs=v.norm_kwargs,
        model_name=model_name, ics=v.ics, landscape=v.landscape)
  return data, runs


def run_summary(run: dict, **extra) -> dict:
  """The accuracy and status of one run, ``extra``, and its wall time."""
  return {"final_test_accuracy": run["final_test_accuracy"],
          "max_test_accuracy": run["max_test_accuracy"],
          "status": run["status"], **extra,
          "wall_seconds": run["wall_seconds"]}


# ---------------------------------------------------------------------------
# Summaries and plots shared by the Santurkar scripts.

def ics_summary(records: list[dict]) -> dict:
  """Per measurement step: mean over layers (the first excluded: G' = G by
  definition) of ||G - G'||, ||G - G'|| / ||G|| and cos(G, G')."""
  out = []
  for rec in records:
    layers = sorted({k.split("/")[1] for k in rec if k.startswith("ics/")
                     and k.endswith("/position")},
                    key=lambda n: rec[f"ics/{n}/position"])[1:]
    if not layers:
      continue
    l2 = [rec[f"ics/{n}/l2_diff"] for n in layers]
    rel = [rec[f"ics/{n}/l2_diff"] / max(rec[f"ics/{n}/grad_norm"], 1e-30)
           for n in layers]
    cos = [rec[f"ics/{n}/cosine"] for n in layers]
    out.append({"step": rec["step"], "mean_l2_diff": float(np.mean(l2)),
                "mean_relative_l2_diff": float(np.mean(rel)),
                "mean_cosine": float(np.mean(cos)),
                "min_cosine": float(np.min(cos))})
  return out


def ics_after_init(ics: list[dict]) -> dict:
  """The :func:`ics_summary` entries averaged over the measurement points
  after step 0 (training, not initialization); empty without ICS."""
  later = [x for x in ics if x["step"] > 0] or ics
  if not later:
    return {}
  return {k: float(np.mean([x[k] for x in later])) for k in (
      "mean_l2_diff", "mean_relative_l2_diff", "mean_cosine", "min_cosine")}


def landscape_summary(records: list[dict],
                      learning_rate: float | None = None) -> dict:
  """The landscape probes per measurement point and their mean after step
  0; with ``learning_rate``, also ``lr_times_beta_smoothness`` of that mean
  (gradient descent on a beta-smooth function is stable for lr x beta < 2,
  so values near 2 mean the run sits at the edge of stability)."""
  keys = ("loss_range", "grad_diff_max", "grad_diff_range", "beta_smoothness",
          "grad_norm")
  rows = [r for r in records if "landscape/loss_range" in r]
  if not rows:
    return {}
  out = {k: [float(r[f"landscape/{k}"]) for r in rows] for k in keys}
  out["steps"] = [r["step"] for r in rows]
  # Averages over the points after step 0 (training, not initialization).
  later = [i for i, r in enumerate(rows) if r["step"] > 0] or [0]
  out["mean_after_init"] = {k: float(np.mean([out[k][i] for i in later]))
                            for k in keys}
  if learning_rate is not None:
    out["mean_after_init"]["lr_times_beta_smoothness"] = (
        learning_rate * out["mean_after_init"]["beta_smoothness"])
  return out


def stability_summary(run: dict) -> dict:
  """Per tracked layer: the final per-unit mean drift and std drift, each
  divided by the layer's average per-unit std at the first measurement."""
  out = {}
  for name, hist in run["trackers"].items():
    for key in hist:
      if key.endswith("/mean_drift"):
        layer = key[:-len("/mean_drift")]
        std0 = max(float(np.asarray(hist[f"{layer}/std"])[0]), 1e-12)
        out[layer] = {
            "mean_drift_over_std0": float(np.asarray(hist[key])[-1]) / std0,
            "std_drift_over_std0": float(np.asarray(
                hist[f"{layer}/std_drift"])[-1]) / std0}
    break  # every tracker holds the drift of all layers: one is enough
  return out


def drift_means(stability: dict) -> dict:
  """``mean_drift`` / ``std_drift``: :func:`stability_summary`'s per-layer
  drifts averaged over the tracked layers."""
  return {"mean_drift": float(np.mean([s["mean_drift_over_std0"]
                                       for s in stability.values()])),
          "std_drift": float(np.mean([s["std_drift_over_std0"]
                                      for s in stability.values()]))}


def final_train_accuracy(run: dict):
  """Training accuracy of the last chunk (train mode), None without one."""
  return run["train_curve"][-1][2] if run["train_curve"] else None


def scale_text(config, data: MeasureData) -> str:
  """``'vgg11 x0.125, 10000 CIFAR-10 images, 800 steps'``: a plot title."""
  return (f"{config.model_kwargs.variant} "
          f"x{config.model_kwargs.width_multiplier}, "
          f"{len(data.train_ds.labels)} CIFAR-10 images, "
          f"{config.num_train_steps} steps")


def plot_training(runs: dict, workdir: str, title: str) -> None:
  """``accuracy.png`` and ``stability.png`` of the Santurkar VGG scripts."""
  plot_accuracy(runs, os.path.join(workdir, "accuracy.png"), title)
  plot_stability(runs, os.path.join(workdir, "stability.png"),
                 "pre-activation percentiles (training mode, probe batch)")


def plot_accuracy(runs: dict, path: str, title: str) -> str:
  fig, axes = common.figure(2)
  for label, run in runs.items():
    curve = np.asarray(run["train_curve"]) if run["train_curve"] else None
    if curve is not None:
      axes[0, 0].plot(curve[:, 0], curve[:, 2], label=label)
    steps = [r["step"] for r in run["records"]]
    axes[0, 1].plot(steps, [r["test_accuracy"] for r in run["records"]], "o-",
                    label=label)
  axes[0, 0].set_title("training accuracy (per chunk)")
  axes[0, 1].set_title("test accuracy")
  for ax in axes[0]:
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
  axes[0, 1].legend(fontsize=8)
  fig.suptitle(title)
  return common.save(fig, path)


def plot_stability(runs: dict, path: str, title: str) -> str:
  """Percentiles of unit 0 of each tracked layer (rows) per run (columns)."""
  tracker_names = list(next(iter(runs.values()))["trackers"])
  fig, axes = common.figure(len(runs), len(tracker_names), width=3.4,
                         height=2.6)
  for c, (label, run) in enumerate(runs.items()):
    for r, name in enumerate(tracker_names):
      hist = run["trackers"][name]
      ax = axes[r, c]
      for k, q in enumerate(hist["percentiles"]):
        ax.plot(hist["steps"], np.asarray(hist["percentile_values"])[:, k],
                label=f"{q:g}th")
      ax.set_title(f"{label}: {name}, unit 0", fontsize=8)
      ax.tick_params(labelsize=7)
  axes[0, 0].legend(fontsize=6)
  fig.suptitle(title)
  return common.save(fig, path)


def plot_ics_curves(runs: dict, path: str, title: str) -> str:
  """Left: per-layer l2 / cosine at the last point (library plot_ics style);
  right: the layer-mean over training."""
  fig, axes = common.figure(3, width=4.0)
  width = 0.8 / max(len(runs), 1)
  for i, (label, run) in enumerate(runs.items()):
    rec = run["records"][-1]
    layers = sorted({k.split("/")[1] for k in rec if k.startswith("ics/")
                     and k.endswith("/position")},
                    key=lambda n: rec[f"ics/{n}/position"])
    if not layers:
      continue
    x = np.arange(len(layers)) + (i - (len(runs) - 1) / 2) * width
    axes[0, 0].bar(x, [rec[f"ics/{n}/l2_diff"] for n in layers], width,
                   label=label)
    axes[0, 1].bar(x, [rec[f"ics/{n}/cosine"] for n in layers], width,
                   label=label)
    summary = ics_summary(run["records"])
    axes[0, 2].plot([s["step"] for s in summary],
                    [s["mean_cosine"] for s in summary], "o-", label=label)
  axes[0, 0].set_title("||G - G'||_2 per layer (last point)", fontsize=9)
  axes[0, 1].set_title("cos(G, G') per layer (last point)", fontsize=9)
  axes[0, 2].set_title("mean cos(G, G') over layers 2..k", fontsize=9)
  axes[0, 0].set_xlabel("layer")
  axes[0, 1].set_xlabel("layer")
  axes[0, 2].set_xlabel("training step")
  axes[0, 0].set_yscale("log")
  if axes[0, 1].get_legend_handles_labels()[0]:  # no ICS measured: no legend
    axes[0, 1].legend(fontsize=8)
  fig.suptitle(title)
  return common.save(fig, path)


def plot_landscape(runs: dict, path: str, title: str) -> str:
  from bn_jax.analysis import plotting
  stacked = {}
  for label, run in runs.items():
    rows = [r for r in run["records"] if "landscape/loss_range" in r]
    if not rows:
      continue
    stacked[label] = {k: np.asarray([r[k] for r in rows]) for k in (
        "landscape/loss_min", "landscape/loss_max", "landscape/grad_diff_min",
        "landscape/grad_diff_max", "landscape/beta_smoothness")}
    stacked[label]["steps"] = np.asarray([r["step"] for r in rows])
  if not stacked:
    return ""
  fig = plotting.plot_landscape(stacked, title=title)
  return plotting.save_figure(fig, path, dpi=90)


# ---------------------------------------------------------------------------

def variants(config) -> list[Variant]:
  """One :class:`Variant` per ``config.norms`` (noisy BN with
  ``config.noise``)."""
  return [Variant(LABELS.get(norm, norm), norm,
                  dict(config.noise) if norm == "noisy_bn" else None,
                  ics=norm in config.ics_norms,
                  landscape=norm in config.landscape_norms)
          for norm in config.norms]


def summarize(runs: dict, learning_rate: float) -> dict:
  """Per run label: accuracy, ICS, landscape and stability summaries."""
  out = {}
  for label, r in runs.items():
    ics, stability = ics_summary(r["records"]), stability_summary(r)
    out[label] = run_summary(
        r, final_train_accuracy=final_train_accuracy(r), ics=ics,
        ics_after_init=ics_after_init(ics),
        landscape=landscape_summary(r["records"], learning_rate),
        stability=stability, **drift_means(stability),
        seconds_per_step=r["seconds_per_step"])
  return out


def resummarize(results: dict) -> dict:
  """:func:`summarize` of a saved ``results.json`` (``--seeds`` reading a
  finished seed back with this code's summaries)."""
  return summarize(results["runs"], results["config"]["learning_rate"])


def run_experiment(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  data, runs = measure_variants(config, variants(config),
                                dataset=config.dataset, model_name="vgg")
  summary = summarize(runs, config.learning_rate)
  out = {"experiment": "santurkar_vgg", "config": common.to_dict(config),
         "summary": summary, "runs": runs}
  plot_training(runs, workdir, scale_text(config, data))
  plot_ics_curves(runs, os.path.join(workdir, "ics.png"), "ICS (Def. 2.1)")
  plot_landscape(runs, os.path.join(workdir, "landscape.png"),
                 f"landscape along the gradient, eta in lr x "
                 f"{tuple(config.step_size_range)}")
  return common.save_results(workdir, out, t0, summary=[
      f"{label}: acc {s['final_test_accuracy']:.4f} (max "
      f"{s['max_test_accuracy']:.4f}); ics {(s['ics'] or [None])[-1]}; "
      f"landscape {s['landscape'].get('mean_after_init')}; stability "
      f"{s['stability']}" for label, s in summary.items()])


if __name__ == "__main__":
  common.run_script("santurkar_vgg", "exp_santurkar_vgg.py", run_experiment,
                    sweep_quantities=SWEEP_QUANTITIES,
                    resummarize=resummarize)
