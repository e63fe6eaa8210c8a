r"""Experiment 3b: Santurkar et al. (2018), ICS of a deep linear network.

  python experiments/santurkar_dln.py [--workdir DIR] [--scale cpu|paper] \
      [--seeds 0,1,2] [--sweep learning_rate=0.001,0.002,0.005,0.01] \
      [--config.key=value ...]

A deep linear network with and without BN on synthetic Gaussian data
(``configs/exp_santurkar_dln.py``), measured at ``num_points`` steps with
``bn_jax.analysis.internal_covariate_shift`` (the run's real SGD step) and
``landscape_probe``, plus test accuracy and pre-activation drift (see
``santurkar_vgg.train_and_measure``). The paper finds BN does not reduce --
and in the DLN can increase -- ICS.

Writes ``results.json``, ``ics.png``, ``landscape.png``, ``accuracy.png``.
"""
from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import common  # noqa: E402
import santurkar_vgg as sv  # noqa: E402

LABELS = {"none": "DLN", "bn": "DLN + BN"}


def summarize(runs: dict, learning_rate: float) -> dict:
  """Per run label: accuracy, ICS and landscape summaries."""
  out = {}
  for label, r in runs.items():
    ics = sv.ics_summary(r["records"])
    out[label] = sv.run_summary(
        r, ics=ics, ics_after_init=sv.ics_after_init(ics),
        landscape=sv.landscape_summary(r["records"], learning_rate))
  return out


def resummarize(results: dict) -> dict:
  return summarize(results["runs"], results["config"]["learning_rate"])


def run_experiment(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  _, runs = sv.measure_variants(
      config, [sv.Variant(LABELS.get(norm, norm), norm, ics=True,
                          landscape=True) for norm in config.norms],
      dataset="synthetic_gaussian", model_name="deep_linear")
  summary = summarize(runs, config.learning_rate)
  out = {"experiment": "santurkar_dln", "config": common.to_dict(config),
         "summary": summary, "runs": runs}
  title = (f"deep linear net, depth {config.model_kwargs.depth}, width "
           f"{config.model_kwargs.width}, {config.num_train_steps} steps")
  sv.plot_accuracy(runs, os.path.join(workdir, "accuracy.png"), title)
  sv.plot_ics_curves(runs, os.path.join(workdir, "ics.png"),
                     f"ICS (Def. 2.1), {title}")
  sv.plot_landscape(runs, os.path.join(workdir, "landscape.png"),
                    f"landscape along the gradient, {title}")
  ics = {label: [(x["step"], round(x["mean_cosine"], 4),
                  round(x["mean_l2_diff"], 5)) for x in s["ics"]]
         for label, s in summary.items()}
  return common.save_results(workdir, out, t0, summary=[
      f"{label}: acc {s['final_test_accuracy']:.4f}; ics {ics[label]}; "
      f"landscape {s['landscape'].get('mean_after_init')}"
      for label, s in summary.items()])


if __name__ == "__main__":
  common.run_script("santurkar_dln", "exp_santurkar_dln.py", run_experiment,
                    sweep_quantities=sv.SWEEP_QUANTITIES,
                    resummarize=resummarize)
