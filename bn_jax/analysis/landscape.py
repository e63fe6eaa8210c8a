r"""Loss-landscape probes along the gradient (Santurkar et al., 2018, Sec. 3).

At parameters :math:`W` with gradient :math:`g = \nabla L(W)` on a batch,
for step sizes :math:`\eta_1, \dots, \eta_n > 0` evaluate at
:math:`W - \eta g` (the same batch, a train-mode forward):

(a) **loss variation** -- the range of the loss over the step sizes,
    including :math:`\eta = 0`:
    :math:`\max_\eta L(W - \eta g) - \min_\eta L(W - \eta g)`;
(b) **gradient predictiveness** -- for every :math:`\eta`,
    :math:`\Delta(\eta) = \|\nabla L(W) - \nabla L(W - \eta g)\|_2`, and its
    range over the step sizes (small: the gradient at :math:`W` predicts the
    gradient further along it);
(c) **effective** :math:`\beta` **-smoothness** --
    :math:`\max_\eta \Delta(\eta) / \|\eta g\|_2`, a lower bound on the
    Lipschitz constant of the gradient along the step direction.

For a quadratic :math:`L(w) = \tfrac12 w^\top A w`:
:math:`\Delta(\eta) = \eta \|A g\|` and (c) is :math:`\|A g\| / \|g\|`, at most
the largest eigenvalue of :math:`A` (tests/test_analysis.py checks this).

The paper's step-size range is not published precisely (PAPERS.md marks it
unverified); :func:`geometric_step_sizes` gives a configurable geometric grid.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax.analysis import _trees


def geometric_step_sizes(smallest: float = 0.05, largest: float = 4.0,
                         num: int = 8) -> np.ndarray:
  """``num`` step sizes spaced geometrically from ``smallest`` to ``largest``.

  The defaults bracket typical learning rates of the VGG experiments
  (0.1-0.5) by a factor of ~10 on each side; scale them to your learning rate.
  """
  if not (np.isfinite(smallest) and np.isfinite(largest)
          and 0 < smallest <= largest):
    raise ValueError(f"step sizes need 0 < smallest <= largest (finite), got "
                     f"smallest={smallest}, largest={largest}.")
  if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
    raise ValueError(f"num must be an int >= 1, got {num!r}.")
  return np.geomspace(smallest, largest, int(num))


def _check_step_sizes(step_sizes) -> np.ndarray:
  if isinstance(step_sizes, jax.core.Tracer):
    raise TypeError("step_sizes must be concrete (a list or NumPy array), not "
                    "a traced value: bind it with functools.partial before "
                    "jax.jit so that it can be validated at trace time.")
  etas = np.asarray(step_sizes, dtype=np.float64)
  if etas.ndim != 1 or etas.size == 0:
    raise ValueError(f"step_sizes must be a non-empty 1-D sequence of step "
                     f"sizes, got shape {etas.shape}.")
  if not np.all(np.isfinite(etas)) or np.any(etas <= 0):
    raise ValueError(f"step_sizes must all be finite and > 0 (eta = 0 is "
                     f"always included in the loss range), got {etas}.")
  return etas


def landscape_probe(
    loss_fn: Callable,
    params,
    batch_stats,
    batch,
    *,
    step_sizes,
    method: str = "map",
) -> dict[str, jax.Array]:
  r"""Loss variation, gradient predictiveness and effective beta-smoothness.

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch) -> scalar``, deterministic.
    params: parameters :math:`W` (the gradient direction is over all of them).
    batch_stats: passed through to ``loss_fn`` unchanged.
    batch: the batch every evaluation uses.
    step_sizes: concrete 1-D sequence of :math:`\eta > 0`
      (e.g. :func:`geometric_step_sizes`).
    method: ``'map'`` (one point after another, low memory) or ``'vmap'``.

  Returns:
    Flat dict (arrays, jit-able): ``landscape/step_sizes`` [n],
    ``landscape/loss`` [n] (:math:`L(W - \eta g)`), ``landscape/loss_at_w``,
    ``landscape/loss_min``/``loss_max``/``loss_range`` (over the step sizes
    and :math:`\eta = 0`), ``landscape/grad_norm`` (:math:`\|g\|`),
    ``landscape/grad_diff`` [n] (:math:`\Delta(\eta)`),
    ``landscape/grad_diff_min``/``grad_diff_max``/``grad_diff_range`` (over
    the given step sizes), ``landscape/beta_smoothness``
    (:math:`\max_\eta \Delta(\eta) / \|\eta g\|`; 0 when :math:`g = 0`).
  """
  if method not in ("map", "vmap"):
    raise ValueError(f"method must be 'map' or 'vmap', got {method!r}.")
  etas_np = _check_step_sizes(step_sizes)
  _trees.check_scalar_loss(loss_fn, params, batch_stats, batch)

  loss0, grads = jax.value_and_grad(loss_fn)(params, batch_stats, batch)
  grad_norm = _trees.tree_l2(grads)
  etas = jnp.asarray(etas_np, dtype=loss0.dtype)

  def probe(eta):
    moved = jax.tree.map(lambda p, g: p - (eta * g).astype(p.dtype),
                         params, grads)
    loss, moved_grads = jax.value_and_grad(loss_fn)(moved, batch_stats, batch)
    return loss, _trees.tree_l2(_trees.tree_sub(grads, moved_grads))

  if method == "map":
    losses, grad_diff = lax.map(probe, etas)
  else:
    losses, grad_diff = jax.vmap(probe)(etas)

  all_losses = jnp.concatenate([loss0[None], losses])
  step_norm = etas.astype(grad_norm.dtype) * grad_norm
  ratio = jnp.where(step_norm > 0,
                    grad_diff / jnp.where(step_norm > 0, step_norm, 1.0), 0.0)
  loss_min, loss_max = jnp.min(all_losses), jnp.max(all_losses)
  diff_min, diff_max = jnp.min(grad_diff), jnp.max(grad_diff)
  return {
      "landscape/step_sizes": etas,
      "landscape/loss": losses,
      "landscape/loss_at_w": loss0,
      "landscape/loss_min": loss_min,
      "landscape/loss_max": loss_max,
      "landscape/loss_range": loss_max - loss_min,
      "landscape/grad_norm": grad_norm,
      "landscape/grad_diff": grad_diff,
      "landscape/grad_diff_min": diff_min,
      "landscape/grad_diff_max": diff_max,
      "landscape/grad_diff_range": diff_max - diff_min,
      "landscape/beta_smoothness": jnp.max(ratio),
  }
