"""The call site of the measuring instruments of :mod:`bn_jax.analysis`.

``config.analysis`` names the instruments and ``config.analysis_every`` how
often (in steps) they run during training, on the current training batch,
before the step's update:

* ``'ics'``: :func:`bn_jax.analysis.internal_covariate_shift` (Santurkar et
  al., Def. 2.1) with the run's real optimizer step (``optax_update_fn``).
* ``'landscape'``: :func:`bn_jax.analysis.landscape_probe` along the gradient,
  step sizes from ``learning_rate / 4`` to ``4 * learning_rate``.
* ``'percentiles'``: the {15, 50, 85}th percentiles of unit 0 of the last
  sown pre-activation (BN paper, Fig. 1(b,c)).

The returned scalars go to ``metrics.jsonl`` / TensorBoard under their own
names (``ics/<layer>/cosine``, ``landscape/loss_range``,
``percentiles/p15``, ...). The instruments use a model without ``axis_name``
(plain JAX semantics over the global batch), so they also work when training
is data parallel.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np


def make_analysis_fn(config, model, tx) -> Callable[..., dict]:
  """``analysis_fn(state, batch) -> {name: float}`` for ``config.analysis``."""
  from bn_jax import analysis

  names = tuple(config.analysis)
  loss_fn = analysis.make_loss_fn(model, train=True)
  lr = float(config.learning_rate)
  step_sizes = analysis.geometric_step_sizes(lr / 4, lr * 4, num=5)

  @jax.jit
  def measure(params, batch_stats, opt_state, batch, rng):
    batch = dict(batch, rng=rng)
    out = {}
    if "ics" in names:
      out.update(analysis.internal_covariate_shift(
          loss_fn, params, batch_stats, batch,
          update_fn=analysis.optax_update_fn(tx, opt_state),
          layers=model.layer_names()))  # the model's own forward order
    if "landscape" in names:
      out.update(analysis.landscape_probe(loss_fn, params, batch_stats, batch,
                                          step_sizes=step_sizes))
    if "percentiles" in names:
      inter = analysis.capture_preactivations(
          model, {"params": params, "batch_stats": batch_stats},
          batch["image"], train=True, rngs={"noise": rng})
      values = analysis.activation_percentiles(inter, unit=0, layer=-1)
      for p, v in zip(analysis.DEFAULT_PERCENTILES, values):
        out[f"percentiles/p{int(p)}"] = v
    return out

  def analysis_fn(state, batch) -> dict:
    # A key of its own (not the training step's), so measuring leaves the
    # training trajectory unchanged.
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    out = jax.device_get(measure(state.params, state.batch_stats,
                                 state.opt_state, batch, rng))
    # Only scalars go to the metric records (curves over step sizes do not).
    return {k: float(v) for k, v in out.items() if np.ndim(v) == 0}

  return analysis_fn
