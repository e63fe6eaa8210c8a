r"""Experiment 3c: Santurkar et al. (2018), l_p normalization vs BN.

  python experiments/santurkar_lp.py [--workdir DIR] [--scale cpu|paper] \
      [--config.key=value ...]

VGG with BN and with l_p normalization for p in ``config.ps``
(``configs/exp_santurkar_lp.py``); at ``num_points`` steps: test accuracy,
pre-activation percentiles/drift and the excess kurtosis of every layer's
pre-activations (how far from Gaussian), via
``santurkar_vgg.train_and_measure``.

Writes ``results.json``, ``accuracy.png``, ``stability.png``.
"""
from __future__ import annotations

import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402

import common  # noqa: E402
import santurkar_vgg as sv  # noqa: E402


def p_label(p: float) -> str:
  return "l_inf" if math.isinf(p) else f"l_{p:g}"


def variants(config) -> list[sv.Variant]:
  """BN (if ``config.include_bn``), then l_p for every p of ``config.ps``."""
  return ([sv.Variant("BN", "bn")] if config.include_bn else []) + [
      sv.Variant(p_label(p), "lp", {"p": float(p)}) for p in config.ps]


def run_experiment(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  data, runs = sv.measure_variants(config, variants(config),
                                   dataset=config.dataset, model_name="vgg")
  summary = {}
  for label, r in runs.items():
    kurt = r["records"][-1]["kurtosis"]
    summary[label] = sv.run_summary(
        r, final_train_accuracy=sv.final_train_accuracy(r),
        final_mean_excess_kurtosis=float(np.mean(list(kurt.values()))),
        final_excess_kurtosis=kurt, stability=sv.stability_summary(r))
  out = {"experiment": "santurkar_lp", "config": common.to_dict(config),
         "summary": summary, "runs": runs}
  sv.plot_training(runs, workdir, "l_p normalization vs BN: "
                   + sv.scale_text(config, data))
  return common.save_results(workdir, out, t0, summary=[
      f"{label}: test acc {s['final_test_accuracy']:.4f} (max "
      f"{s['max_test_accuracy']:.4f}), train acc {s['final_train_accuracy']}"
      f", mean excess kurtosis {s['final_mean_excess_kurtosis']:.3f}"
      for label, s in summary.items()])


if __name__ == "__main__":
  common.run_script("santurkar_lp", "exp_santurkar_lp.py", run_experiment)
