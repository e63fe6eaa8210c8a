r"""Batch Renormalization (Ioffe, 2017) as a pure function.

Train mode, per feature over every non-feature axis (as batch norm), with
``mu``, ``var`` the running (moving-average) statistics held in the state:

.. math::

   \sigma_B = \sqrt{\sigma_B^2 + \epsilon},\qquad
   \sigma = \sqrt{\mathrm{var} + \epsilon},

   r = \operatorname{stop\_grad}\Big(\operatorname{clip}_{[1/r_{max},\,
       r_{max}]}\big(\sigma_B / \sigma\big)\Big),\qquad
   d = \operatorname{stop\_grad}\Big(\operatorname{clip}_{[-d_{max},\,
       d_{max}]}\big((\mu_B - \mu) / \sigma\big)\Big),

   \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d,\qquad
   y = \gamma \hat x + \beta .

``r`` and ``d`` are constants for autodiff, so the gradient is BN's gradient
(through ``mu_B`` and ``sigma_B``) scaled by ``r``. When the clips are
inactive, ``x_hat = (x - mu) / sigma``: training uses the same affine map as
inference. With ``r_max = 1, d_max = 0`` it is exactly batch norm.

Eval mode (``train=False``): ``y = gamma (x - mu) / sqrt(var + eps) + beta``
(batch norm inference); the state is returned unchanged.

Running statistics: ``new = momentum * old + (1 - momentum) * batch`` for the
mean and the (biased, unless ``unbiased_running_var``) batch variance, as
:func:`bn_jax.core.batch_norm.batch_norm`. The paper's Algorithm 1 averages
``sigma`` itself; averaging the variance instead keeps the state
interchangeable with ``BatchNormState`` (folding, PreciseBN) and
``sigma = sqrt(var + eps)`` as stated above.

Schedule of the clip limits (``r_max``/``d_max`` left ``None``). Let
``t = state.step``, the number of training calls before this one (0 on the
first call; it increments by one per ``train=True`` call and is unchanged in
eval), and ``w = warmup_steps``:

.. math::

   r_{max}(t) = 1 + (r_{final} - 1)\,
       \operatorname{clip}_{[0,1]}\Big(\frac{t - w}{T_r - w}\Big),\qquad
   d_{max}(t) = d_{final}\,
       \operatorname{clip}_{[0,1]}\Big(\frac{t - w}{T_d - w}\Big)

with ``T_r = r_max_steps``, ``T_d = d_max_steps``: plain BN (``r_max = 1``,
``d_max = 0``) for ``t <= w``, then linear in ``t`` up to the final values
reached at ``t = T_r`` (resp. ``T_d``) and kept afterwards (``T = w`` means
a jump to the final value at ``t = w``). Example with the defaults (the
paper's: 5k warm-up steps, ``r_max -> 3`` by 40k and ``d_max -> 5`` by 25k
steps): ``r_max(12500) = 1 + 2 * 7500 / 35000``, ``d_max(12500) = 5 * 7500 /
20000``. Explicit ``r_max``/``d_max`` replace the corresponding schedule
entirely (constant limits). The schedule is also available on its own as
:func:`batch_renorm_limits`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax.core import validation
from bn_jax.core.batch_norm import (BatchNormState, batch_norm_state,
                                    batch_statistics)
from bn_jax.core.common import (affine, check_common, check_enough_values,
                                ema_update, normalize_with, running_inputs)
from bn_jax.core.moments import Moments, centered


class BatchRenormState(NamedTuple):
  """Running statistics of one BRN layer and its training step counter.

  Attributes:
    mean: running mean ``mu`` per feature.
    var: running (biased) variance per feature; ``sigma = sqrt(var + eps)``.
    step: int32 scalar, number of training calls so far (drives the
      ``r_max``/``d_max`` schedule).
  """
  mean: jax.Array
  var: jax.Array
  step: jax.Array


def batch_renorm_state(num_features, dtype=jnp.float32) -> BatchRenormState:
  """Initial state: mean 0, variance 1 (as ``batch_norm_state``), step 0.

  Arguments as :func:`bn_jax.core.batch_norm.batch_norm_state`.
  """
  return BatchRenormState(*batch_norm_state(num_features, dtype),
                          jnp.zeros((), jnp.int32))


def _check_schedule(warmup_steps, r_max_final, r_max_steps, d_max_final,
                    d_max_steps, r_max, d_max) -> None:
  validation.check_positive_int(warmup_steps, "warmup_steps", minimum=0)
  for name, steps in (("r_max_steps", r_max_steps),
                      ("d_max_steps", d_max_steps)):
    validation.check_positive_int(steps, name, minimum=0)
    if steps < warmup_steps:
      raise ValueError(f"{name}={steps} must be >= warmup_steps="
                       f"{warmup_steps} (the relaxation starts after the "
                       "warm-up).")
  for name, value, low in (("r_max_final", r_max_final, 1.0),
                           ("d_max_final", d_max_final, 0.0),
                           ("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
    if value is not None and validation.is_static_number(value) and not (
        float(value) >= low):
      raise ValueError(f"{name} must be >= {low}, got {float(value)}.")


def batch_renorm_limits(
    step,
    *,
    warmup_steps: int = 5000,
    r_max_final: float = 3.0,
    r_max_steps: int = 40000,
    d_max_final: float = 5.0,
    d_max_steps: int = 25000,
) -> tuple[jax.Array, jax.Array]:
  """``(r_max, d_max)`` of the schedule at training step ``step``.

  See the module docstring: 1 and 0 up to ``warmup_steps``, then linear in
  the step to ``r_max_final`` at ``r_max_steps`` and ``d_max_final`` at
  ``d_max_steps``, constant afterwards. Returns float32 scalars.
  """
  _check_schedule(warmup_steps, r_max_final, r_max_steps, d_max_final,
                  d_max_steps, None, None)
  t = jnp.asarray(step, jnp.float32)

  def progress(end):
    # t >= end gives exactly 1 (also when end == warmup_steps, a jump).
    ramp = jnp.clip((t - warmup_steps) / max(end - warmup_steps, 1), 0.0, 1.0)
    return jnp.where(t >= end, 1.0, ramp)

  r_max = 1.0 + (r_max_final - 1.0) * progress(r_max_steps)
  d_max = d_max_final * progress(d_max_steps)
  return r_max.astype(jnp.float32), d_max.astype(jnp.float32)


def batch_renorm(
    x: jax.Array,
    state: BatchRenormState,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    train: bool,
    axis=-1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    r_max=None,
    d_max=None,
    warmup_steps: int = 5000,
    r_max_final: float = 3.0,
    r_max_steps: int = 40000,
    d_max_final: float = 5.0,
    d_max_steps: int = 25000,
    unbiased_running_var: bool = False,
    axis_name=None,
    axis_index_groups=None,
    mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, BatchRenormState]:
  """Batch-renormalizes ``x``; returns ``(y, new_state)``.

  Args:
    x: floating input, any rank. bf16/f16 inputs keep float32 statistics and
      return ``y`` in the input dtype.
    state: ``batch_renorm_state(...)``: running mean/var and the step.
    scale: optional gamma, feature-shaped.
    bias: optional beta, feature-shaped.
    train: renormalized batch statistics + EMA update + ``step += 1`` (True),
      or the running statistics (False, state unchanged).
    axis: the feature axis or axes; statistics are over all other axes.
    momentum: weight of the old running value, in [0, 1) (the paper's update
      rate 0.01 is ``momentum=0.99``).
    epsilon: added to both variances inside the square roots, > 0.
    r_max: constant clip limit for ``r`` (>= 1); ``None`` uses the schedule.
    d_max: constant clip limit for ``|d|`` (>= 0); ``None`` uses the schedule.
    warmup_steps: steps with ``r_max = 1, d_max = 0`` (plain BN).
    r_max_final: ``r_max`` reached at ``r_max_steps`` (linear from 1 after the
      warm-up).
    r_max_steps: step at which ``r_max`` reaches ``r_max_final``.
    d_max_final: ``d_max`` reached at ``d_max_steps`` (linear from 0 after
      the warm-up).
    d_max_steps: step at which ``d_max`` reaches ``d_max_final``.
    unbiased_running_var: feed ``m / (m - 1) * var_B`` to the running
      variance (normalization uses the biased batch variance).
    axis_name: SyncBN across this mapped axis (count-weighted).
    axis_index_groups: device groups for SyncBN.
    mask: boolean, broadcastable to ``x``; True entries enter the statistics.

  Returns:
    ``(y, new_state)``; in eval mode ``new_state is state``.
  """
  y, new_state, _ = batch_renorm_with_moments(
      x, state, scale, bias, train=train, axis=axis, momentum=momentum,
      epsilon=epsilon, r_max=r_max, d_max=d_max, warmup_steps=warmup_steps,
      r_max_final=r_max_final, r_max_steps=r_max_steps,
      d_max_final=d_max_final, d_max_steps=d_max_steps,
      unbiased_running_var=unbiased_running_var, axis_name=axis_name,
      axis_index_groups=axis_index_groups, mask=mask)
  return y, new_state


def batch_renorm_with_moments(
    x: jax.Array,
    state: BatchRenormState,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    train: bool,
    axis=-1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    r_max=None,
    d_max=None,
    warmup_steps: int = 5000,
    r_max_final: float = 3.0,
    r_max_steps: int = 40000,
    d_max_final: float = 5.0,
    d_max_steps: int = 25000,
    unbiased_running_var: bool = False,
    axis_name=None,
    axis_index_groups=None,
    mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, BatchRenormState, Optional[Moments]]:
  """:func:`batch_renorm` that also returns the batch moments it used.

  Internal (not in ``bn_jax.__all__``), for the PreciseBN hooks: returns
  ``(y, new_state, moments)`` with the plain batch moments ``mu_B``,
  ``sigma_B^2`` of ``x`` (``Moments``; None in eval mode).
  """
  _, reduction_axes, feature_shape, bshape = check_common(
      x, state, scale, bias, axis=axis, momentum=momentum, epsilon=epsilon)
  _check_schedule(warmup_steps, r_max_final, r_max_steps, d_max_final,
                  d_max_steps, r_max, d_max)
  if not train:
    y = normalize_with(x, state.mean, state.var, scale, bias, epsilon=epsilon,
                       broadcast_shape=bshape)
    return y, state, None
  check_enough_values(x, reduction_axes, None, mask, axis_name)
  sched_r, sched_d = batch_renorm_limits(
      state.step, warmup_steps=warmup_steps, r_max_final=r_max_final,
      r_max_steps=r_max_steps, d_max_final=d_max_final,
      d_max_steps=d_max_steps)
  r_lim = sched_r if r_max is None else r_max
  d_lim = sched_d if d_max is None else d_max

  m = batch_statistics(x, axis=axis, mask=mask, axis_name=axis_name,
                       axis_index_groups=axis_index_groups)
  dtype = m.mean.dtype
  r_lim = jnp.asarray(r_lim, dtype)
  d_lim = jnp.asarray(d_lim, dtype)
  inv_sigma_b = lax.rsqrt(m.var + epsilon)
  mu = jnp.reshape(state.mean, bshape).astype(dtype)
  inv_sigma = lax.rsqrt(jnp.reshape(state.var, bshape).astype(dtype) + epsilon)
  r = lax.stop_gradient(
      jnp.clip(jnp.sqrt(m.var + epsilon) * inv_sigma, 1.0 / r_lim, r_lim))
  d = lax.stop_gradient(jnp.clip((m.mean - mu) * inv_sigma, -d_lim, d_lim))
  x_hat = centered(x, m) * (inv_sigma_b * r) + d
  y = affine(x_hat, scale, bias, bshape).astype(x.dtype)

  mean, var = running_inputs(m, feature_shape, unbiased=unbiased_running_var)
  stats = ema_update(BatchNormState(state.mean, state.var), mean, var,
                     momentum=momentum)
  return y, BatchRenormState(stats.mean, stats.var, state.step + 1), m
