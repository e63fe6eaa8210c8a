"""Matplotlib plots of the metric records.

Object API (``Figure`` + an Agg canvas of its own): no display needed, and no
global matplotlib state (backend, pyplot's current figure) is touched.
"""
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
  return plot_comparison({title: runs}, path)


def plot_comparison(parts: Mapping[str, Mapping[str, Sequence[Mapping]]],
                    path: str) -> str:
  """One row of ``PANELS`` per part (row title -> its runs), one curve per
  run; saves a PNG. One part: the row title is the figure title."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5 * len(PANELS), 3.8 * len(parts)))
  FigureCanvasAgg(fig)
  grid = fig.subplots(len(parts), len(PANELS), squeeze=False)
  for axes, (row_title, runs) in zip(grid, parts.items()):
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
    if len(parts) > 1 and row_title:
      axes[1].set_title(row_title)
  if len(parts) == 1 and next(iter(parts)):
    fig.suptitle(next(iter(parts)))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path
