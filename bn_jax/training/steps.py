r"""``train_step`` and ``eval_step``: pure functions of (state, batch).

Both take ``axis_name``: inside a ``shard_map`` over the batch (data
parallelism, see :mod:`bn_jax.training.parallel`) every device holds a slice
of the batch; the model normalizes with statistics synchronized over
``axis_name`` (SyncBN) and the sums below are ``psum``-ed, so the result is the
one of a single device on the whole batch.

Loss: mean softmax cross-entropy over the unmasked examples,

.. math:: L = \frac{1}{N} \sum_{i:\,m_i} \ell(f(x_i), y_i),\qquad
          N = \#\{i : m_i\}.

With ``D`` devices each computes ``L_d = \frac1N \sum_{i \in d} \ell_i``
(``N`` psum-ed); ``L = \sum_d L_d`` and the gradient is
``\sum_d \nabla L_d`` (psum).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bn_jax.training.train_state import TrainState


def cross_entropy_sums(logits: jax.Array, labels: jax.Array,
                       mask: Optional[jax.Array] = None):
  """(sum of per-example cross-entropies, number of correct predictions,
  number of examples), counting only examples where ``mask`` is True.

  Sums rather than means so that they can be accumulated over batches (exact
  evaluation over a padded test set) and over devices (``psum``). Logits are
  promoted to float32 first (bfloat16 models). The one definition: the
  analysis instruments' losses use it too.
  """
  if logits.ndim != 2:
    raise ValueError(f"logits must have shape [batch, num_classes], got "
                     f"{logits.shape}.")
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape[:1] or not jnp.issubdtype(
      labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids of shape "
                     f"{logits.shape[:1]}, got {labels.dtype}{labels.shape}.")
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  weights = (jnp.ones(labels.shape, jnp.float32) if mask is None
             else jnp.asarray(mask).astype(jnp.float32))
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return (jnp.sum(per_example * weights), jnp.sum(correct * weights),
          jnp.sum(weights))


def step_rng(state: TrainState, axis_name: Optional[str] = None) -> jax.Array:
  """The key of the current step (and device), derived, never stored."""
  rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
  return rng


def train_step(state: TrainState, batch: dict, *,
               learning_rate_fn: Callable[[Any], Any],
               axis_name: Optional[str] = None):
  """One optimizer step in training mode (batch statistics, EMA update).

  Returns ``(new_state, metrics)`` with scalar ``loss``, ``accuracy`` and
  ``learning_rate`` (the rate used for this step).
  """
  rng = step_rng(state, axis_name)
  mask = batch.get("mask")

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"], rngs={"noise": rng})
    loss_sum, correct, count = cross_entropy_sums(logits, batch["label"], mask)
    if axis_name is not None:
      count = lax.psum(count, axis_name)
    count = jnp.maximum(count, 1.0)
    return loss_sum / count, (updates, correct, count)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (updates, correct, count)), grads = grad_fn(state.params)
  if axis_name is not None:
    grads, loss, correct = lax.psum((grads, loss, correct), axis_name)
  new_state = state.apply_gradients(
      grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
  metrics = {"loss": loss, "accuracy": correct / count,
             "learning_rate": jnp.asarray(learning_rate_fn(state.step),
                                          jnp.float32)}
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *,
              axis_name: Optional[str] = None) -> dict:
  """Sums over one (padded) batch with the running statistics (train=False).

  Returns ``{'loss_sum', 'correct', 'count'}`` so that evaluation over a
  padded test set is exact: divide the totals at the end.
  """
  logits = state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats},
      batch["image"], train=False)
  sums = cross_entropy_sums(logits, batch["label"], batch.get("mask"))
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  loss_sum, correct, count = sums
  return {"loss_sum": loss_sum, "correct": correct, "count": count}
