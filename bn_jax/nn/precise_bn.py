"""PreciseBN for Linen models: population statistics into ``batch_stats``.

The Linen side of :mod:`bn_jax.core.precise_batch_norm` (which knows trees of
layers, not Flax collections). The batch-statistics modules of
:mod:`bn_jax.nn` store each training batch's moments in the
``batch_moments`` collection when it is mutable
(``batch_moments/<layer path>/{mean,var,count}``);
:func:`precise_batch_stats` runs a model over batches with that collection
mutable and writes the count-weighted population statistics into
``batch_stats``.

Reference API users know: fvcore's
``fvcore.nn.precise_bn.update_bn_stats(model, data_loader, num_iters=200)``;
here ``precise_batch_stats(apply_fn, variables, batches, num_batches=200)``
returns the new ``batch_stats`` instead of mutating a model.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp

from bn_jax.core.precise_batch_norm import (accumulate_population_stats,
                                            write_population_stats)

# The Flax collections of the running statistics and of the PreciseBN hook;
# every module of bn_jax.nn reads these names from here.
BATCH_STATS = "batch_stats"
BATCH_MOMENTS = "batch_moments"


# CBNState's field holding how many past entries a CBN window has.
CBN_WINDOW_COUNT = "window_count"


def without_cbn_windows(batch_stats):
  """``batch_stats`` with every Cross-Iteration BN window emptied
  (``window_count = 0``), for PreciseBN's passes.

  PreciseBN must normalize every layer with the current batch's own
  statistics: at evaluation each layer is normalized by population
  statistics, so those are what the layers above it must see while their
  own population statistics are measured. A CBN window still holding the
  training run's small, stale batches would mix them into the normalization
  of the current (large) batch and shift every later layer's statistics.
  With an empty window, CBN normalizes exactly as BN does.
  """
  def empty(path, leaf):
    last = path[-1] if path else None
    if getattr(last, "key", None) == CBN_WINDOW_COUNT:
      return jnp.zeros_like(leaf)
    return leaf
  return jax.tree_util.tree_map_with_path(empty, batch_stats)


def precise_batch_stats(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    num_batches: Optional[int] = None,
    **apply_kwargs,
) -> dict:
  """PreciseBN: recomputes every layer's ``mean``/``var`` as population stats.

  Runs ``apply_fn(variables, batch, mutable=['batch_stats', 'batch_moments'],
  **apply_kwargs)`` under one ``jax.jit`` (one compilation per batch shape)
  for each batch, with the weights and the incoming ``batch_stats`` frozen
  (the EMA updates the forward pass computes are discarded), and aggregates
  the moments every batch-statistics layer stores in ``batch_moments`` (see
  :mod:`bn_jax.core.precise_batch_norm` for the formula).

  Example (the reference is fvcore's ``update_bn_stats(model, loader,
  num_iters=200)``)::

    batch_stats = precise_batch_stats(
        lambda v, b, **kw: model.apply(v, b['image'], **kw),
        {'params': params, 'batch_stats': batch_stats}, batches,
        num_batches=200, train=True)

  Args:
    apply_fn: ``apply_fn(variables, batch, *, mutable, **apply_kwargs)``
      returning ``(output, mutated_collections)``, a training-mode forward
      (e.g. ``model.apply`` with ``train=True`` in ``apply_kwargs``).
    variables: the model variables; must contain ``batch_stats``.
    batches: an iterable of batches, passed to ``apply_fn`` as they are.
    num_batches: use the first ``num_batches`` batches (all if None). A
      ValueError is raised if ``batches`` runs out before.
    **apply_kwargs: passed to ``apply_fn`` (e.g. ``train=True``, ``rngs=``).
      They are closed over: the same ``rngs`` are used for every batch.

  Returns:
    A copy of ``variables['batch_stats']`` in which the ``mean`` and ``var``
    of every layer that stored batch moments are the population statistics
    (cast to their previous dtype); other entries are unchanged.
  """
  if not isinstance(variables, Mapping) or BATCH_STATS not in variables:
    raise ValueError(f"variables must be a mapping with a '{BATCH_STATS}' "
                     "collection (the model's running statistics).")
  if "mutable" in apply_kwargs:
    raise ValueError(f"do not pass mutable=: precise_batch_stats sets "
                     f"mutable=['{BATCH_STATS}', '{BATCH_MOMENTS}'] itself.")

  def batch_moments_of(variables, batch):
    _, mutated = apply_fn(variables, batch,
                          mutable=[BATCH_STATS, BATCH_MOMENTS],
                          **apply_kwargs)
    moments = mutated.get(BATCH_MOMENTS) if isinstance(
        mutated, Mapping) else None
    if not moments:
      raise ValueError(
          "apply_fn stored no batch moments: run it in training mode (e.g. "
          "train=True / use_running_average=False) on a model built from "
          f"bn_jax.nn batch-statistics modules, which fill the "
          f"'{BATCH_MOMENTS}' collection.")
    return moments

  frozen = dict(variables)
  frozen[BATCH_STATS] = without_cbn_windows(variables[BATCH_STATS])
  population = accumulate_population_stats(batch_moments_of, frozen,
                                           batches, num_batches=num_batches)
  return write_population_stats(variables[BATCH_STATS], population,
                                name=BATCH_STATS)
