r"""Experiment 3d: Santurkar et al. (2018), noisy BN at several noise scales.

  python experiments/santurkar_noise.py [--workdir DIR] [--scale cpu|paper] \
      [--seeds 0,1,2] [--config.key=value ...]

The VGG of ``santurkar_vgg.py`` trained standard, with BN, and with noisy BN
under every entry of ``config.noise_settings``
(``configs/exp_santurkar_noise.py``: additive noise of growing scale and the
affine form ``y * s_f + m_f``). Per run: test accuracy and the drift of the
pre-activations (``santurkar_vgg.stability_summary``), averaged over the
tracked layers into ``mean_drift`` / ``std_drift`` (each in units of the
layer's initial std). The paper's claim holds for a setting where noisy BN
drifts more than the standard network and trains about as well as BN.

Writes ``results.json``, ``accuracy.png``, ``stability.png`` and
``noise.png``; with ``--seeds``, also ``noise_seeds.png`` (mean +- std).
"""
from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402

import common  # noqa: E402
import santurkar_vgg as sv  # noqa: E402

QUANTITIES = ("final_test_accuracy", "mean_drift", "std_drift")


def noise_label(name: str, setting) -> str:
  """``'affine m~U(-1,1) s~U(0.5,1.5)'``: the form and ranges of a setting."""
  def pair(r):
    return f"({r[0]:g},{r[1]:g})"
  return (f"{setting['noise_form']} m~U{pair(setting['noise_mean_range'])} "
          f"s~U{pair(setting['noise_std_range'])}")


def variants(config) -> list[sv.Variant]:
  """The reference norms (``config.norms``), then noisy BN per setting."""
  return [sv.Variant(sv.LABELS.get(n, n), n) for n in config.norms] + [
      sv.Variant(noise_label(name, s), "noisy_bn", dict(s))
      for name, s in config.noise_settings.items()]


def summarize(runs: dict) -> dict:
  """Per run: accuracy, per-layer stability, and its mean over layers."""
  out = {}
  for label, r in runs.items():
    stability = sv.stability_summary(r)
    out[label] = sv.run_summary(
        r, final_train_accuracy=sv.final_train_accuracy(r),
        stability=stability, **sv.drift_means(stability))
  return out


def resummarize(results: dict) -> dict:
  return summarize(results["runs"])


def plot_noise(stats: dict, labels: list[str], path: str, title: str) -> str:
  """Accuracy and drift per run (bars; error bars: ``std`` if given)."""
  fig, axes = common.figure(len(QUANTITIES), width=4.4, height=3.6)
  x = np.arange(len(labels))
  for ax, q in zip(axes[0], QUANTITIES):
    rows = [stats.get(f"{label}/{q}", {"mean": np.nan, "std": 0.0})
            for label in labels]
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
           capsize=3, color=["0.6", "0.3"] + ["C1"] * (len(labels) - 2))
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=6)
    ax.set_title(q, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle(title)
  return common.save(fig, path)


def plot_seeds(seeds_out: dict, workdir: str) -> str:
  """``noise_seeds.png`` from ``seeds.json``'s statistics."""
  stats = seeds_out["stats"]
  labels = list(dict.fromkeys(p.split("/")[0] for p in stats
                              if p.endswith("/mean_drift")))
  return plot_noise(stats, labels, os.path.join(workdir, "noise_seeds.png"),
                    f"noisy BN sweep, mean +- std over seeds "
                    f"{seeds_out['seeds']}")


def run_experiment(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  data, runs = sv.measure_variants(config, variants(config),
                                   dataset=config.dataset, model_name="vgg")
  summary = summarize(runs)
  out = {"experiment": "santurkar_noise", "config": common.to_dict(config),
         "summary": summary, "runs": runs}
  title = f"noisy BN: {sv.scale_text(config, data)}, seed {config.seed}"
  sv.plot_training(runs, workdir, title)
  plot_noise({f"{label}/{q}": {"mean": s[q], "std": 0.0}
              for label, s in summary.items() for q in QUANTITIES},
             list(summary), os.path.join(workdir, "noise.png"), title)
  return common.save_results(workdir, out, t0, summary=[
      f"{label}: test acc {s['final_test_accuracy']:.4f} (max "
      f"{s['max_test_accuracy']:.4f}), drift mean {s['mean_drift']:.3f} "
      f"std {s['std_drift']:.3f}" for label, s in summary.items()])


if __name__ == "__main__":
  common.run_script("santurkar_noise", "exp_santurkar_noise.py",
                    run_experiment, resummarize=resummarize,
                    plot_seeds=plot_seeds)
