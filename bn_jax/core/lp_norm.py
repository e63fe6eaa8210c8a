r"""l_p normalization (Santurkar et al., 2018, Sec. 3.3) as a pure function.

Batch norm with the standard deviation replaced by the average l_p norm of
the centred activations, per feature over every non-feature axis (the same
axes as batch norm; ``m`` values per feature):

.. math::

   c_i = x_i - \mu_B,\qquad
   n_1 = \tfrac1m \sum_i |c_i|,\qquad
   n_2 = \sqrt{\tfrac1m \sum_i c_i^2} = \sigma_B,\qquad
   n_\infty = \max_i |c_i|,

   y_i = \gamma \frac{c_i}{\sqrt{n_p^2 + \epsilon}} + \beta .

``epsilon`` sits inside a square root with the SQUARED norm (for every p), so
``p = 2`` is exactly :func:`bn_jax.core.batch_norm.batch_norm` in train mode
(``sqrt(sigma_B^2 + eps)``), and the project's convention "epsilon is inside
the square root" holds for all p.

Running statistics (``LpNormState``): EMAs ``new = momentum * old +
(1 - momentum) * batch`` of the batch mean ``mu_B`` and of the batch norm
``n_p`` itself (not of its square; for p = 2 this averages ``sigma_B``,
unlike batch norm's running variance). Eval mode:
``y = gamma (x - mean) / sqrt(norm^2 + eps) + beta``, state unchanged.

Gradients: ``|c|`` is differentiated as ``sign(c)`` and the max of p = inf
passes its gradient to the arg-max entry only (ties split by JAX's rule).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax.core.batch_norm import (BatchNormState, batch_norm_state,
                                    batch_statistics)
from bn_jax.core.common import (affine, check_common, check_enough_values,
                                ema_update, normalize_with)
from bn_jax.core.moments import centered


class LpNormState(NamedTuple):
  """Running statistics of one l_p-norm layer, one entry per feature.

  Attributes:
    mean: EMA of the batch mean.
    norm: EMA of the batch's average l_p norm ``n_p`` of the centred values.
  """
  mean: jax.Array
  norm: jax.Array


def lp_norm_state(num_features, dtype=jnp.float32) -> LpNormState:
  """Initial running statistics: mean 0 and norm 1.

  The values of ``batch_norm_state`` (whose arguments it takes): a unit
  variance is a unit l_2 norm.
  """
  return LpNormState(*batch_norm_state(num_features, dtype))


def canonical_p(p) -> Union[int, float]:
  """1, 2 or ``math.inf`` from 1, 2, ``inf``/``float('inf')`` or ``'inf'``.

  Raises ValueError naming ``p`` for anything else.
  """
  if isinstance(p, str) and p.strip().lower() in ("inf", "infinity"):
    return math.inf
  if isinstance(p, numbers.Real) and not isinstance(p, bool):
    if p == 1:
      return 1
    if p == 2:
      return 2
    if p == math.inf:
      return math.inf
  raise ValueError(f"p must be 1, 2 or inf (also 'inf'), got p={p!r}.")


def lp_norm(
    x: jax.Array,
    state: LpNormState,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    train: bool,
    p=2,
    axis=-1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, LpNormState]:
  """Centres ``x`` and divides by the average l_p norm; ``(y, new_state)``.

  Args:
    x: floating input, any rank. bf16/f16 inputs keep float32 statistics and
      return ``y`` in the input dtype.
    state: ``lp_norm_state(...)``: running mean and norm, feature-shaped.
    scale: optional gamma, feature-shaped.
    bias: optional beta, feature-shaped.
    train: batch statistics + EMA update (True) or running statistics (False).
    p: 1, 2 or inf (``math.inf``, ``float('inf')`` or the string ``'inf'``).
    axis: the feature axis or axes; statistics are over all other axes.
    momentum: weight of the old running value, in [0, 1).
    epsilon: > 0; the denominator is ``sqrt(n_p^2 + epsilon)``.
    axis_name: statistics over all devices of this mapped axis (the mean and
      the l_1 sum are count-weighted ``psum``s, the l_inf norm a ``pmax``).
    axis_index_groups: device groups for ``axis_name``.
    mask: boolean, broadcastable to ``x``; True entries enter the statistics.

  Returns:
    ``(y, new_state)``; in eval mode ``new_state is state``.
  """
  p = canonical_p(p)
  _, reduction_axes, feature_shape, bshape = check_common(
      x, state, scale, bias, axis=axis, momentum=momentum, epsilon=epsilon,
      state_fields=LpNormState._fields)
  if not train:
    norm = jnp.asarray(state.norm, jnp.promote_types(state.norm.dtype,
                                                     jnp.float32))
    return normalize_with(x, state.mean, norm * norm, scale, bias,
                          epsilon=epsilon, broadcast_shape=bshape), state
  check_enough_values(x, reduction_axes, None, mask, axis_name)
  m = batch_statistics(x, axis=axis, mask=mask, axis_name=axis_name,
                       axis_index_groups=axis_index_groups)
  c = centered(x, m)
  if mask is not None:
    keep = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
  if p == 2:
    norm_sq = m.var  # sqrt(var + eps): batch norm exactly
  elif p == 1:
    a = jnp.abs(c) if mask is None else jnp.where(keep, jnp.abs(c), 0.0)
    total = jnp.sum(a, reduction_axes, keepdims=True)
    if axis_name is not None:
      total = lax.psum(total, axis_name, axis_index_groups=axis_index_groups)
    norm_1 = total / jnp.maximum(m.count, 1.0)
    norm_sq = norm_1 * norm_1
  else:
    a = jnp.abs(c) if mask is None else jnp.where(keep, jnp.abs(c), 0.0)
    norm_inf = jnp.max(a, reduction_axes, keepdims=True)
    if axis_name is not None:
      norm_inf = lax.pmax(norm_inf, axis_name,
                          axis_index_groups=axis_index_groups)
    norm_sq = norm_inf * norm_inf
  y = affine(c * lax.rsqrt(norm_sq + epsilon), scale, bias, bshape)
  batch_mean = lax.stop_gradient(m.mean.reshape(feature_shape))
  batch_norm_p = jnp.sqrt(lax.stop_gradient(norm_sq)).reshape(feature_shape)
  ema = ema_update(BatchNormState(state.mean, state.norm), batch_mean,
                   batch_norm_p, momentum=momentum)
  return y.astype(x.dtype), LpNormState(ema.mean, ema.var)
