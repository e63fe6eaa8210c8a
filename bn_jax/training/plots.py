"""Matplotlib (Agg backend, no display needed) plots of the metric records."""
from __future__ import annotations

from typing import Mapping, Sequence

from bn_jax.training.metrics import series

PANELS = (("test_accuracy", "test accuracy"), ("test_loss", "test loss"),
          ("train_loss", "train loss (running mean)"))


def plot_runs(runs: Mapping[str, Sequence[Mapping]], path: str, *,
              title: str = "") -> str:
  """One panel per metric in ``PANELS``, one curve per run; saves a PNG.

  Args:
    runs: run label (e.g. the norm) -> its metric records.
    path: output ``.png`` file.
    title: figure title.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
  for ax, (key, label) in zip(axes, PANELS):
    for name, records in runs.items():
      steps, values = series(records, key)
      if steps:
        ax.plot(steps, values, label=name, marker="." if len(steps) < 30
                else None)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if key == "train_loss":
      ax.set_yscale("log")
  axes[0].legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
