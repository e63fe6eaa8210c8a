"""Build the ``loss_fn(params, batch_stats, batch) -> scalar`` the instruments
take, from a flax model that follows the bn_jax model convention
``model.apply(variables, x, train=bool, mutable=['batch_stats'], rngs=...)``.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from bn_jax.training.steps import cross_entropy_sums


def check_batch(batch) -> None:
  """ValueError unless ``batch`` is a dict with ``image`` and ``label``."""
  if isinstance(batch, Mapping) and "image" in batch and "label" in batch:
    return
  got = (f"keys {list(batch)}" if isinstance(batch, Mapping)
         else type(batch).__name__)
  raise ValueError("batch must be a dict with 'image' and 'label' (and "
                   "optionally 'mask' and 'rng'), as bn_jax.data."
                   f"epoch_batches yields; got {got}.")


def make_loss_fn(
    model,
    *,
    train: bool = True,
    rng: Optional[jax.Array] = None,
    rng_collections: tuple[str, ...] = ("noise",),
    extra_variables: Optional[Mapping] = None,
) -> Callable:
  """``loss_fn(params, batch_stats, batch)``: mean cross-entropy of a model.

  ``train=True`` (default) is the training-mode forward that the instruments
  of Santurkar et al. differentiate: every BN layer normalizes by the batch's
  own statistics; the running-statistics update (``mutable=['batch_stats']``)
  is computed and discarded, so the loss is a pure function of its arguments.
  ``train=False`` evaluates with the running statistics instead.

  Args:
    model: a flax module taking ``(x, train=...)``.
    train: normalization mode, see above.
    rng: key for the stochastic collections (noisy BN draws from ``'noise'``).
      A ``batch['rng']`` entry, if present, overrides it, so a jitted
      instrument can get a fresh key per call without re-tracing. The same
      key is used for every evaluation inside one instrument call, which makes
      the noise part of the (deterministic) loss surface being probed.
    rng_collections: the rng stream names the model uses.
    extra_variables: further variable collections (e.g. a CBN ``cbn_state``)
      passed to ``apply`` unchanged.

  The batch is ``{'image', 'label'[, 'mask'][, 'rng']}``; with a mask the
  mean is over the unmasked examples.
  """
  if not hasattr(model, "apply"):
    raise TypeError(f"model must be a flax module with .apply, got {model!r}.")

  def loss_fn(params, batch_stats, batch):
    check_batch(batch)
    variables = dict(extra_variables or {})
    variables["params"] = params
    if batch_stats is not None:
      variables["batch_stats"] = batch_stats
    key = batch.get("rng", rng)
    rngs = None if key is None else {
        name: jax.random.fold_in(key, i)
        for i, name in enumerate(rng_collections)}
    if train:
      logits, _ = model.apply(variables, batch["image"], train=True,
                              mutable=["batch_stats"], rngs=rngs)
    else:
      logits = model.apply(variables, batch["image"], train=False, rngs=rngs)
    loss_sum, _, count = cross_entropy_sums(logits, batch["label"],
                                            batch.get("mask"))
    return loss_sum / jnp.maximum(count, 1.0)

  return loss_fn
