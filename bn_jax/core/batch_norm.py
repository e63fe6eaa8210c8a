r"""Batch Normalization (Ioffe & Szegedy, 2015) as a pure function.

Train mode (Algorithm 1), per feature over every non-feature axis:

.. math::

   \mu_B = \tfrac1m \sum_i x_i,\quad
   \sigma_B^2 = \tfrac1m \sum_i (x_i - \mu_B)^2,\quad
   y_i = \gamma \frac{x_i - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

and the running statistics are exponential moving averages,
``new = momentum * old + (1 - momentum) * batch``: ``momentum`` is the weight
of the OLD value, as in flax. PyTorch's ``momentum`` is the weight of the NEW
value, so PyTorch ``momentum=0.1`` is ``momentum=0.9`` here. The running
variance receives the biased batch variance (flax) unless
``unbiased_running_var=True`` (PyTorch, and the paper's Algorithm 2 which uses
``m / (m - 1) * var_B``).

Inference (``train=False``): the same affine map with the running statistics;
the state is returned unchanged.

Options from "Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021):

* ``axis_name``: SyncBN. Statistics over all devices of a mapped axis
  (``shard_map``/``pmap``), weighted by each device's sample count, so it is
  correct when devices hold different numbers of (masked) samples.
* ``ghost_batch_size``: the *normalization* batch size. Axis 0 is split into
  groups of this size that are normalized with their own statistics. The
  running statistics receive the average of the groups' means and variances.
* ``mask``: only entries where ``mask`` is True enter the statistics (padding).

Statistics are computed in at least float32 with the shifted one-pass formula
of :mod:`bn_jax.core.moments`, accurate when ``|mean| >> std``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax.core import validation
from bn_jax.core.moments import Moments, centered, moments, stats_dtype


class BatchNormState(NamedTuple):
  """Running (population) statistics of one BN layer, one entry per feature."""
  mean: jax.Array
  var: jax.Array


def batch_norm_state(num_features, dtype=jnp.float32) -> BatchNormState:
  """Initial running statistics: mean 0 and variance 1 (as flax and PyTorch).

  Args:
    num_features: int, or the feature shape when ``axis`` names several axes.
    dtype: dtype of the running statistics (keep float32 for bf16 models).
  """
  shape = (num_features,) if isinstance(num_features, int) else tuple(
      num_features)
  for s in shape:
    validation.check_positive_int(s, "num_features")
  return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype))


def feature_layout(x: jax.Array, axis):
  """(feature_axes, reduction_axes, feature_shape, broadcast_shape)."""
  feature_axes = validation.normalize_axes(axis, x.ndim, "axis")
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  broadcast_shape = tuple(
      x.shape[i] if i in feature_axes else 1 for i in range(x.ndim))
  return feature_axes, reduction_axes, feature_shape, broadcast_shape


def batch_statistics(
    x: jax.Array,
    *,
    axis=-1,
    mask: Optional[jax.Array] = None,
    axis_name=None,
    axis_index_groups=None,
    ghost_batch_size: Optional[int] = None,
) -> Moments:
  """Train-mode batch statistics of ``x`` (what ``batch_norm`` normalizes by).

  Without ``ghost_batch_size`` the returned arrays broadcast against ``x``.
  With it, they carry a leading group axis and broadcast against ``x``
  reshaped to ``(num_groups, ghost_batch_size) + x.shape[1:]``.
  """
  validation.check_floating(x)
  feature_axes, reduction_axes, _, _ = feature_layout(x, axis)
  if mask is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
  if ghost_batch_size is None:
    return moments(x, reduction_axes, mask=mask, axis_name=axis_name,
                   axis_index_groups=axis_index_groups)
  g = validation.check_positive_int(ghost_batch_size, "ghost_batch_size")
  if 0 in feature_axes:
    raise ValueError("ghost_batch_size splits axis 0 (the batch axis), so axis "
                     f"0 must not be a feature axis; got axis={axis!r}.")
  if axis_name is not None:
    raise ValueError("ghost_batch_size and axis_name cannot be combined: the "
                     "ghost batch is the normalization batch on one device.")
  n = x.shape[0]
  if n % g:
    raise ValueError(f"ghost_batch_size={g} must divide the batch size "
                     f"(x.shape[0]={n}).")
  xg = x.reshape((n // g, g) + x.shape[1:])
  mg = None if mask is None else mask.reshape(xg.shape)
  group_axes = (1,) + tuple(a + 1 for a in reduction_axes if a != 0)
  return moments(xg, group_axes, mask=mg)


def _check_enough_values(x, reduction_axes, ghost_batch_size, mask, axis_name):
  if mask is not None or axis_name is not None:
    return  # the count is only known at run time
  count = 1
  for a in reduction_axes:
    count *= x.shape[a]
  if ghost_batch_size is not None:
    count = count // x.shape[0] * ghost_batch_size
  if count < 2:
    raise ValueError(
        f"train-mode batch norm needs more than 1 value per feature to compute "
        f"a variance, got x of shape {x.shape} (1 value per feature"
        f"{' per ghost batch' if ghost_batch_size else ''}). Use a larger "
        "batch, train=False, or a per-sample norm (group_norm, layer_norm).")


def running_inputs(batch: Moments, feature_shape, *, grouped: bool = False,
                   unbiased: bool = False):
  """The per-feature (mean, var) a batch contributes to the running stats.

  ``grouped``: ``batch`` has a leading ghost-group axis; groups are averaged.
  ``unbiased``: Bessel's correction ``m / (m - 1)`` on the variance, with ``m``
  the number of samples behind each group's statistics.
  """
  mean, var = batch.mean, batch.var
  if unbiased:
    var = var * batch.count / jnp.maximum(batch.count - 1.0, 1.0)
  if grouped:
    mean, var = jnp.mean(mean, axis=0), jnp.mean(var, axis=0)
  return (lax.stop_gradient(mean.reshape(feature_shape)),
          lax.stop_gradient(var.reshape(feature_shape)))


def ema_update(state: BatchNormState, mean, var, *, momentum) -> BatchNormState:
  """``new = momentum * old + (1 - momentum) * batch``, in the state's dtype."""
  dtype = state.mean.dtype
  new_mean = momentum * state.mean + (1.0 - momentum) * mean.astype(dtype)
  new_var = momentum * state.var + (1.0 - momentum) * var.astype(dtype)
  return BatchNormState(new_mean.astype(dtype), new_var.astype(dtype))


def affine(x_hat, scale, bias, broadcast_shape):
  """``x_hat * scale + bias`` with per-feature parameters."""
  if scale is not None:
    x_hat = x_hat * jnp.reshape(scale, broadcast_shape).astype(x_hat.dtype)
  if bias is not None:
    x_hat = x_hat + jnp.reshape(bias, broadcast_shape).astype(x_hat.dtype)
  return x_hat


def normalize_with(x, mean, var, scale, bias, *, epsilon, broadcast_shape):
  """Inference-style affine map with given per-feature mean and variance.

  One fused multiply-add per element: ``y = x * a + b`` with
  ``a = scale / sqrt(var + eps)`` and ``b = bias - mean * a``.
  """
  dtype = stats_dtype(x.dtype)
  mean = jnp.reshape(mean, broadcast_shape).astype(dtype)
  inv = lax.rsqrt(jnp.reshape(var, broadcast_shape).astype(dtype) + epsilon)
  if scale is not None:
    inv = inv * jnp.reshape(scale, broadcast_shape).astype(dtype)
  y = (x.astype(dtype) - mean) * inv
  if bias is not None:
    y = y + jnp.reshape(bias, broadcast_shape).astype(dtype)
  return y.astype(x.dtype)


def check_common(x, state, scale, bias, *, axis, momentum, epsilon):
  """Validation shared by the batch-statistics normalizations."""
  validation.check_floating(x)
  layout = feature_layout(x, axis)
  feature_shape = layout[2]
  if state is not None:
    validation.check_feature_shape(state.mean, feature_shape, "state.mean")
    validation.check_feature_shape(state.var, feature_shape, "state.var")
  validation.check_feature_shape(scale, feature_shape, "scale")
  validation.check_feature_shape(bias, feature_shape, "bias")
  validation.check_momentum(momentum)
  validation.check_epsilon(epsilon)
  return layout


def batch_norm(
    x: jax.Array,
    state: BatchNormState,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    train: bool,
    axis=-1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    unbiased_running_var: bool = False,
    axis_name=None,
    axis_index_groups=None,
    ghost_batch_size: Optional[int] = None,
    mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, BatchNormState]:
  """Batch-normalizes ``x``; returns ``(y, new_state)``.

  Args:
    x: floating input, any rank. bf16/f16 inputs keep float32 statistics and
      return ``y`` in the input dtype.
    state: running statistics (``batch_norm_state``), feature-shaped.
    scale: optional gamma, feature-shaped.
    bias: optional beta, feature-shaped.
    train: batch statistics + EMA update (True) or running statistics (False).
    axis: the feature axis or axes; statistics are over all other axes.
    momentum: weight of the old running value, in [0, 1).
    epsilon: added to the variance inside the square root, > 0.
    unbiased_running_var: feed ``m / (m - 1) * var_B`` to the running variance
      (PyTorch / BN paper Algorithm 2). Normalization always uses the biased
      batch variance.
    axis_name: SyncBN across this mapped axis (count-weighted).
    axis_index_groups: device groups for SyncBN.
    ghost_batch_size: normalize groups of this many samples along axis 0
      separately (ghost / virtual BN).
    mask: boolean, broadcastable to ``x``; True entries enter the statistics.

  Returns:
    ``(y, new_state)``; in eval mode ``new_state is state``.
  """
  _, reduction_axes, feature_shape, bshape = check_common(
      x, state, scale, bias, axis=axis, momentum=momentum, epsilon=epsilon)
  if not train:
    return normalize_with(x, state.mean, state.var, scale, bias,
                          epsilon=epsilon, broadcast_shape=bshape), state
  _check_enough_values(x, reduction_axes, ghost_batch_size, mask, axis_name)
  m = batch_statistics(x, axis=axis, mask=mask, axis_name=axis_name,
                       axis_index_groups=axis_index_groups,
                       ghost_batch_size=ghost_batch_size)
  grouped = ghost_batch_size is not None
  xs = x.reshape((m.mean.shape[0], ghost_batch_size) + x.shape[1:]) if (
      grouped) else x
  # Fold gamma into the per-feature multiplier: one multiply per element.
  mul = lax.rsqrt(m.var + epsilon)
  if scale is not None:
    mul = mul * jnp.reshape(scale, bshape).astype(mul.dtype)
  y = centered(xs, m) * mul
  if bias is not None:
    y = y + jnp.reshape(bias, bshape).astype(y.dtype)
  y = y.reshape(x.shape).astype(x.dtype)
  mean, var = running_inputs(m, feature_shape, grouped=grouped,
                             unbiased=unbiased_running_var)
  return y, ema_update(state, mean, var, momentum=momentum)
