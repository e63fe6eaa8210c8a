r"""Train-test consistency of BN statistics (Wu & Johnson, 2021, Sec. 3-4).

One model, the same weights, three ways to normalize at evaluation time:

(i) ``ema``: the running statistics kept during training (exponential moving
    averages over many past models; they lag with large momentum and are
    noisy with small momentum);
(ii) ``precise``: PreciseBN population statistics of the *current* weights,
    :math:`\mu_{pop} = E[\mu_B]`, :math:`\sigma^2_{pop} = E[\mu_B^2 +
    \sigma^2_B] - \mu_{pop}^2` over N training batches
    (:func:`bn_jax.precise_batch_stats`);
(iii) ``batch``: every evaluation batch normalized by its own statistics
    (train-mode normalization; the running-statistics update is discarded).

The gap (i) - (ii) measures how stale/noisy the EMA is; the gap (ii) - (iii)
is the train-test inconsistency of the normalization itself (large with small
normalization batches).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax.analysis.loss_fns import check_batch, cross_entropy_sums

MODES = ("ema", "precise", "batch")


def _apply_image(model):
  return lambda v, b, **kw: model.apply(v, b["image"], **kw)


def _make_eval(model, mode: str, rngs):
  @jax.jit
  def evaluate(variables, batch):
    if mode == "batch":
      logits, _ = model.apply(variables, batch["image"], train=True,
                              mutable=["batch_stats"], rngs=rngs)
    else:
      logits = model.apply(variables, batch["image"], train=False, rngs=rngs)
    return cross_entropy_sums(logits, batch["label"], batch.get("mask"))
  return evaluate


def statistics_consistency(
    model,
    variables: Mapping[str, Any],
    eval_batches,
    *,
    population_stats: Optional[Mapping] = None,
    precise_batches: Optional[Iterable] = None,
    num_precise_batches: Optional[int] = None,
    rngs: Optional[Mapping[str, jax.Array]] = None,
) -> dict[str, float]:
  """Loss and accuracy with EMA, PreciseBN and per-batch statistics.

  Args:
    model: a flax module following ``model.apply(variables, x, train=bool,
      mutable=['batch_stats'], rngs=...)``.
    variables: ``{'params', 'batch_stats', ...}``; ``batch_stats`` holds the
      EMA running statistics.
    eval_batches: a batch dict ``{'image', 'label'[, 'mask']}`` or an
      iterable of them (iterated once). For the ``batch`` mode every batch
      must be full (no ``mask`` False entries): padding would enter the
      statistics.
    population_stats: PreciseBN ``batch_stats`` tree to use for ``precise``.
    precise_batches: if ``population_stats`` is None, training batches from
      which :func:`bn_jax.precise_batch_stats` computes it (weights frozen,
      train-mode forward; ``num_precise_batches`` of them, all if None).
      If both are None the ``precise`` entries are left out.
    rngs: rng streams for the forward pass (noisy BN's ``'noise'``).

  Returns:
    ``{mode/loss, mode/accuracy}`` for mode in ``ema``, ``precise`` (if
    available) and ``batch``, plus ``num_examples``; Python floats, averaged
    over every (unmasked) example.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a mapping with 'params' (and the "
                     "EMA statistics in 'batch_stats').")
  if isinstance(eval_batches, Mapping):
    eval_batches = [eval_batches]
  variants = {"ema": variables}
  if population_stats is None and precise_batches is not None:
    # Lazy: PreciseBN (bn_jax.nn) is optional for this module.
    from bn_jax.nn.precise_bn import precise_batch_stats
    population_stats = precise_batch_stats(
        _apply_image(model), variables, precise_batches,
        num_batches=num_precise_batches, train=True, rngs=rngs)
  if population_stats is not None:
    if "batch_stats" not in variables:
      raise ValueError("population_stats given but variables has no "
                       "'batch_stats' collection to replace.")
    if jax.tree.structure(population_stats) != jax.tree.structure(
        variables["batch_stats"]):
      raise ValueError("population_stats must have the structure of "
                       "variables['batch_stats'] (e.g. the output of "
                       "precise_batch_stats).")
    variants["precise"] = {**variables, "batch_stats": population_stats}
  variants["batch"] = variables

  evals = {mode: _make_eval(model, mode, rngs) for mode in variants}
  totals = {mode: np.zeros(3, np.float64) for mode in variants}
  for batch in eval_batches:
    check_batch(batch)
    mask = batch.get("mask")
    if mask is not None and not bool(np.all(np.asarray(mask))):
      raise ValueError("eval_batches contains a padded batch (mask has False "
                       "entries); batch-statistics evaluation would normalize "
                       "with the padding. Use remainder='drop'.")
    for mode, evaluate in evals.items():
      totals[mode] += np.asarray(jax.device_get(
          evaluate(variants[mode], batch)), np.float64)
  if totals["ema"][2] == 0:
    raise ValueError("eval_batches is empty: nothing to evaluate.")
  out: dict[str, float] = {}
  for mode in MODES:
    if mode in totals:
      loss_sum, correct, count = totals[mode]
      out[f"{mode}/loss"] = float(loss_sum / count)
      out[f"{mode}/accuracy"] = float(correct / count)
  out["num_examples"] = float(totals["ema"][2])
  return out
