r"""Experiment 3b: Santurkar et al. (2018), ICS of a deep linear network.

  python experiments/santurkar_dln.py [--workdir DIR] [--scale cpu|paper] \
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

import bn_santurkar_lib as lib  # noqa: E402
import santurkar_vgg as sv  # noqa: E402

LABELS = {"none": "DLN", "bn": "DLN + BN"}


def run_experiment(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  (data, train_ds, test_ds, device_data, probe,
   measure_batches) = sv.setup_data(config, dataset="synthetic_gaussian")
  runs = {}
  for norm in config.norms:
    label = LABELS.get(norm, norm)
    runs[label] = sv.train_and_measure(
        config, label=label, norm=norm, norm_kwargs=None,
        model_name="deep_linear", model_kwargs=dict(config.model_kwargs),
        data=data, train_ds=train_ds, test_ds=test_ds,
        device_data=device_data, probe=probe,
        measure_batches=measure_batches, ics=True, landscape=True)
  summary = {label: {
      "final_test_accuracy": r["final_test_accuracy"],
      "max_test_accuracy": r["max_test_accuracy"], "status": r["status"],
      "ics": sv.ics_summary(r["records"]),
      "landscape": sv.landscape_summary(r["records"]),
      "wall_seconds": r["wall_seconds"]} for label, r in runs.items()}
  out = {"experiment": "santurkar_dln", "config": lib.to_dict(config),
         "summary": summary, "runs": runs,
         "total_wall_seconds": time.perf_counter() - t0}
  lib.write_json(os.path.join(workdir, "results.json"), out)
  title = (f"deep linear net, depth {config.model_kwargs.depth}, width "
           f"{config.model_kwargs.width}, {config.num_train_steps} steps")
  sv.plot_accuracy(runs, os.path.join(workdir, "accuracy.png"), title)
  sv.plot_ics_curves(runs, os.path.join(workdir, "ics.png"),
                     f"ICS (Def. 2.1), {title}")
  sv.plot_landscape(runs, os.path.join(workdir, "landscape.png"),
                    f"landscape along the gradient, {title}")
  for label, s in summary.items():
    lib.log(f"{label}: acc {s['final_test_accuracy']:.4f}; ics "
            f"{[(x['step'], round(x['mean_cosine'], 4), round(x['mean_l2_diff'], 5)) for x in s['ics']]}; "
            f"landscape {s['landscape'].get('mean_after_init')}")
  lib.log(f"wrote {workdir} in {out['total_wall_seconds']:.0f}s")
  return out


def main(argv):
  del argv
  run_experiment(FLAGS.config, FLAGS.workdir)


FLAGS = None
if __name__ == "__main__":
  from absl import app
  FLAGS = lib.define_flags("santurkar_dln",
                           lib.config_path("exp_santurkar_dln.py"))
  app.run(main)
