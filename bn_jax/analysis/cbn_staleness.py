r"""How stale are CBN's past statistics, and does the compensation help?

CBN (Yao et al. 2021) averages the statistics of the last ``k - 1`` batches,
computed with older weights, after moving each to the current weights of the
layer that produced it by a first-order Taylor step (the "compensation";
earlier layers' changes are ignored). Whether that step can matter depends
on how far a past batch's statistics have moved since they were recorded,
compared with the noise any one batch's statistics carry anyway.

:func:`cbn_staleness` measures it, per CBN layer and per age ``a`` (``a = 1``:
the previous step's entry): it re-runs the past batch through the model at
the *current* weights (a train-mode forward with the current window, state
update discarded; the CBN layers' PreciseBN hook stores each layer's batch
moments) and compares, per channel,

* ``fresh``: that batch's mean ``mu(theta_t)`` and variance at the current
  weights (all layers current: the truth the window entry stands for);
* ``stale``: the stored entry ``mu(theta_{t-a})`` (what naive CBN uses);
* ``compensated``: the stored entry moved to the current layer weight
  (:func:`bn_jax.core.cross_iteration_batch_norm.compensate_window`);
* ``noise``: the batch's sampling noise, the standard error of its mean
  ``sqrt(var / m)`` (and ``var sqrt(2 / (m - 1))`` for the variance, exact
  for Gaussian data) with ``m`` values per channel.

Compensation can matter only if ``|stale - fresh|`` is not small against
``noise`` (otherwise the staleness is buried in the noise CBN averages away),
and it helps if ``|compensated - fresh| < |stale - fresh|``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from bn_jax.core.cross_iteration_batch_norm import (CBNState,
                                                    compensate_window,
                                                    window_of)
from bn_jax.nn.precise_bn import BATCH_MOMENTS, BATCH_STATS


class LayerStaleness(NamedTuple):
  """One CBN layer; every array is ``(A, C)`` (ages x channels) float64.

  Attributes:
    ages: ``(A,)`` steps back of each row (1 = the previous step).
    fresh_mean, stale_mean, compensated_mean: the past batch's mean at the
      current weights, as stored, and as compensated.
    fresh_var, stale_var, compensated_var: the same for the variance.
    mean_noise: ``sqrt(fresh_var / m)``, the sampling noise of a mean.
    var_noise: ``fresh_var * sqrt(2 / (m - 1))``.
  """
  ages: np.ndarray
  fresh_mean: np.ndarray
  stale_mean: np.ndarray
  compensated_mean: np.ndarray
  fresh_var: np.ndarray
  stale_var: np.ndarray
  compensated_var: np.ndarray
  mean_noise: np.ndarray
  var_noise: np.ndarray

  def summary(self) -> dict[str, float]:
    """Medians over ages and channels, in units of the sampling noise:
    ``stale_mean``/``compensated_mean`` = ``|stale - fresh| / noise`` etc.,
    and ``mean_gain`` = median ``|stale - fresh| / |compensated - fresh|``
    (> 1: the compensation moves the entry towards the truth)."""
    def med(a):
      return float(np.median(a))
    stale_m = np.abs(self.stale_mean - self.fresh_mean)
    comp_m = np.abs(self.compensated_mean - self.fresh_mean)
    stale_v = np.abs(self.stale_var - self.fresh_var)
    comp_v = np.abs(self.compensated_var - self.fresh_var)
    tiny = np.finfo(np.float64).tiny
    return {
        "stale_mean": med(stale_m / self.mean_noise),
        "compensated_mean": med(comp_m / self.mean_noise),
        "stale_var": med(stale_v / self.var_noise),
        "compensated_var": med(comp_v / self.var_noise),
        "mean_gain": med(stale_m / np.maximum(comp_m, tiny)),
        "var_gain": med(stale_v / np.maximum(comp_v, tiny)),
    }


def _cbn_layers(batch_stats: Mapping, params: Mapping, path=()):
  """``(path, CBNState, kernel)`` of every CBN layer (a ``batch_stats``
  dict with CBN's fields, whose ``params`` twin holds the ``kernel``)."""
  if set(CBNState._fields) <= set(batch_stats):
    yield path, CBNState(**{f: batch_stats[f] for f in CBNState._fields}), (
        params["kernel"])
    return
  for name, sub in batch_stats.items():
    if isinstance(sub, Mapping):
      yield from _cbn_layers(sub, params[name], path + (name,))


def _get(tree: Mapping, path):
  for name in path:
    tree = tree[name]
  return tree


def cbn_staleness(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    past_batches: Sequence[Any],
    *,
    rho: float = 1.0,
    **apply_kwargs,
) -> dict[str, LayerStaleness]:
  """Staleness of every CBN layer's window entries (see the module docstring).

  Args:
    apply_fn: ``apply_fn(variables, batch, *, mutable, **apply_kwargs)``
      returning ``(output, mutated_collections)``, a training-mode forward
      (e.g. ``lambda v, b, **kw: model.apply(v, b['image'], **kw)`` with
      ``train=True`` in ``apply_kwargs``), as for ``precise_batch_stats``.
    variables: the current ``params`` and ``batch_stats`` (the state after
      the last training step).
    past_batches: the batches of the last training steps, newest first:
      ``past_batches[a - 1]`` is the batch of the step ``a`` steps back.
      Ages beyond a layer's ``window_count`` are skipped.
    rho: the compensation weight the layers were trained with.

  Returns:
    ``{'/'-joined layer path: LayerStaleness}``.
  """
  params, batch_stats = variables["params"], variables[BATCH_STATS]

  @jax.jit
  def moments_of(batch):
    _, mutated = apply_fn(variables, batch,
                          mutable=[BATCH_STATS, BATCH_MOMENTS], **apply_kwargs)
    return mutated[BATCH_MOMENTS]

  fresh = [moments_of(b) for b in past_batches]
  result = {}
  for path, state, kernel in _cbn_layers(batch_stats, params):
    slots = window_of(state) - 1
    count = int(state.window_count)
    ages = np.arange(1, min(count, len(past_batches)) + 1)
    if ages.size == 0:
      continue
    comp_mean, comp_var = compensate_window(state, kernel, rho=rho)
    index = (int(state.window_index) - ages) % slots
    rows = {k: [] for k in ("fm", "fv", "n")}
    for a in ages:
      mom = _get(fresh[a - 1], path)
      rows["fm"].append(np.asarray(mom["mean"], np.float64))
      rows["fv"].append(np.asarray(mom["var"], np.float64))
      rows["n"].append(float(mom["count"]))
    fresh_mean, fresh_var = np.stack(rows["fm"]), np.stack(rows["fv"])
    m = np.asarray(rows["n"])[:, None]
    as64 = lambda a: np.asarray(a, np.float64)[index]  # noqa: E731
    result["/".join(path)] = LayerStaleness(
        ages=ages, fresh_mean=fresh_mean,
        stale_mean=as64(state.window_mean),
        compensated_mean=as64(comp_mean), fresh_var=fresh_var,
        stale_var=as64(state.window_var), compensated_var=as64(comp_var),
        mean_noise=np.sqrt(fresh_var / m),
        var_noise=fresh_var * np.sqrt(2.0 / np.maximum(m - 1.0, 1.0)))
  return result
