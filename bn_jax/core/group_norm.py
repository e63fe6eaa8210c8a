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
from bn_jax.core.batch_norm import affine
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
    epsilon: float = 1e-6,
) -> tuple[jax.Array, GroupNormState]:
  """Group-normalizes ``x``; returns ``(y, state)``.

  Args:
    x: floating input with a batch axis 0 and at least one more axis, e.g.
      ``[N, C]`` or NHWC ``[N, H, W, C]``.
    state: ``GroupNormState()`` (empty); returned unchanged.
    scale: optional per-channel gamma, shape ``(C,)``.
    bias: optional per-channel beta, shape ``(C,)``.
    train: unused (GroupNorm computes the same in both modes); accepted so
      all normalizations are interchangeable.
    num_groups: number of channel groups ``G`` (default 32, the paper's);
      pass ``None`` when giving ``group_size``.
    group_size: channels per group (``C / G``); exclusive with ``num_groups``.
    axis: the channel axis (a single int, not 0: axis 0 is the batch axis).
    epsilon: added to the group variance inside the square root, > 0.

  Returns:
    ``(y, state)`` with ``y`` of ``x``'s shape and dtype.
  """
  del train  # same computation in both modes
  validation.check_floating(x)
  if x.ndim < 2:
    raise ValueError("group_norm needs a batch axis 0 and a channel axis, got "
                     f"x of shape {x.shape}.")
  if not isinstance(axis, numbers.Integral):
    raise TypeError(f"axis must be a single int (the channel axis), got "
                    f"{axis!r}.")
  (ch_axis,) = validation.normalize_axes(axis, x.ndim, "axis")
  if ch_axis == 0:
    raise ValueError("axis must not be 0: axis 0 is the batch axis of "
                     "group_norm (statistics are per sample).")
  channels = x.shape[ch_axis]
  groups = resolve_num_groups(channels, num_groups, group_size)
  validation.check_feature_shape(scale, (channels,), "scale")
  validation.check_feature_shape(bias, (channels,), "bias")
  validation.check_epsilon(epsilon)

  # Split the channel axis into (groups, channels per group); the group axis
  # then takes the channel axis' position and everything else except the
  # batch axis and the group axis is reduced.
  grouped_shape = (x.shape[:ch_axis] + (groups, channels // groups) +
                   x.shape[ch_axis + 1:])
  xg = x.reshape(grouped_shape)
  reduction_axes = tuple(i for i in range(1, xg.ndim) if i != ch_axis)
  m = moments(xg, reduction_axes)
  y = (centered(xg, m) * lax.rsqrt(m.var + epsilon)).reshape(x.shape)
  bshape = tuple(channels if i == ch_axis else 1 for i in range(x.ndim))
  return affine(y, scale, bias, bshape).astype(x.dtype), state
