"""Helpers shared by the batch-statistics normalizations.

Layout of the feature axes, masks, the "enough values for a variance" check,
the running-statistics update and the per-feature affine maps. Every function
here is used by more than one of :mod:`bn_jax.core`'s normalizations
(batch norm, batch renorm, l_p norm, frozen BN, group/layer norm, CBN), so it
lives in this module of its own rather than inside one of them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax.core import validation
from bn_jax.core.moments import Moments, real_dtype, stats_dtype


class FeatureLayout(NamedTuple):
  """Where the features of ``x`` are, for per-feature statistics.

  Attributes:
    feature_axes: the sorted, non-negative feature axes.
    reduction_axes: every other axis (the statistics are over these).
    feature_shape: ``tuple(x.shape[a] for a in feature_axes)``, the shape of
      running statistics and affine parameters.
    broadcast_shape: ``x.ndim`` dims, the feature sizes at the feature axes
      and 1 elsewhere (per-feature arrays reshaped to it broadcast against
      ``x``).
  """
  feature_axes: tuple
  reduction_axes: tuple
  feature_shape: tuple
  broadcast_shape: tuple


def feature_layout(x: jax.Array, axis) -> FeatureLayout:
  """The :class:`FeatureLayout` of ``x`` with feature axis (or axes) ``axis``."""
  feature_axes = validation.normalize_axes(axis, x.ndim, "axis")
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  broadcast_shape = tuple(
      x.shape[i] if i in feature_axes else 1 for i in range(x.ndim))
  return FeatureLayout(feature_axes, reduction_axes, feature_shape,
                       broadcast_shape)


def broadcast_mask(mask, shape):
  """``mask`` as a boolean array of ``shape`` (None stays None).

  Raises ValueError naming ``mask`` when it does not broadcast.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  try:
    return jnp.broadcast_to(mask.astype(bool), shape)
  except ValueError:
    raise ValueError(f"mask has shape {mask.shape}, which does not broadcast "
                     f"to the input's shape {tuple(shape)}.") from None


def check_enough_values(x, reduction_axes, ghost_batch_size=None, mask=None,
                        axis_name=None) -> None:
  """Raises ValueError when a train-mode variance would use 1 value/feature.

  A variance of one value is 0 and the normalized output is 0 whatever the
  input (PyTorch raises too). With a ``mask`` or ``axis_name`` the count is
  known only at run time, so nothing is checked.
  """
  if mask is not None or axis_name is not None:
    return
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


def ema_update(state, mean, var, *, momentum):
  """``new = momentum * old + (1 - momentum) * batch``, in the state's dtype.

  ``state`` is any NamedTuple with ``mean`` and ``var`` fields; the same type
  is returned with those two replaced. A complex batch ``mean`` makes the
  running mean complex (the state's precision, as flax's update
  ``momentum * ra_mean + (1 - momentum) * mean`` promotes it); the variance
  stays real.
  """
  dtype = state.mean.dtype
  mean_dtype = (jnp.promote_types(dtype, mean.dtype) if jnp.iscomplexobj(mean)
                else dtype)
  new_mean = momentum * state.mean + (1.0 - momentum) * mean.astype(mean_dtype)
  new_var = momentum * state.var + (1.0 - momentum) * var.astype(dtype)
  return state._replace(mean=new_mean.astype(mean_dtype),
                        var=new_var.astype(dtype))


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
  ``a = scale / sqrt(var + eps)`` and ``b = bias - mean * a``. For complex
  ``x`` the variance is real (a complex ``var`` -- flax.nnx promotes the
  running variance with the input -- enters by its real part).
  """
  dtype = stats_dtype(x.dtype)
  mean = jnp.reshape(mean, broadcast_shape).astype(dtype)
  var = jnp.reshape(var, broadcast_shape)
  if jnp.iscomplexobj(var):
    var = jnp.real(var)
  inv = lax.rsqrt(var.astype(real_dtype(dtype)) + epsilon)
  if scale is not None:
    inv = inv * jnp.reshape(scale, broadcast_shape).astype(dtype)
  y = (x.astype(dtype) - mean) * inv
  if bias is not None:
    y = y + jnp.reshape(bias, broadcast_shape).astype(dtype)
  return y.astype(x.dtype)


def check_common(x, state, scale, bias, *, axis, momentum, epsilon,
                 state_fields=("mean", "var"),
                 allow_complex: bool = False) -> FeatureLayout:
  """Validation shared by the batch-statistics normalizations.

  ``state_fields``: the feature-shaped entries of ``state`` (e.g. a step
  counter is not one); ``allow_complex``: complex ``x`` is accepted (batch
  norm); returns ``feature_layout(x, axis)``.
  """
  validation.check_floating(x, allow_complex=allow_complex)
  layout = feature_layout(x, axis)
  if state is not None:
    for field in state_fields:
      validation.check_feature_shape(getattr(state, field),
                                     layout.feature_shape, f"state.{field}")
  validation.check_feature_shape(scale, layout.feature_shape, "scale")
  validation.check_feature_shape(bias, layout.feature_shape, "bias")
  validation.check_momentum(momentum)
  validation.check_epsilon(epsilon)
  return layout
