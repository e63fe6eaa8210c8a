"""Figures for the analysis instruments (matplotlib, no display needed).

Figures are built with the object-oriented API (``matplotlib.figure.Figure``,
rendered by the Agg canvas), so importing this module does not touch pyplot's
global state or the user's backend. Every function returns the ``Figure``;
:func:`save_figure` writes it.

* :func:`plot_percentiles` -- BN paper Fig. 1(b,c): percentiles of one
  unit's pre-activation against the training step, one panel per run.
* :func:`plot_ics` -- Santurkar et al. Fig. 5: per-layer ICS (l2 difference
  and cosine) as grouped bars, one group per layer, one bar per run.
* :func:`plot_landscape` -- Santurkar et al. Fig. 4: the range (min..max over
  step sizes) of the loss / gradient change / beta-smoothness over training,
  one shaded band per run.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(ncols: int, width: float = 4.0, height: float = 3.2):
  fig = Figure(figsize=(width * ncols, height), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  return fig, axes


def save_figure(fig: Figure, path: str, dpi: int = 150) -> str:
  """Writes ``fig`` to ``path`` (format from the extension); returns path."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


def plot_percentiles(histories: Mapping[str, Mapping[str, np.ndarray]],
                     *, title: Optional[str] = None) -> Figure:
  """One panel per run: percentile curves of the tracked unit.

  Args:
    histories: ``{run label: ActivationTracker.history()}`` (needs ``steps``,
      ``percentiles``, ``percentile_values``), e.g. ``{'Without BN': ...,
      'With BN': ...}``.
  """
  if not histories:
    raise ValueError("histories is empty: nothing to plot.")
  fig, axes = _figure(len(histories))
  limits = []
  for ax, (label, hist) in zip(axes, histories.items()):
    steps = np.asarray(hist["steps"])
    values = np.asarray(hist["percentile_values"])
    for k, q in enumerate(np.asarray(hist["percentiles"])):
      ax.plot(steps, values[:, k], label=f"{q:g}th")
    ax.set_title(label)
    ax.set_xlabel("training step")
    limits.append(ax.get_ylim())
  axes[0].set_ylabel("input to the nonlinearity")
  axes[0].legend(title="percentile")
  # A shared y range makes "stable vs drifting" readable across panels.
  low, high = min(l for l, _ in limits), max(h for _, h in limits)
  for ax in axes:
    ax.set_ylim(low, high)
  if title:
    fig.suptitle(title)
  return fig


def _ics_table(results: Mapping[str, Mapping[str, float]], metric: str):
  layers: list[str] = []
  for res in results.values():
    for key in res:
      if key.startswith("ics/") and key.endswith(f"/{metric}"):
        name = key[len("ics/"):-len(metric) - 1]
        if name not in layers:
          layers.append(name)
  # Order by the layer's position (input to output) when it was logged: a
  # jitted or JSON round-tripped dict has its keys sorted alphabetically.
  def position(name):
    for res in results.values():
      if f"ics/{name}/position" in res:
        return float(np.asarray(res[f"ics/{name}/position"]))
    return float("inf")
  layers.sort(key=position)
  table = np.full((len(results), len(layers)), np.nan)
  for r, res in enumerate(results.values()):
    for c, name in enumerate(layers):
      value = res.get(f"ics/{name}/{metric}")
      if value is not None:
        table[r, c] = float(np.asarray(value))
  return layers, table


def plot_ics(results: Mapping[str, Mapping[str, float]],
             *, metrics: Sequence[str] = ("l2_diff", "cosine"),
             title: Optional[str] = None) -> Figure:
  """Grouped bars: per layer, one bar per run, one panel per metric.

  Args:
    results: ``{run label: internal_covariate_shift(...) output}`` (values
      may be arrays or floats; average them over steps before if wanted).
    metrics: which ICS entries to draw (``l2_diff``, ``cosine``,
      ``grad_norm``).
  """
  if not results:
    raise ValueError("results is empty: nothing to plot.")
  fig, axes = _figure(len(metrics), width=5.0)
  width = 0.8 / len(results)
  for ax, metric in zip(axes, metrics):
    layers, table = _ics_table(results, metric)
    if not layers:
      raise ValueError(f"no 'ics/<layer>/{metric}' entries in results.")
    x = np.arange(len(layers))
    for r, label in enumerate(results):
      ax.bar(x + (r - (len(results) - 1) / 2) * width, table[r], width,
             label=label)
    ax.set_xticks(x, [str(i + 1) for i in range(len(layers))])
    ax.set_xlabel("layer")
    ax.set_ylabel({"l2_diff": "||G - G'||_2", "cosine": "cos(G, G')"}.get(
        metric, metric))
  axes[0].legend()
  if title:
    fig.suptitle(title)
  return fig


_LANDSCAPE_PANELS = {
    "loss": ("landscape/loss_min", "landscape/loss_max", "loss landscape"),
    "grad_diff": ("landscape/grad_diff_min", "landscape/grad_diff_max",
                  "gradient predictiveness"),
    "beta_smoothness": ("landscape/beta_smoothness",
                        "landscape/beta_smoothness",
                        "effective beta-smoothness"),
}


def plot_landscape(runs: Mapping[str, Mapping[str, np.ndarray]],
                   *, panels: Sequence[str] = ("loss", "grad_diff",
                                               "beta_smoothness"),
                   title: Optional[str] = None) -> Figure:
  """Shaded min..max bands over training steps, one band per run.

  Args:
    runs: ``{run label: {'steps': [T], 'landscape/loss_min': [T], ...}}``:
      the ``landscape_probe`` outputs stacked over the logged steps.
    panels: any of ``loss``, ``grad_diff``, ``beta_smoothness``.
  """
  if not runs:
    raise ValueError("runs is empty: nothing to plot.")
  for p in panels:
    if p not in _LANDSCAPE_PANELS:
      raise ValueError(f"panels entries must be in {list(_LANDSCAPE_PANELS)}, "
                       f"got {p!r}.")
  fig, axes = _figure(len(panels))
  for ax, panel in zip(axes, panels):
    low_key, high_key, name = _LANDSCAPE_PANELS[panel]
    for label, run in runs.items():
      steps = np.asarray(run["steps"])
      low, high = np.asarray(run[low_key]), np.asarray(run[high_key])
      if low_key == high_key:
        ax.plot(steps, high, label=label)
      else:
        ax.fill_between(steps, low, high, alpha=0.4, label=label)
    ax.set_title(name)
    ax.set_xlabel("training step")
  axes[0].legend()
  if title:
    fig.suptitle(title)
  return fig
