r"""Internal covariate shift, as defined by Santurkar et al. (2018), Def. 2.1.

For a network with layers :math:`W_1, \dots, W_k` (input to output), a loss
:math:`L` and one optimizer step :math:`W^t \to W^{t+1}` computed from the
gradient on a batch :math:`(x^t, y^t)`:

.. math::

   G_{t,i}  &= \nabla_{W_i} L(W_1^t, \dots, W_k^t;\ x^t, y^t) \\
   G'_{t,i} &= \nabla_{W_i} L(W_1^{t+1}, \dots, W_{i-1}^{t+1},
                                W_i^t, \dots, W_k^t;\ x^t, y^t)

:math:`G'_{t,i}` is the gradient layer :math:`i` would see if only the layers
*before* it had taken their step: the change of its input distribution, seen
through the optimization. ICS of layer :math:`i` is reported as
:math:`\|G_{t,i} - G'_{t,i}\|_2` and :math:`\cos(G_{t,i}, G'_{t,i})`
(``ics/<layer>/l2_diff`` and ``ics/<layer>/cosine``). By definition
:math:`G'_{t,1} = G_{t,1}` (no layer precedes the first), so the first layer
always reports 0 and 1.

The loss is a train-mode forward (normalization by batch statistics) whose
running-statistics update is discarded: ``loss_fn(params, batch_stats, batch)
-> scalar``; see :func:`bn_jax.analysis.make_loss_fn`. It must be
deterministic in its arguments (noisy BN: a fixed noise key), so that
:math:`G` and :math:`G'` differ only through the parameters.

Cost: ``k`` gradient evaluations (``k - 1`` mixed points plus the one at
:math:`W^t`). With ``method='map'`` they run one after another inside a single
``lax.map`` (memory of one backward pass); ``method='vmap'`` batches them
(faster on an accelerator, ``k - 1`` times the activation memory).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax.analysis import _trees

UpdateFn = Callable[[object, object], object]


def sgd_update_fn(learning_rate: float) -> UpdateFn:
  """``update_fn`` for plain SGD: ``W^{t+1} = W^t - learning_rate * G``."""
  def update_fn(params, grads):
    return jax.tree.map(lambda p, g: p - learning_rate * g.astype(p.dtype),
                        params, grads)
  return update_fn


def optax_update_fn(optimizer, opt_state) -> UpdateFn:
  """``update_fn`` that takes one step of an optax optimizer from ``opt_state``.

  The optimizer state (momentum buffers, Adam moments, step count) is the one
  the real training step would use, so :math:`W^{t+1}` is the parameter the
  training run actually moves to. Build it inside the jitted function so that
  ``opt_state`` is traced, not baked in as a constant::

    @jax.jit
    def measure(params, batch_stats, batch, opt_state):
      return internal_covariate_shift(
          loss_fn, params, batch_stats, batch,
          update_fn=optax_update_fn(tx, opt_state))
  """
  import optax  # optional dependency of this helper only

  def update_fn(params, grads):
    updates, _ = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates)
  return update_fn


def internal_covariate_shift(
    loss_fn: Callable,
    params,
    batch_stats,
    batch,
    *,
    update_fn: UpdateFn,
    layers: Sequence,
    method: str = "map",
) -> dict[str, jax.Array]:
  """Per-layer ICS (Santurkar et al., Definition 2.1) at one training step.

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch) -> scalar``, deterministic.
    params: the parameter tree :math:`W^t` (e.g. ``variables['params']``).
    batch_stats: passed through to ``loss_fn`` unchanged.
    batch: the batch :math:`(x^t, y^t)`; the same batch for G and G'.
    update_fn: ``update_fn(params, grads) -> new_params`` (the optimizer step;
      :func:`sgd_update_fn`, :func:`optax_update_fn`).
    layers: ordered layer names (top-level keys of ``params``) or
      ``'/'``-joined paths to sub-trees, input to output, e.g. a bn_jax
      model's ``model.layer_names()``. Required: the order defines the
      mixed points, and a params dict cannot give it (jax tree operations
      rebuild dicts with sorted keys, so after one optimizer step
      'Dense_10' comes before 'Dense_2'). Parameters outside every listed
      layer are held at :math:`W^t` in the mixed points.
    method: ``'map'`` (sequential, low memory) or ``'vmap'`` (batched).

  Returns:
    Flat dict with, for every layer name ``n``: ``ics/n/l2_diff``
    (:math:`\\|G_i - G'_i\\|_2`), ``ics/n/cosine`` (:math:`\\cos(G_i, G'_i)`,
    0 if either is 0), ``ics/n/grad_norm`` (:math:`\\|G_i\\|_2`),
    ``ics/n/position`` (the layer's index i, since jit returns dicts with
    sorted keys), and the scalar ``ics/loss`` at :math:`W^t`. Values are
    0-d arrays (jit-able); :func:`bn_jax.analysis.to_python` turns them into
    floats.
  """
  if method not in ("map", "vmap"):
    raise ValueError(f"method must be 'map' or 'vmap', got {method!r}.")
  if not callable(update_fn):
    raise TypeError(f"update_fn must be callable as update_fn(params, grads) "
                    f"-> new_params, got {update_fn!r}.")
  paths = _trees.ordered_layers(params, layers)
  _trees.check_scalar_loss(loss_fn, params, batch_stats, batch)
  names = ["/".join(p) for p in paths]
  num_layers = len(paths)

  # Abstract evaluation (no FLOPs): a bad update_fn fails before any work.
  _trees.check_same_structure(
      params, jax.eval_shape(update_fn, params, params), "update_fn",
      "new params")

  loss, grads = jax.value_and_grad(loss_fn)(params, batch_stats, batch)
  new_params = update_fn(params, grads)

  positions = _trees.leaf_layer_positions(params, paths)
  treedef = jax.tree.structure(params)
  old_leaves = jax.tree.leaves(params)
  new_leaves = jax.tree.leaves(new_params)

  def per_layer_sums(tree_a, tree_b):
    """Per-layer <a,b>, |a|^2 and |b|^2 as [num_layers] vectors."""
    dots = [jnp.zeros((), jnp.float32) for _ in range(num_layers)]
    sq_a = list(dots)
    sq_b = list(dots)
    for pos, a, b in zip(positions, jax.tree.leaves(tree_a),
                         jax.tree.leaves(tree_b)):
      if pos == num_layers:
        continue
      dots[pos] = dots[pos] + _trees.tree_dot(a, b)
      sq_a[pos] = sq_a[pos] + _trees.tree_sq_norm(a)
      sq_b[pos] = sq_b[pos] + _trees.tree_sq_norm(b)
    return jnp.stack(dots), jnp.stack(sq_a), jnp.stack(sq_b)

  def mixed_params(i):
    # Layers strictly before layer i take their step; layer i onwards (and
    # unlisted parameters, position num_layers) stay at W^t.
    leaves = [jnp.where(pos < i, new, old) if pos < num_layers else old
              for pos, old, new in zip(positions, old_leaves, new_leaves)]
    return jax.tree.unflatten(treedef, leaves)

  def shifted_sums(i):
    shifted_grads = jax.grad(loss_fn)(mixed_params(i), batch_stats, batch)
    dot, sq_g, sq_shifted = per_layer_sums(grads, shifted_grads)
    # ||G - G'||^2 = |G|^2 + |G'|^2 - 2<G, G'> cancels badly when G ~ G';
    # take the difference leaf by leaf instead.
    diff = _trees.tree_sub(grads, shifted_grads)
    _, sq_diff, _ = per_layer_sums(diff, diff)
    take = lambda v: lax.dynamic_index_in_dim(v, i, keepdims=False)
    return take(dot), take(sq_g), take(sq_shifted), take(sq_diff)

  _, sq_g_all, _ = per_layer_sums(grads, grads)
  if num_layers > 1:
    indices = jnp.arange(1, num_layers)
    if method == "map":
      dot, sq_g, sq_shifted, sq_diff = lax.map(shifted_sums, indices)
    else:
      dot, sq_g, sq_shifted, sq_diff = jax.vmap(shifted_sums)(indices)
    cosine = _trees.safe_cosine(dot, sq_g, sq_shifted)
    l2_diff = jnp.sqrt(sq_diff)
  else:
    cosine = jnp.zeros((0,), jnp.float32)
    l2_diff = jnp.zeros((0,), jnp.float32)
  # Layer 0: G' = G by definition (no earlier layer moves).
  first_cos = jnp.where(sq_g_all[0] > 0, 1.0, 0.0)
  cosine = jnp.concatenate([first_cos[None], cosine])
  l2_diff = jnp.concatenate([jnp.zeros((1,), l2_diff.dtype), l2_diff])

  out = {"ics/loss": loss}
  for i, name in enumerate(names):
    out[f"ics/{name}/l2_diff"] = l2_diff[i]
    out[f"ics/{name}/cosine"] = cosine[i]
    out[f"ics/{name}/grad_norm"] = jnp.sqrt(sq_g_all[i])
    out[f"ics/{name}/position"] = jnp.asarray(i, jnp.int32)
  return out
