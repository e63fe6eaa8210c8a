"""NNX layers for Cross-Iteration BN: a Conv/Linear and its CBN in one module.

CBN compensates past statistics with the weights of the layer that produced
the normalized features, so the norm needs that layer's kernel:
:class:`ConvCBN` and :class:`LinearCBN` own it (``kernel``, an ``nnx.Param``
created as ``nnx.Conv``/``nnx.Linear`` create theirs) together with the
norm's ``scale`` and ``bias``. Everything kept between steps -- the running
``mean``/``var``, the step and the window -- is one ``nnx.BatchStat`` per
field of :class:`bn_jax.core.CBNState`, so ``nnx.state(model,
nnx.BatchStat)`` is the whole running state and checkpoints hold it.

The math is :func:`bn_jax.core.cross_iteration_batch_norm`; the CBN options
(``burn_in``, ``rho``, ``momentum``, ``epsilon``, ``aggregation``, ...) are
passed through to it unchanged as keyword arguments, with its defaults. The
convolution / matrix product is flax's own (``flax.linen.Conv``/``Dense``
applied as a pure function of the kernel), as in :mod:`bn_jax.nn.cbn`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen
from flax import nnx
from flax.nnx.module import first_from

from bn_jax.core.cross_iteration_batch_norm import (
    CBNState, cbn_state, cross_iteration_batch_norm_with_moments)
from bn_jax.nn.normalization import batch_moments_record, output_dtype
from bn_jax.nnx.normalization import _NO_MODE_MESSAGE, record_batch_moments

Initializer = Callable[..., jax.Array]
Dtype = Any
DEFAULT_WINDOW = 4  # as bn_jax.nn.ConvCBN: the released COCO config


class _CrossIterationNorm(nnx.Module):
  """State, parameters and the core call shared by the CBN layers."""

  def _setup(self, kernel_shape, out_features, *, window,
             use_running_average, use_bias, use_scale, bias_init,
             scale_init, kernel_init, dtype, param_dtype, axis_name,
             axis_index_groups, rngs, cbn_options):
    self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape,
                                        param_dtype))
    features = (out_features,)
    self.scale = nnx.Param(scale_init(rngs.params(), features, param_dtype)
                           ) if use_scale else nnx.data(None)
    self.bias = nnx.Param(bias_init(rngs.params(), features, param_dtype)
                          ) if use_bias else nnx.data(None)
    state = cbn_state(self.kernel[...], out_features, window, jnp.float32)
    for name, value in zip(state._fields, state):
      setattr(self, name, nnx.BatchStat(value))
    self.out_features = out_features
    self.window = window
    self.use_running_average = use_running_average
    self.use_bias, self.use_scale = use_bias, use_scale
    self.dtype, self.param_dtype = dtype, param_dtype
    self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
    self.cbn_options = dict(cbn_options)

  def _layer(self):
    """The unbound flax.linen layer applied as ``layer_fn(x, kernel)``."""
    raise NotImplementedError

  def __call__(self, x, use_running_average: Optional[bool] = None):
    """Applies the layer, then CBN; in training updates the state."""
    use_running_average = first_from(
        use_running_average, self.use_running_average,
        error_msg=_NO_MODE_MESSAGE.format(name=type(self).__name__))
    train = not use_running_average
    layer = self._layer()

    def layer_fn(inputs, w):
      return layer.apply({"params": {"kernel": w}}, inputs)

    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    state = CBNState(*(getattr(self, f)[...] for f in CBNState._fields))
    y, new_state, batch = cross_iteration_batch_norm_with_moments(
        layer_fn, self.kernel[...], x, state, scale, bias, train=train,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        **self.cbn_options)
    if train:
      for name, value in zip(CBNState._fields, new_state):
        getattr(self, name)[...] = jax.lax.stop_gradient(value)
      record_batch_moments(self, batch_moments_record(
          batch, (self.out_features,)))
    return y.astype(output_dtype(y, scale, bias, self.dtype))

  def set_view(self, use_running_average: Optional[bool] = None):
    """Class method used by ``nnx.view``.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class ConvCBN(_CrossIterationNorm):
  """``nnx.Conv(use_bias=False)`` followed by Cross-Iteration Batch Norm.

  Args:
    in_features, out_features, kernel_size, strides, padding,
      kernel_dilation, feature_group_count, kernel_init: as ``nnx.Conv``.
    window: ``k >= 1``, the current batch plus ``k - 1`` past ones (``k = 1``
      is BatchNorm); it fixes the shapes of the window state.
    use_running_average: eval mode (running statistics); also a call
      argument, set by ``model.train()`` / ``model.eval()`` / ``nnx.view``.
    use_bias, use_scale, bias_init, scale_init: the norm's beta/gamma.
    dtype: output dtype; param_dtype: dtype of kernel, scale and bias.
    axis_name, axis_index_groups: SyncBN of the current batch's statistics.
    rngs: ``nnx.Rngs`` for the parameters.
    **cbn_options: further keyword arguments of
      :func:`bn_jax.core.cross_iteration_batch_norm` (``burn_in``, ``rho``,
      ``momentum``, ``epsilon``, ``aggregation``, ...), with its defaults.
  """

  def __init__(
      self, in_features: int, out_features: int,
      kernel_size: Union[int, Sequence[int]],
      strides: Union[None, int, Sequence[int]] = 1, *,
      padding: Any = "SAME",
      kernel_dilation: Union[None, int, Sequence[int]] = 1,
      feature_group_count: int = 1, window: int = DEFAULT_WINDOW,
      use_running_average: Optional[bool] = False, use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      kernel_init: Initializer = nnx.initializers.lecun_normal(),
      dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
      axis_name: Optional[str] = None, axis_index_groups: Any = None,
      rngs: nnx.Rngs, **cbn_options):
    self.kernel_size = ((kernel_size,) if isinstance(kernel_size, int) else
                        tuple(kernel_size))
    if in_features % feature_group_count:
      raise ValueError(f"feature_group_count={feature_group_count} must "
                       f"divide in_features={in_features}.")
    self.in_features = in_features
    self.strides, self.padding = strides, padding
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    kernel_shape = self.kernel_size + (in_features // feature_group_count,
                                       out_features)
    self._setup(kernel_shape, out_features, window=window,
                use_running_average=use_running_average, use_bias=use_bias,
                use_scale=use_scale, bias_init=bias_init,
                scale_init=scale_init, kernel_init=kernel_init, dtype=dtype,
                param_dtype=param_dtype, axis_name=axis_name,
                axis_index_groups=axis_index_groups, rngs=rngs,
                cbn_options=cbn_options)

  def _layer(self):
    return linen.Conv(
        self.out_features, self.kernel_size, strides=self.strides,
        padding=self.padding, kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, use_bias=False,
        dtype=self.dtype, param_dtype=self.param_dtype, parent=None)


class LinearCBN(_CrossIterationNorm):
  """``nnx.Linear(use_bias=False)`` followed by Cross-Iteration Batch Norm.

  Arguments as :class:`ConvCBN` without the convolution geometry; the
  kernel is ``(in_features, out_features)`` (``nnx.Linear``'s).
  """

  def __init__(
      self, in_features: int, out_features: int, *,
      window: int = DEFAULT_WINDOW,
      use_running_average: Optional[bool] = False, use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      kernel_init: Initializer = nnx.initializers.lecun_normal(),
      dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
      axis_name: Optional[str] = None, axis_index_groups: Any = None,
      rngs: nnx.Rngs, **cbn_options):
    self.in_features = in_features
    self._setup((in_features, out_features), out_features, window=window,
                use_running_average=use_running_average, use_bias=use_bias,
                use_scale=use_scale, bias_init=bias_init,
                scale_init=scale_init, kernel_init=kernel_init, dtype=dtype,
                param_dtype=param_dtype, axis_name=axis_name,
                axis_index_groups=axis_index_groups, rngs=rngs,
                cbn_options=cbn_options)

  def _layer(self):
    return linen.Dense(self.out_features, use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype, parent=None)
