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

Complex inputs (as ``flax.linen.BatchNorm``): ``mu_B`` is complex,
``sigma_B^2 = E|x - mu_B|^2`` is real, ``y = gamma (x - mu_B) /
sqrt(sigma_B^2 + eps) + beta``; the running mean becomes complex, the running
variance stays real.

Gradients: the train-mode transform is a ``jax.custom_jvp`` whose tangent is
the closed form of the BN paper's backward pass (see
``_train_normalize_jvp``). Being linear in the tangents, it is transposed by
JAX into the compact backward ``dx = gamma r (g - E[g] - x_hat E[x_hat g])``
(two reductions shared with dscale/dbias) rather than the derivative of the
one-pass sums; forward mode and higher orders keep working. It holds for
``mask``, ghost batches and ``axis_name`` (its means are ``psum``-ed too).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax.core import validation
# The shared helpers are imported by name: other normalizations import them
# from here too.
from bn_jax.core.common import (affine, broadcast_mask, check_common,  # noqa: F401
                                check_enough_values, ema_update,
                                feature_layout, normalize_with,
                                running_inputs)
from bn_jax.core.moments import (Moments, centered, moments, real_dtype,
                                 stats_dtype)


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


def _check_ghost(x, axis, ghost_batch_size, axis_name) -> int:
  """Validates ``ghost_batch_size`` against ``x``; returns it as an int."""
  g = validation.check_positive_int(ghost_batch_size, "ghost_batch_size")
  feature_axes = validation.normalize_axes(axis, x.ndim, "axis")
  if 0 in feature_axes:
    raise ValueError("ghost_batch_size splits axis 0 (the batch axis), so axis "
                     f"0 must not be a feature axis; got axis={axis!r}.")
  if axis_name is not None:
    raise ValueError("ghost_batch_size and axis_name cannot be combined: the "
                     "ghost batch is the normalization batch on one device.")
  validation.check_divides(g, "ghost_batch_size", x.shape[0],
                           f"the batch size (x.shape[0]={x.shape[0]})")
  return g


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
  validation.check_floating(x, allow_complex=True)
  feature_axes, reduction_axes, _, _ = feature_layout(x, axis)
  mask = broadcast_mask(mask, x.shape)
  if ghost_batch_size is None:
    return moments(x, reduction_axes, mask=mask, axis_name=axis_name,
                   axis_index_groups=axis_index_groups)
  g = _check_ghost(x, axis, ghost_batch_size, axis_name)
  n = x.shape[0]
  xg = x.reshape((n // g, g) + x.shape[1:])
  mg = None if mask is None else mask.reshape(xg.shape)
  group_axes = (1,) + tuple(a + 1 for a in reduction_axes if a != 0)
  return moments(xg, group_axes, mask=mg)


class _TrainConfig(NamedTuple):
  """Static (hashable) settings of a train-mode normalization."""
  reduction_axes: tuple
  axis_name: Any
  axis_index_groups: Any  # tuple of tuples, or None


def _standardize(x, mask, epsilon, cfg: _TrainConfig):
  """``(x - mean, 1 / sqrt(var + eps), Moments)`` with shifted statistics."""
  m = moments(x, cfg.reduction_axes, mask=mask, axis_name=cfg.axis_name,
              axis_index_groups=cfg.axis_index_groups)
  inv = lax.rsqrt(m.var + epsilon)
  return centered(x, m), inv, m


def _scale_and_shift(c, mul, bias):
  """``c * mul + bias``: gamma is folded into ``mul`` (one multiply)."""
  y = c * mul
  return y if bias is None else y + bias


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _train_normalize(x, scale, bias, mask, epsilon, cfg: _TrainConfig):
  """Train-mode BN of ``x`` (already in the statistics dtype).

  ``scale``/``bias`` are None or broadcast against ``x``. Returns
  ``(y, mean, var, count)`` with the statistics keeping reduced dims.
  """
  c, inv, m = _standardize(x, mask, epsilon, cfg)
  mul = inv if scale is None else inv * scale
  return _scale_and_shift(c, mul, bias), m.mean, m.var, m.count


@functools.partial(_train_normalize.defjvp, symbolic_zeros=True)
def _train_normalize_jvp(cfg: _TrainConfig, primals, tangents):
  r"""Closed-form tangent of batch norm (the BN paper's backward, as a JVP).

  With :math:`E` the (masked, all-device) batch mean per feature,
  :math:`\hat x = (x - \mu) r`, :math:`r = (\sigma^2 + \epsilon)^{-1/2}`:

  .. math::

     \dot y = \gamma r \,(\dot x - E[\dot x] - \hat x\, E[\hat x \dot x])
              + \hat x \dot\gamma + \dot\beta
              - \tfrac12 \gamma r^2 \hat x\, \dot\epsilon,\qquad
     \dot\mu = E[\dot x],\quad \dot{\sigma^2} = 2 E[\hat x \dot x] / r .

  For complex ``x`` (real ``sigma^2``) the products with :math:`\hat x`
  inside :math:`E` become :math:`\operatorname{Re}(\overline{\hat x}\,
  \dot x)` (the tangent of :math:`|x - \mu|^2`); :math:`\dot\mu` is complex.

  It is linear in the tangents, so JAX transposes it into the compact
  backward pass ``dx = gamma r (g - E[g] - x_hat E[x_hat g])`` instead of
  differentiating through the one-pass sums. Higher derivatives
  differentiate this rule (plain autodiff of the moments), so forward mode
  and order-2 derivatives work too.

  Written for XLA:CPU, whose fast reductions take elementwise inputs without
  broadcasts (anything else is first written to memory): every full-size
  factor is ``d = x - K`` -- the array the statistics were summed from --
  and per-feature factors multiply *reduced* terms. So
  ``x_hat * v = d * (r v) - E[d] r v`` and ``E[x_hat dx] = r (E[d dx] -
  E[d] E[dx])`` (no cancellation: ``|d|`` is of the order of the spread, see
  ``moments``). Transposed, the backward pass then needs only
  ``sum(g)`` and ``sum(d * g)``, shared by dx, dscale and dbias, and no
  ``x_hat`` temporary.
  """
  x, scale, bias, mask, epsilon = primals
  dx, dscale, dbias, _, depsilon = tangents
  m = moments(x, cfg.reduction_axes, mask=mask, axis_name=cfg.axis_name,
              axis_index_groups=cfg.axis_index_groups)
  inv = lax.rsqrt(m.var + epsilon)
  d, mean_d = x - m.shift, m.shifted_mean
  mul = inv if scale is None else inv * scale
  y = _scale_and_shift(d - mean_d, mul, bias)

  def batch_mean(v):
    if mask is not None:
      v = jnp.where(mask, v, 0.0)
    s = jnp.sum(v, cfg.reduction_axes, keepdims=True)
    if cfg.axis_name is not None:
      s = lax.psum(s, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)
    return s / jnp.maximum(m.count, 1.0)

  def real_product(a, b):  # a * b, or Re(conj(a) b) for complex arrays
    if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
      return jnp.real(jnp.conj(a) * b)
    return a * b

  def x_hat_times(v):  # x_hat * v for a per-feature v; see the docstring
    return d * (inv * v) + (-mean_d * inv * v)

  def nonzero(t):  # None: the argument itself is None (no scale/bias)
    return t is not None and (
        type(t) is not jax.custom_derivatives.SymbolicZero)

  dy = jnp.zeros_like(y)
  dmean = jnp.zeros_like(m.mean)
  dvar = jnp.zeros_like(m.var)
  if nonzero(dx):
    mean_dx = batch_mean(dx)
    # = E[(x - mu) dx] (its real part E[Re(conj(x - mu) dx)] if complex)
    cov_d_dx = (batch_mean(real_product(d, dx)) -
                real_product(mean_d, mean_dx))
    dy = mul * dx + (-mul * mean_dx) + x_hat_times(-mul * inv * cov_d_dx)
    dmean = mean_dx
    dvar = 2.0 * cov_d_dx
  if nonzero(depsilon):  # d x_hat / d eps = -x_hat r^2 / 2
    dy = dy + x_hat_times(-0.5 * mul * inv * depsilon)
  if nonzero(dscale):
    dy = dy + x_hat_times(dscale)
  if nonzero(dbias):
    dy = dy + dbias
  return (y, m.mean, m.var, m.count), (dy, dmean, dvar,
                                       jnp.zeros_like(m.count))


def _hashable_groups(axis_index_groups):
  if axis_index_groups is None:
    return None
  return tuple(tuple(int(i) for i in g) for g in axis_index_groups)


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
    x: floating or complex input, any rank. bf16/f16 inputs keep float32
      statistics and return ``y`` in the input dtype; complex inputs have a
      complex mean and a real variance (see the module docstring).
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
  y, new_state, _ = batch_norm_with_moments(
      x, state, scale, bias, train=train, axis=axis, momentum=momentum,
      epsilon=epsilon, unbiased_running_var=unbiased_running_var,
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      ghost_batch_size=ghost_batch_size, mask=mask)
  return y, new_state


def batch_norm_with_moments(
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
) -> tuple[jax.Array, BatchNormState, Optional[Moments]]:
  """:func:`batch_norm` that also returns the batch moments it used.

  Internal (not in ``bn_jax.__all__``): the PreciseBN hooks of the Flax
  modules store these moments without computing them a second time.

  Returns:
    ``(y, new_state, moments)``: ``moments`` is the batch's ``Moments`` as
    :func:`batch_statistics` computes them (a leading group axis with ghost
    batches) in train mode, and None in eval mode.
  """
  _, reduction_axes, feature_shape, bshape = check_common(
      x, state, scale, bias, axis=axis, momentum=momentum, epsilon=epsilon,
      allow_complex=True)
  if not train:
    y = normalize_with(x, state.mean, state.var, scale, bias, epsilon=epsilon,
                       broadcast_shape=bshape)
    return y, state, None
  if ghost_batch_size is not None:
    ghost_batch_size = _check_ghost(x, axis, ghost_batch_size, axis_name)
  check_enough_values(x, reduction_axes, ghost_batch_size, mask, axis_name)
  dtype = stats_dtype(x.dtype)
  xs = x.astype(dtype)
  mask = broadcast_mask(mask, x.shape)
  if ghost_batch_size is None:
    axes = reduction_axes
  else:  # normalize groups of ghost_batch_size samples: a leading group axis
    xs = xs.reshape((x.shape[0] // ghost_batch_size, ghost_batch_size) +
                    x.shape[1:])
    mask = None if mask is None else mask.reshape(xs.shape)
    axes = (1,) + tuple(a + 1 for a in reduction_axes if a != 0)
    bshape = (1,) + bshape
  per_feature = lambda p: None if p is None else jnp.reshape(
      p, bshape).astype(dtype)
  cfg = _TrainConfig(axes, axis_name, _hashable_groups(axis_index_groups))
  y, mean, var, count = _train_normalize(
      xs, per_feature(scale), per_feature(bias), mask,
      jnp.asarray(epsilon, real_dtype(dtype)), cfg)
  y = y.reshape(x.shape).astype(x.dtype)
  batch = Moments(mean, var, count, mean, jnp.zeros_like(mean))
  mean, var = running_inputs(batch, feature_shape,
                             grouped=ghost_batch_size is not None,
                             unbiased=unbiased_running_var)
  return y, ema_update(state, mean, var, momentum=momentum), batch
