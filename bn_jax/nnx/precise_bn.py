"""PreciseBN for NNX models: population statistics into every BN layer.

:func:`precise_batch_stats` runs batches through a model whose weights and
running statistics are frozen (the forward pass works on a copy of the
model's state inside ``jax.jit``), with every batch-statistics layer of
:mod:`bn_jax.nnx` in training mode, and collects the moments each layer
normalized with. The count-weighted population statistics
(:mod:`bn_jax.core.precise_batch_norm`) then replace the ``mean``/``var``
of those layers, in place. The reference is fvcore's
``update_bn_stats(model, data_loader, num_iters)``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from flax import nnx
import jax.numpy as jnp

from bn_jax.core.precise_batch_norm import (accumulate_population_stats,
                                            write_population_stats)
from bn_jax.nn.precise_bn import CBN_WINDOW_COUNT
from bn_jax.nnx.normalization import set_moments_recorder


def _path_name(path) -> str:
  return "/".join(str(p) for p in path)


def precise_batch_stats(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    num_batches: Optional[int] = None,
    forward: Optional[Callable[[nnx.Module, Any], Any]] = None,
) -> nnx.Module:
  """PreciseBN: sets every BN layer's ``mean``/``var`` to population stats.

  Example::

    precise_batch_stats(model, (b['image'] for b in batches),
                        num_batches=200)
    model.eval()

  Args:
    model: an NNX model with :mod:`bn_jax.nnx` batch-statistics layers
      (``BatchNorm``, ``BatchRenorm``, ``NoisyBatchNorm``, the CBN layers;
      ``LpNorm``'s running norm is not a variance and is left alone).
    batches: an iterable of batches.
    num_batches: use the first ``num_batches`` batches (all if None); a
      ValueError is raised if ``batches`` runs out before.
    forward: ``forward(model, batch)``, the forward pass (default
      ``model(batch)``). Only the ``use_running_average`` of the layers is
      switched (to training statistics); other modules (e.g. Dropout) run in
      the mode the model is in. Layers must be called directly, not inside
      ``nnx.vmap``/``nnx.scan``; a layer called twice keeps the last call's
      moments.

  Returns:
    ``model``, whose layers' ``mean``/``var`` now hold the population
    statistics (their dtype kept); nothing else changes.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got "
                    f"{type(model).__name__}.")
  forward = forward or (lambda m, batch: m(batch))
  graphdef, state = nnx.split(model)

  def moments_fn(state, batch):
    copy = nnx.merge(graphdef, state)
    copy.set_attributes(use_running_average=False, raise_if_not_found=False)
    for _, node in nnx.iter_graph(copy):
      # CBN layers normalize with the current batch alone, as BN does (see
      # bn_jax.nn.precise_bn.without_cbn_windows for why).
      count = getattr(node, CBN_WINDOW_COUNT, None)
      if isinstance(count, nnx.BatchStat):
        count[...] = jnp.zeros_like(count[...])
    records: dict = {}
    previous = set_moments_recorder(records)
    try:
      forward(copy, batch)
    finally:
      set_moments_recorder(previous)
    out = {_path_name(path): records[id(node)]
           for path, node in nnx.iter_graph(copy) if id(node) in records}
    if not out:
      raise ValueError(
          "the forward pass recorded no batch moments: the model has no "
          "bn_jax.nnx batch-statistics layer called in it (flax.nnx.BatchNorm "
          "layers do not record; replace them by bn_jax.nnx.BatchNorm).")
    return out

  population = accumulate_population_stats(moments_fn, state, batches,
                                           num_batches=num_batches)
  layers = {_path_name(path): node for path, node in nnx.iter_graph(model)
            if _path_name(path) in population}
  running = {name: {"mean": layer.mean[...], "var": layer.var[...]}
             for name, layer in layers.items()}
  new = write_population_stats(running, population, name="model")
  for name, layer in layers.items():
    layer.mean[...] = new[name]["mean"]
    layer.var[...] = new[name]["var"]
  return model
