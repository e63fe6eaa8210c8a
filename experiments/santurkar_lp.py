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

import bn_santurkar_lib as lib  # noqa: E402
import santurkar_vgg as sv  # noqa: E402


def p_label(p: float) -> str:
  return "l_inf" if math.isinf(p) else f"l_{p:g}"


def run_experiment(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  (data, train_ds, test_ds, device_data, probe,
   measure_batches) = sv.setup_data(config, dataset=config.dataset)
  variants = ([("BN", "bn", None)] if config.include_bn else []) + [
      (p_label(p), "lp", {"p": float(p)}) for p in config.ps]
  runs = {}
  for label, norm, kwargs in variants:
    runs[label] = sv.train_and_measure(
        config, label=label, norm=norm, norm_kwargs=kwargs, model_name="vgg",
        model_kwargs=dict(config.model_kwargs), data=data, train_ds=train_ds,
        test_ds=test_ds, device_data=device_data, probe=probe,
        measure_batches=measure_batches, ics=False, landscape=False)
  summary = {}
  for label, r in runs.items():
    kurt = r["records"][-1]["kurtosis"]
    summary[label] = {
        "final_test_accuracy": r["final_test_accuracy"],
        "max_test_accuracy": r["max_test_accuracy"], "status": r["status"],
        "final_train_accuracy": (r["train_curve"][-1][2]
                                 if r["train_curve"] else None),
        "final_mean_excess_kurtosis": float(np.mean(list(kurt.values()))),
        "final_excess_kurtosis": kurt,
        "stability": sv.stability_summary(r),
        "wall_seconds": r["wall_seconds"]}
  out = {"experiment": "santurkar_lp", "config": lib.to_dict(config),
         "summary": summary, "runs": runs,
         "total_wall_seconds": time.perf_counter() - t0}
  lib.write_json(os.path.join(workdir, "results.json"), out)
  title = (f"l_p normalization vs BN: {config.model_kwargs.variant} "
           f"x{config.model_kwargs.width_multiplier}, {len(train_ds.labels)} "
           f"CIFAR-10 images, {config.num_train_steps} steps")
  sv.plot_accuracy(runs, os.path.join(workdir, "accuracy.png"), title)
  sv.plot_stability(runs, os.path.join(workdir, "stability.png"),
                    "pre-activation percentiles (training mode, probe batch)")
  for label, s in summary.items():
    lib.log(f"{label}: test acc {s['final_test_accuracy']:.4f} (max "
            f"{s['max_test_accuracy']:.4f}), train acc "
            f"{s['final_train_accuracy']}, mean excess kurtosis "
            f"{s['final_mean_excess_kurtosis']:.3f}")
  lib.log(f"wrote {workdir} in {out['total_wall_seconds']:.0f}s")
  return out


def main(argv):
  del argv
  run_experiment(FLAGS.config, FLAGS.workdir)


FLAGS = None
if __name__ == "__main__":
  from absl import app
  FLAGS = lib.define_flags("santurkar_lp",
                           lib.config_path("exp_santurkar_lp.py"))
  app.run(main)
