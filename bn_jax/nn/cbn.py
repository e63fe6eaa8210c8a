"""Flax modules for Cross-Iteration BN: a Conv/Dense and its CBN in one module.

CBN compensates past statistics with the weights of the layer that produced
the normalized features, so the norm needs that layer's kernel: ``ConvCBN``
and ``DenseCBN`` own it (``params/kernel``, created exactly as
``flax.linen.Conv``/``Dense`` create theirs, and applied by them) together
with the norm's ``params/scale`` and ``params/bias``. Everything kept between
steps — the running ``mean``/``var`` and the window — lives in ``batch_stats``
(one variable per field of :class:`bn_jax.core.CBNState`). They replace
``Conv(use_bias=False)`` + ``BatchNorm`` in any model.

The math is :func:`bn_jax.core.cross_iteration_batch_norm`; this file only
plumbs parameters and state.

Example::

  layer = ConvCBN(16, (3, 3), window=4, burn_in=500)
  variables = layer.init(key, x, use_running_average=False)
  y, updates = layer.apply(variables, x, use_running_average=False,
                           mutable=['batch_stats'])
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes as flax_dtypes

from bn_jax.core.cross_iteration_batch_norm import (
    DEFAULT_MOMENTUM, CBNState, cbn_state,
    cross_iteration_batch_norm_with_moments)
from bn_jax.nn.precise_bn import BATCH_MOMENTS

Initializer = Callable[..., jax.Array]
Dtype = Any
DEFAULT_WINDOW = 4  # the released COCO config (buffer_num = 3); ImageNet: 8


def _cbn_call(module: nn.Module, x, use_running_average, *, layer,
              kernel_shape):
  """Shared body: parameters, state plumbing, the core call, PreciseBN hook.

  ``layer`` is an unbound ``flax.linen.Conv``/``Dense`` without bias; it is
  applied as the pure function ``layer_fn(x, w)`` so the kernel is used
  exactly as flax uses it (padding, dilation, groups, dtype promotion).
  """
  use_running_average = nn.merge_param(
      "use_running_average", module.use_running_average, use_running_average)
  kernel = module.param("kernel", module.kernel_init, kernel_shape,
                        module.param_dtype)
  features = module.features
  scale = module.param("scale", module.scale_init, (features,),
                       module.param_dtype) if module.use_scale else None
  bias = module.param("bias", module.bias_init, (features,),
                      module.param_dtype) if module.use_bias else None
  init_state = cbn_state(kernel, features, module.window, jnp.float32)
  state_vars = [module.variable("batch_stats", name, lambda v=value: v)
                for name, value in zip(init_state._fields, init_state)]

  def layer_fn(inputs, w):
    return layer.apply({"params": {"kernel": w}}, inputs)

  initializing = module.is_initializing()
  train = not use_running_average
  # As flax.linen.BatchNorm: no state update and no cross-device reduction
  # during init (init often sees one dummy sample, outside shard_map).
  if initializing:
    train = False
  y, new_state, batch = cross_iteration_batch_norm_with_moments(
      layer_fn, kernel, x, CBNState(*(v.value for v in state_vars)), scale,
      bias, train=train, burn_in=module.burn_in,
      rho=module.rho, momentum=module.momentum, epsilon=module.epsilon,
      aggregation=module.aggregation,
      compensated_running_stats=module.compensated_running_stats,
      unbiased_running_var=module.unbiased_running_var,
      compensation_grad=module.compensation_grad,
      epsilon_on_std=module.epsilon_on_std,
      unbiased_burn_in_var=module.unbiased_burn_in_var,
      window_schedule=module.window_schedule,
      axis_name=module.axis_name, axis_index_groups=module.axis_index_groups)
  if train:
    for var, value in zip(state_vars, new_state):
      var.value = value
    if module.is_mutable_collection(BATCH_MOMENTS):  # PreciseBN hook
      module.put_variable(BATCH_MOMENTS, "mean",
                          jax.lax.stop_gradient(batch.mean.reshape(-1)))
      module.put_variable(BATCH_MOMENTS, "var",
                          jax.lax.stop_gradient(batch.var.reshape(-1)))
      module.put_variable(BATCH_MOMENTS, "count",
                          jax.lax.stop_gradient(batch.count.reshape(-1)[0]))
  out_dtype = flax_dtypes.canonicalize_dtype(y, scale, bias,
                                             dtype=module.dtype)
  return y.astype(out_dtype)


class _CrossIterationNorm(nn.Module, kw_only=True):
  """The CBN attributes :class:`ConvCBN` and :class:`DenseCBN` share
  (keyword-only, so the layers' own ``features``/``kernel_size`` stay
  positional as in ``flax.linen.Conv``/``Dense``)."""
  use_running_average: Optional[bool] = None
  window: int = DEFAULT_WINDOW
  burn_in: int = 0
  rho: float = 1.0
  momentum: float = DEFAULT_MOMENTUM
  epsilon: float = 1e-5
  aggregation: str = "max"
  compensated_running_stats: bool = False
  unbiased_running_var: bool = False
  compensation_grad: bool = True
  epsilon_on_std: bool = False
  unbiased_burn_in_var: bool = False
  window_schedule: str = "prefill"
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  axis_name: Optional[str] = None
  axis_index_groups: Any = None


class ConvCBN(_CrossIterationNorm):
  """``Conv(use_bias=False)`` followed by Cross-Iteration Batch Norm.

  Attributes:
    features: output channels.
    kernel_size: as ``flax.linen.Conv``.
    strides, padding, kernel_dilation, feature_group_count: as
      ``flax.linen.Conv``.
    use_running_average: eval mode (running statistics); also a call arg.
    window: ``k >= 1``, the current batch plus ``k - 1`` past ones
      (``k = 1`` is BatchNorm).
    burn_in: plain BN for this many training steps first.
    rho: weight of the first-order compensation (0: naive CBN).
    momentum: weight of the OLD running value (flax convention). Default
      0.9, the official code's (PyTorch 0.1), not flax's 0.99: with the
      official gradient CBN reaches the weights only through the current
      batch's statistics (weight 1/k), so the per-channel push that BN's
      backward cancels is cancelled only to 1/k and the raw
      pre-normalization means drift several times faster than under BN; a
      0.99 EMA (~100-step memory) cannot follow them (see the core module's
      docstring).
    epsilon: inside the square root (or added to the std, below).
    aggregation: ``'max'`` (paper) or ``'count'`` (official code).
    compensated_running_stats: running statistics from the window's
      compensated statistics instead of the current batch's.
    unbiased_running_var: Bessel-corrected running variance (PyTorch).
    compensation_grad: gradient through the compensated past statistics
      (default; new; False: the official code's gradient, current batch
      only; see :func:`bn_jax.core.cross_iteration_batch_norm`).
    epsilon_on_std, unbiased_burn_in_var, window_schedule: the official
      code's semantics (``sqrt(var) + eps``; unbiased variance while the
      window is inactive; ``'empty'``/``'linear'`` window after burn-in);
      the table in the core module's docstring compares them.
    use_bias, use_scale, bias_init, scale_init: the norm's beta/gamma.
    dtype: computation/output dtype (statistics stay float32).
    param_dtype: dtype of kernel, scale and bias.
    kernel_init: kernel initializer (flax Conv's default).
    axis_name, axis_index_groups: SyncBN of the current batch's statistics.
  """
  features: int
  kernel_size: Union[int, Sequence[int]]
  strides: Union[None, int, Sequence[int]] = 1
  padding: Any = "SAME"
  kernel_dilation: Union[None, int, Sequence[int]] = 1
  feature_group_count: int = 1

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None):
    """Convolves, then cross-iteration batch-normalizes ``x`` (NHWC)."""
    kernel_size = (tuple(self.kernel_size) if not isinstance(
        self.kernel_size, int) else (self.kernel_size,))
    groups = self.feature_group_count
    if x.shape[-1] % groups:
      raise ValueError(
          f"feature_group_count={groups} must divide the input features "
          f"({x.shape[-1]}).")
    layer = nn.Conv(
        self.features, kernel_size, strides=self.strides,
        padding=self.padding, kernel_dilation=self.kernel_dilation,
        feature_group_count=groups, use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, parent=None)
    kernel_shape = kernel_size + (x.shape[-1] // groups, self.features)
    return _cbn_call(self, x, use_running_average, layer=layer,
                     kernel_shape=kernel_shape)


class DenseCBN(_CrossIterationNorm):
  """``Dense(use_bias=False)`` followed by Cross-Iteration Batch Norm.

  Attributes as :class:`ConvCBN`, without the convolution geometry; the
  kernel is ``(in_features, features)`` (flax Dense).
  """
  features: int

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None):
    """Applies the Dense map to the last axis, then CBN over all other axes."""
    layer = nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                     param_dtype=self.param_dtype, parent=None)
    return _cbn_call(self, x, use_running_average, layer=layer,
                     kernel_shape=(x.shape[-1], self.features))
