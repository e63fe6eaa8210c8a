r"""Noisy batch norm (Santurkar et al., 2018, Sec. 2.1) as a pure function.

The experiment that separates BN's benefit from "internal covariate shift":
after each BN layer (before the nonlinearity) every activation is perturbed by
i.i.d. noise whose distribution has a non-zero mean and a non-unit variance
and is re-drawn at every training step, so the layer-input distributions keep
shifting although BN is present.

Train mode, one call = one training step, with ``key`` the step's PRNG key and
``f`` indexing the features (the entries of the feature axes ``axis``):

.. math::

   y^{BN} &= \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta
            \quad\text{(exactly ``batch_norm``, incl. the EMA update)}\\
   m_f &\sim U(\text{noise\_mean\_range}),\qquad
   s_f \sim U(\text{noise\_std\_range})
        \quad\text{(per feature, drawn once per call)}\\
   z_i &\sim N(0, 1)\quad\text{(per activation, i.i.d.)}\\
   y_i &= y^{BN}_i + m_{f(i)} + s_{f(i)}\, z_i

i.e. ADDITIVE noise ``n_i ~ N(m_f, s_f^2)`` (``noise_form='additive'``, the
default): within one step and feature the noise has mean ``m_f`` and standard
deviation ``s_f``; both change from step to step (a different ``key`` gives
different ``m_f``, ``s_f`` and ``z``). The noise does not depend on ``x``, so
gradients equal batch norm's.

``noise_form='affine'`` instead shifts and rescales each feature's whole
distribution, with no per-activation noise:

.. math::

   y_i = y^{BN}_i\, s_{f(i)} + m_{f(i)}

so a feature's mean becomes ``beta_f * s_f + m_f`` and its standard deviation
``|gamma_f| * s_f`` for the step (the multiplicative-plus-additive form;
here ``s_f`` is a scale, and the gradient through ``y^{BN}`` is multiplied by
``s_f``).

The paper draws the noise mean and scale from uniform ranges; the exact ranges
are not verified, hence the keyword arguments. Defaults:
``noise_mean_range = (-1, 1)`` and ``noise_std_range = (0.5, 1.5)``.

Eval mode (``train=False``): plain batch-norm inference, no noise; ``key`` is
ignored and may be ``None``.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from bn_jax.core.batch_norm import BatchNormState, batch_norm_with_moments
from bn_jax.core.common import feature_layout
from bn_jax.core.moments import Moments, stats_dtype


NOISE_FORMS = ("additive", "affine")


class NoiseRanges(NamedTuple):
  """Validated uniform ranges of the per-feature noise mean and std."""
  mean: tuple[float, float]
  std: tuple[float, float]


def check_noise_ranges(noise_mean_range, noise_std_range,
                       noise_form: str = "additive") -> NoiseRanges:
  """Raises ValueError/TypeError naming the argument for a bad range or
  ``noise_form``."""
  if noise_form not in NOISE_FORMS:
    raise ValueError(f"noise_form must be one of {NOISE_FORMS}, got "
                     f"{noise_form!r}.")
  out = []
  for name, rng in (("noise_mean_range", noise_mean_range),
                    ("noise_std_range", noise_std_range)):
    if not (isinstance(rng, (tuple, list)) and len(rng) == 2 and all(
        isinstance(v, numbers.Real) for v in rng)):
      raise TypeError(f"{name} must be a pair of numbers (low, high), got "
                      f"{rng!r}.")
    low, high = float(rng[0]), float(rng[1])
    if not low <= high:
      raise ValueError(f"{name}=({low}, {high}) needs low <= high.")
    out.append((low, high))
  if out[1][0] < 0.0:
    raise ValueError("noise_std_range must be non-negative (a standard "
                     "deviation, or a scale for noise_form='affine'), got "
                     f"{noise_std_range!r}.")
  return NoiseRanges(out[0], out[1])


def noisy_batch_norm(
    x: jax.Array,
    state: BatchNormState,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    key: Optional[jax.Array] = None,
    train: bool,
    noise_mean_range: tuple[float, float] = (-1.0, 1.0),
    noise_std_range: tuple[float, float] = (0.5, 1.5),
    noise_form: str = "additive",
    axis=-1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    unbiased_running_var: bool = False,
    axis_name=None,
    axis_index_groups=None,
    ghost_batch_size: Optional[int] = None,
    mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, BatchNormState]:
  """Batch norm followed (in training) by step-varying additive noise.

  Args:
    x: floating input, any rank. bf16/f16 inputs keep float32 statistics and
      return ``y`` in the input dtype.
    state: running statistics (``batch_norm_state``), feature-shaped.
    scale: optional gamma, feature-shaped.
    bias: optional beta, feature-shaped.
    key: PRNG key of this training step (required when ``train``; use a new
      one every step so the noise distribution is re-drawn). Ignored in eval.
    train: batch statistics + EMA update + noise (True), or running
      statistics without noise (False).
    noise_mean_range: ``(low, high)`` of the uniform distribution of the
      per-feature noise mean ``m_f``.
    noise_std_range: ``(low, high)``, ``low >= 0``, of the uniform
      distribution of the per-feature noise standard deviation ``s_f`` (the
      per-feature scale for ``noise_form='affine'``).
    noise_form: ``'additive'`` (``y + m_f + s_f z``, i.i.d. ``z`` per
      activation) or ``'affine'`` (``y * s_f + m_f``); see the module
      docstring.
    axis: the feature axis or axes; statistics are over all other axes.
    momentum: weight of the old running value, in [0, 1).
    epsilon: added to the variance inside the square root, > 0.
    unbiased_running_var: as in ``batch_norm``.
    axis_name: SyncBN across this mapped axis (count-weighted). The noise is
      drawn from ``key`` on each device.
    axis_index_groups: device groups for SyncBN.
    ghost_batch_size: as in ``batch_norm`` (ghost / virtual BN).
    mask: as in ``batch_norm`` (True entries enter the statistics).

  Returns:
    ``(y, new_state)``; the state update is batch norm's (noise does not
    enter the running statistics).
  """
  y, new_state, _ = noisy_batch_norm_with_moments(
      x, state, scale, bias, key=key, train=train,
      noise_mean_range=noise_mean_range, noise_std_range=noise_std_range,
      noise_form=noise_form, axis=axis, momentum=momentum, epsilon=epsilon,
      unbiased_running_var=unbiased_running_var, axis_name=axis_name,
      axis_index_groups=axis_index_groups, ghost_batch_size=ghost_batch_size,
      mask=mask)
  return y, new_state


def noisy_batch_norm_with_moments(
    x: jax.Array,
    state: BatchNormState,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    key: Optional[jax.Array] = None,
    train: bool,
    noise_mean_range: tuple[float, float] = (-1.0, 1.0),
    noise_std_range: tuple[float, float] = (0.5, 1.5),
    noise_form: str = "additive",
    axis=-1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    unbiased_running_var: bool = False,
    axis_name=None,
    axis_index_groups=None,
    ghost_batch_size: Optional[int] = None,
    mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, BatchNormState, Optional[Moments]]:
  """:func:`noisy_batch_norm` that also returns the batch moments it used.

  Internal (not in ``bn_jax.__all__``), for the PreciseBN hooks: returns
  ``(y, new_state, moments)``, ``moments`` those of ``x`` (the noise does not
  enter them; None in eval mode).
  """
  ranges = check_noise_ranges(noise_mean_range, noise_std_range, noise_form)
  if train and key is None:
    raise ValueError("noisy_batch_norm needs a PRNG `key` in train mode (the "
                     "noise is re-drawn every step), got key=None. In flax "
                     "pass rngs={'noise': key}.")
  y, new_state, batch = batch_norm_with_moments(
      x, state, scale, bias, train=train, axis=axis, momentum=momentum,
      epsilon=epsilon, unbiased_running_var=unbiased_running_var,
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      ghost_batch_size=ghost_batch_size, mask=mask)
  if not train:
    return y, new_state, batch
  _, _, feature_shape, bshape = feature_layout(x, axis)
  dtype = stats_dtype(x.dtype)
  key_mean, key_std, key_z = jax.random.split(key, 3)
  noise_mean = jnp.reshape(jax.random.uniform(
      key_mean, feature_shape, dtype, *ranges.mean), bshape)
  noise_std = jnp.reshape(jax.random.uniform(
      key_std, feature_shape, dtype, *ranges.std), bshape)
  if noise_form == "affine":
    out = y.astype(dtype) * noise_std + noise_mean
  else:
    z = jax.random.normal(key_z, x.shape, dtype)
    out = y.astype(dtype) + (noise_mean + noise_std * z)
  return out.astype(x.dtype), new_state, batch
