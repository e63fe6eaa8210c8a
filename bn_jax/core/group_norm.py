r"""Group Normalization (Wu & He, 2018) as a pure function.

The channels (the feature axis ``axis``, size ``C``) are split into ``G``
contiguous groups of ``C / G`` channels. For every sample ``n`` (axis 0 is the
batch axis) and every group ``g``, the statistics are taken over all the
group's channels and all other non-batch axes (for NHWC images: H, W and the
group's channels):

.. math::

   \mu_{n,g} = \operatorname{mean}_{i \in S_{n,g}} x_i,\qquad
   \sigma^2_{n,g} = \operatorname{mean}_{i \in S_{n,g}} (x_i - \mu_{n,g})^2,

   y_i = \gamma_c \, \frac{x_i - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}}
         + \beta_c

with ``c`` the channel of ``x_i`` and ``g`` its group; ``gamma``/``beta`` are
per channel (shape ``(C,)``). ``G = 1`` is LayerNorm over all non-batch axes,
``C / G = 1`` is InstanceNorm. The statistics do not depend on the other
samples, so the result is independent of the batch size and train and eval
mode compute the same thing. There is no running state: ``state`` is an empty
``GroupNormState`` (accepted and returned unchanged so that every
normalization has the same signature).

This matches ``flax.linen.GroupNorm`` (whose feature axis is the last one)
with the same ``num_groups``/``group_size``/``epsilon``. Statistics are
computed in at least float32 with the shifted one-pass formula of
:mod:`bn_jax.core.moments`; bf16/f16 inputs return ``y`` in the input dtype.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import jax
from jax import lax

from bn_jax.core import validation
from bn_jax.core.common import affine, broadcast_mask
from bn_jax.core.moments import centered, moments


class GroupNormState(NamedTuple):
  """GroupNorm keeps no statistics; this empty state keeps the signature."""


def group_norm_state() -> GroupNormState:
  """The (empty) state of a GroupNorm layer."""
  return GroupNormState()


def resolve_num_groups(channels: int, num_groups: Optional[int],
                       group_size: Optional[int]) -> int:
  """Number of groups from exactly one of ``num_groups`` / ``group_size``.

  Raises ValueError naming the argument when both or neither are given, or
  when the groups do not divide ``channels``.
  """
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        "exactly one of num_groups and group_size must be given (pass "
        f"num_groups=None to use group_size), got num_groups={num_groups!r}, "
        f"group_size={group_size!r}.")
  name, value = (("group_size", group_size) if group_size is not None else
                 ("num_groups", num_groups))
  value = validation.check_positive_int(value, name)
  validation.check_divides(value, name, channels,
                           f"the number of channels ({channels})")
  # channels / group_size groups, or num_groups groups.
  return channels // value if name == "group_size" else value


def group_norm(
    x: jax.Array,
    state: GroupNormState = GroupNormState(),
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    train: bool = True,
    num_groups: Optional[int] = 32,
    group_size: Optional[int] = None,
    axis: int = -1,
    reduction_axes=None,
    epsilon: float = 1e-6,
    mask: Optional[jax.Array] = None,
    axis_name=None,
    axis_index_groups=None,
) -> tuple[jax.Array, GroupNormState]:
  """Group-normalizes ``x``; returns ``(y, state)``.

  Args:
    x: floating input, e.g. ``[N, C]`` or NHWC ``[N, H, W, C]``; a 1-D
      input is one unbatched sample (as in flax).
    state: ``GroupNormState()`` (empty); returned unchanged.
    scale: optional per-channel gamma, shape ``(C,)``.
    bias: optional per-channel beta, shape ``(C,)``.
    train: unused (GroupNorm computes the same in both modes); accepted so
      all normalizations are interchangeable.
    num_groups: number of channel groups ``G`` (default 32, the paper's);
      pass ``None`` when giving ``group_size``.
    group_size: channels per group (``C / G``); exclusive with ``num_groups``.
    axis: the channel axis (a single int).
    reduction_axes: the axes the statistics are over, which must include the
      channel axis (flax's ``reduction_axes``; only the group's channels of
      that axis enter each statistic). None: every axis but the batch axis 0
      (the channel axis, which must then not be 0, for a 1-D input).
    epsilon: added to the group variance inside the square root, > 0.
    mask: boolean, broadcastable to ``x``; only True entries enter the
      statistics (every entry is normalized).
    axis_name: statistics also over this mapped axis (for features sharded
      across devices; count-weighted ``psum``). Not for data parallelism:
      the statistics are per sample.
    axis_index_groups: device groups for ``axis_name``.

  Returns:
    ``(y, state)`` with ``y`` of ``x``'s shape and dtype.
  """
  del train  # same computation in both modes
  validation.check_floating(x)
  if x.ndim < 1:
    raise ValueError(f"group_norm needs a channel axis, got x of shape "
                     f"{x.shape}.")
  if not isinstance(axis, numbers.Integral):
    raise TypeError(f"axis must be a single int (the channel axis), got "
                    f"{axis!r}.")
  (ch_axis,) = validation.normalize_axes(axis, x.ndim, "axis")
  if reduction_axes is None:
    if ch_axis == 0 and x.ndim > 1:
      raise ValueError("axis must not be 0: axis 0 is the batch axis of "
                       "group_norm (statistics are per sample); pass "
                       "reduction_axes to choose the axes yourself.")
    reduced = tuple(range(1, x.ndim)) if x.ndim > 1 else (ch_axis,)
  else:
    reduced = validation.normalize_axes(reduction_axes, x.ndim,
                                        "reduction_axes")
    if ch_axis not in reduced:
      raise ValueError(
          f"reduction_axes={reduction_axes!r} must include the channel axis "
          f"(axis={axis!r}): each group's statistics are over its channels.")
  channels = x.shape[ch_axis]
  groups = resolve_num_groups(channels, num_groups, group_size)
  validation.check_feature_shape(scale, (channels,), "scale")
  validation.check_feature_shape(bias, (channels,), "bias")
  validation.check_epsilon(epsilon)

  # Split the channel axis into (groups, channels per group); the group axis
  # takes the channel axis' position, the channels-in-group axis follows.
  grouped_shape = (x.shape[:ch_axis] + (groups, channels // groups) +
                   x.shape[ch_axis + 1:])
  xg = x.reshape(grouped_shape)
  mask = broadcast_mask(mask, x.shape)
  if mask is not None:
    mask = mask.reshape(grouped_shape)
  # Reduced: the reduced non-channel axes (shifted past the split) and the
  # channels-in-group axis; the group axis is kept.
  grouped_axes = tuple(a if a < ch_axis else a + 1 for a in reduced
                       if a != ch_axis) + (ch_axis + 1,)
  m = moments(xg, tuple(sorted(grouped_axes)), mask=mask,
              axis_name=axis_name, axis_index_groups=axis_index_groups)
  y = (centered(xg, m) * lax.rsqrt(m.var + epsilon)).reshape(x.shape)
  bshape = tuple(channels if i == ch_axis else 1 for i in range(x.ndim))
  return affine(y, scale, bias, bshape).astype(x.dtype), state
