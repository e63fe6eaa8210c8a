r"""Layer Normalization (Ba, Kiros & Hinton, 2016) as a pure function.

Per sample, over the normalized axes ``axis`` (by default the last one, the
features):

.. math::

   \mu = \operatorname{mean}_{\text{axis}} x,\qquad
   \sigma^2 = \operatorname{mean}_{\text{axis}} (x - \mu)^2,\qquad
   y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

``gamma``/``beta`` have the shape of the feature axes ``feature_axes``
(default: the normalized axes). This is ``flax.linen.LayerNorm`` with
``reduction_axes = axis``. No statistics are kept and the
computation is the same in train and eval mode; ``state`` is an empty
``LayerNormState`` returned unchanged so that every normalization has the same
signature. Statistics are in at least float32 (shifted one-pass formula of
:mod:`bn_jax.core.moments`); bf16/f16 inputs return ``y`` in the input dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
from jax import lax

from bn_jax.core import validation
from bn_jax.core.common import affine, broadcast_mask
from bn_jax.core.moments import centered, moments


class LayerNormState(NamedTuple):
  """LayerNorm keeps no statistics; this empty state keeps the signature."""


def layer_norm_state() -> LayerNormState:
  """The (empty) state of a LayerNorm layer."""
  return LayerNormState()


def layer_norm(
    x: jax.Array,
    state: LayerNormState = LayerNormState(),
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    train: bool = True,
    axis=-1,
    feature_axes=None,
    epsilon: float = 1e-6,
    mask: Optional[jax.Array] = None,
    axis_name=None,
    axis_index_groups=None,
) -> tuple[jax.Array, LayerNormState]:
  """Layer-normalizes ``x`` over ``axis``; returns ``(y, state)``.

  Args:
    x: floating input, any rank >= 1.
    state: ``LayerNormState()`` (empty); returned unchanged.
    scale: optional gamma with the shape of the feature axes.
    bias: optional beta with the shape of the feature axes.
    train: unused (same computation in both modes); accepted so all
      normalizations are interchangeable.
    axis: the normalized (reduction) axis or tuple of axes: statistics are
      over these, separately for every index of the other axes (flax's
      ``reduction_axes``).
    feature_axes: the axes ``scale`` and ``bias`` run along (flax's
      ``feature_axes``); None means ``axis``.
    epsilon: added to the variance inside the square root, > 0.
    mask: boolean, broadcastable to ``x``; only True entries enter the
      statistics (every entry is normalized).
    axis_name: statistics also over this mapped axis (for features sharded
      across devices; count-weighted ``psum``).
    axis_index_groups: device groups for ``axis_name``.

  Returns:
    ``(y, state)`` with ``y`` of ``x``'s shape and dtype.
  """
  del train  # same computation in both modes
  validation.check_floating(x)
  axes = validation.normalize_axes(axis, x.ndim, "axis")
  feature = axes if feature_axes is None else validation.normalize_axes(
      feature_axes, x.ndim, "feature_axes")
  param_shape = tuple(x.shape[a] for a in feature)
  validation.check_feature_shape(scale, param_shape, "scale")
  validation.check_feature_shape(bias, param_shape, "bias")
  validation.check_epsilon(epsilon)
  m = moments(x, axes, mask=broadcast_mask(mask, x.shape),
              axis_name=axis_name, axis_index_groups=axis_index_groups)
  y = centered(x, m) * lax.rsqrt(m.var + epsilon)
  bshape = tuple(x.shape[i] if i in feature else 1 for i in range(x.ndim))
  return affine(y, scale, bias, bshape).astype(x.dtype), state
