r"""Distributions of the inputs to the nonlinearities over training.

Ioffe & Szegedy (2015), Fig. 1(b,c): the {15, 50, 85}th percentiles of the
input to one typical sigmoid of the last hidden layer, over a batch, plotted
against the training step -- stable with BN, drifting without.

bn_jax models sow every nonlinearity input as
``self.sow('intermediates', 'preact', x)``; :func:`capture_preactivations`
runs a forward pass that collects them and :func:`preactivations` lists them
by layer. A module that sows several times keeps a tuple; its entries are
named ``<module path>/preact/<k>``, a single one ``<module path>/preact``.

Per-layer drift (:class:`ActivationTracker`): for every layer and unit ``j``
the mean :math:`\mu_{t,j}` and std :math:`\sigma_{t,j}` of the unit's
pre-activations over the batch (and spatial positions) at step ``t``
(computed by :func:`bn_jax.core.moments`), summarised per layer as

.. math::

   \mathrm{mean}_t = \tfrac1U \sum_j \mu_{t,j},\quad
   \mathrm{std}_t = \tfrac1U \sum_j \sigma_{t,j},\quad
   \mathrm{mean\_drift}_t = \tfrac1U \sum_j |\mu_{t,j} - \mu_{0,j}|,\quad
   \mathrm{std\_drift}_t = \tfrac1U \sum_j |\sigma_{t,j} - \sigma_{0,j}|,

relative to the first recorded step 0. Averaging absolute per-unit shifts
(not shifting the layer average) catches units that drift in opposite
directions.
"""
from __future__ import annotations

import numbers
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax.core import validation
from bn_jax.core.moments import moments

DEFAULT_PERCENTILES = (15.0, 50.0, 85.0)


def preactivations(intermediates: Mapping, name: str = "preact"
                   ) -> dict[str, jax.Array]:
  """The sown values named ``name`` in collection order, keyed by path.

  Accepts the ``intermediates`` collection or the whole mutated-variables
  dict that contains it. Flax fills collections in call order, so the
  returned order is input to output.
  """
  if not isinstance(intermediates, Mapping):
    raise TypeError(f"intermediates must be the flax 'intermediates' "
                    f"collection (a dict), got {type(intermediates).__name__}.")
  if "intermediates" in intermediates and isinstance(
      intermediates["intermediates"], Mapping):
    intermediates = intermediates["intermediates"]
  found: dict[str, jax.Array] = {}

  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        walk(value, path)
      elif key == name:
        values = value if isinstance(value, (tuple, list)) else (value,)
        if len(values) == 1:
          found[path] = values[0]
        else:
          for k, v in enumerate(values):
            found[f"{path}/{k}"] = v

  walk(intermediates, "")
  return found


def _select_values(values_or_intermediates, layer):
  """An array, from an array or from intermediates + a layer key/index."""
  if not isinstance(values_or_intermediates, Mapping):
    return jnp.asarray(values_or_intermediates), None
  layers = preactivations(values_or_intermediates)
  if not layers:
    raise ValueError("no 'preact' values found in the intermediates; run the "
                     "model with mutable=['intermediates'] (see "
                     "capture_preactivations).")
  names = list(layers)
  if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
    if not -len(names) <= layer < len(names):
      raise ValueError(f"layer={layer} is out of range for {len(names)} "
                       f"sown layers {names}.")
    key = names[layer]
  elif isinstance(layer, str):
    if layer not in layers:
      raise ValueError(f"layer={layer!r} not found; sown layers: {names}.")
    key = layer
  else:
    raise TypeError(f"layer must be an int index (-1 = last hidden layer) or "
                    f"a path from preactivations(), got {layer!r}.")
  return jnp.asarray(layers[key]), key


def _check_percentiles(percentiles) -> np.ndarray:
  q = np.asarray(percentiles, dtype=np.float64)
  if q.ndim != 1 or q.size == 0 or np.any(~np.isfinite(q)) or np.any(
      q < 0) or np.any(q > 100):
    raise ValueError(f"percentiles must be a non-empty 1-D sequence of numbers "
                     f"in [0, 100], got {percentiles!r}.")
  return q


def activation_percentiles(
    values,
    unit: int,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    *,
    layer: Union[int, str] = -1,
    feature_axis: int = -1,
) -> jax.Array:
  """Percentiles of one unit's pre-activation over a batch.

  Args:
    values: pre-activations ``[batch, ..., features]``, or the intermediates
      collection (then ``layer`` picks the sown layer).
    unit: index of the unit (feature / channel) along ``feature_axis``.
    percentiles: in [0, 100]; linear interpolation, as ``np.percentile``'s
      default. Over every entry of that unit (batch and spatial positions).
    layer: with intermediates, an index into :func:`preactivations` (default
      -1: the last sown layer, BN paper's "last hidden layer") or its path.
    feature_axis: the unit axis of ``values``.

  Returns:
    ``[len(percentiles)]`` array, float32 at least.
  """
  x, _ = _select_values(values, layer)
  validation.check_floating(x, "values")
  if x.ndim < 1:
    raise ValueError(f"values must have a feature axis, got shape {x.shape}.")
  (axis,) = validation.normalize_axes(feature_axis, x.ndim, "feature_axis")
  if isinstance(unit, bool) or not isinstance(unit, numbers.Integral):
    raise TypeError(f"unit must be an int, got {unit!r}.")
  if not -x.shape[axis] <= unit < x.shape[axis]:
    raise ValueError(f"unit={unit} is out of range for {x.shape[axis]} "
                     f"features (values shape {x.shape}).")
  q = _check_percentiles(percentiles)
  column = jnp.take(x, unit, axis=axis).reshape(-1)
  column = column.astype(jnp.promote_types(column.dtype, jnp.float32))
  return jnp.percentile(column, jnp.asarray(q, column.dtype), method="linear")


def unit_moments(values, *, feature_axis: int = -1):
  """Per-unit (mean, std) of pre-activations over every non-feature axis."""
  x = jnp.asarray(values)
  validation.check_floating(x, "values")
  (axis,) = validation.normalize_axes(feature_axis, x.ndim, "feature_axis")
  m = moments(x, tuple(a for a in range(x.ndim) if a != axis))
  return m.mean.reshape(-1), jnp.sqrt(m.var).reshape(-1)


def preactivation_moments(intermediates: Mapping, *, feature_axis: int = -1
                          ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{layer: (per-unit mean, per-unit std)}`` for every sown layer."""
  return {k: unit_moments(v, feature_axis=feature_axis)
          for k, v in preactivations(intermediates).items()}


def capture_preactivations(model, variables: Mapping, x, *, train: bool = True,
                           rngs=None) -> dict:
  """Runs ``model`` on ``x`` and returns its ``intermediates`` collection.

  ``train=True`` normalizes by the batch's statistics (as during training);
  the running-statistics update is discarded either way.
  """
  variables = {k: v for k, v in variables.items() if k != "intermediates"}
  mutable = ["intermediates"] + (["batch_stats"] if train else [])
  _, state = model.apply(variables, x, train=train, mutable=mutable, rngs=rngs)
  return state.get("intermediates", {})


class ActivationTracker:
  """Host-side record of pre-activation percentiles and per-layer drift.

  Call :meth:`record` every N steps with the intermediates of a forward pass
  (:func:`capture_preactivations`); :meth:`history` returns NumPy arrays for
  plotting (:func:`bn_jax.analysis.plotting.plot_percentiles`), and
  :meth:`record` returns a flat dict of floats for a JSON logger.

  Args:
    unit: the unit whose percentiles are tracked.
    layer: which sown layer the unit is in (index or path; -1 = last).
    percentiles: which percentiles (default 15, 50, 85).
    feature_axis: the unit axis of the sown arrays.
  """

  def __init__(self, unit: int = 0, *, layer: Union[int, str] = -1,
               percentiles: Sequence[float] = DEFAULT_PERCENTILES,
               feature_axis: int = -1):
    self.unit = unit
    self.layer = layer
    self.percentiles = tuple(float(p) for p in _check_percentiles(percentiles))
    self.feature_axis = feature_axis
    self._steps: list[int] = []
    self._percentile_values: list[np.ndarray] = []
    self._moments: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    self._tracked_layer: Optional[str] = None

  def record(self, step: int, intermediates: Mapping) -> dict[str, float]:
    """Adds one measurement; returns it as a flat dict of floats."""
    if self._steps and step <= self._steps[-1]:
      raise ValueError(f"step must increase, got {step} after "
                       f"{self._steps[-1]}.")
    values, key = _select_values(intermediates, self.layer)
    if self._tracked_layer is not None and key != self._tracked_layer:
      raise ValueError(f"tracked layer changed from {self._tracked_layer!r} "
                       f"to {key!r}; record the same model every time.")
    self._tracked_layer = key
    pct = np.asarray(activation_percentiles(
        values, self.unit, self.percentiles, feature_axis=self.feature_axis))
    self._steps.append(int(step))
    self._percentile_values.append(pct)
    out = {f"preact/p{p:g}": float(v) for p, v in zip(self.percentiles, pct)}
    for name, (mean, std) in preactivation_moments(
        intermediates, feature_axis=self.feature_axis).items():
      mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
      history = self._moments.setdefault(name, [])
      if len(history) != len(self._steps) - 1:
        raise ValueError(f"layer {name!r} appeared after the first record; "
                         "record the same model every time.")
      history.append((mean, std))
      summary = _drift(history)
      for stat in ("mean", "std", "mean_drift", "std_drift"):
        out[f"preact/{name}/{stat}"] = float(summary[stat][-1])
    return out

  def history(self) -> dict[str, np.ndarray]:
    """``steps`` [T], ``percentiles`` [P], ``percentile_values`` [T, P], and
    per layer ``<layer>/mean``, ``/std``, ``/mean_drift``, ``/std_drift`` [T].
    """
    out = {
        "steps": np.asarray(self._steps, np.int64),
        "percentiles": np.asarray(self.percentiles),
        "percentile_values": np.asarray(self._percentile_values).reshape(
            len(self._steps), len(self.percentiles)),
    }
    for name, history in self._moments.items():
      for stat, values in _drift(history).items():
        out[f"{name}/{stat}"] = values
    return out


def _drift(history: list[tuple[np.ndarray, np.ndarray]]
           ) -> dict[str, np.ndarray]:
  means = np.stack([m for m, _ in history])  # [T, U]
  stds = np.stack([s for _, s in history])
  return {
      "mean": means.mean(axis=1),
      "std": stds.mean(axis=1),
      "mean_drift": np.abs(means - means[0]).mean(axis=1),
      "std_drift": np.abs(stds - stds[0]).mean(axis=1),
  }
