"""Flax linen modules over the functional core (thin wrappers, no math here).

Every module creates its parameters (``params/scale``, ``params/bias``) and
state (``batch_stats/...``), calls the matching :mod:`bn_jax.core` function and
writes the new state back. The math, the validation and the statistics all live
in the core functions.

Conventions shared by the batch-statistics modules (as ``flax.linen.BatchNorm``):

* ``use_running_average`` is an attribute and a ``__call__`` argument; exactly
  one of them must be set (``flax.linen.merge_param``).
* During ``init`` the running statistics are created but not updated, and
  cross-device reductions (``axis_name``) are skipped, so ``init`` works
  outside ``shard_map``/``pmap``.
* Output dtype: ``dtype`` if given, else the result type of the input and the
  parameters (so a bfloat16 input with float32 parameters gives float32, as in
  flax). Statistics are float32 at least; running statistics are float32.
* PreciseBN hook: in training mode, when the ``batch_moments`` collection is
  mutable, the module stores the current batch's per-feature ``mean``, biased
  ``var`` and sample ``count`` there (read by
  :func:`bn_jax.core.precise_batch_stats`). Nothing is computed otherwise.
  BatchNorm, BatchRenorm and NoisyBatchNorm have it; LpNorm does not (its
  running ``norm`` is not a variance), FrozenBatchNorm computes no batch
  statistics. Other modules (e.g. CBN) can call :func:`store_batch_moments`.

Modules: ``BatchNorm`` (drop-in for ``flax.linen.BatchNorm``), ``BatchRenorm``,
``NoisyBatchNorm``, ``LpNorm``, ``FrozenBatchNorm``, ``GroupNorm``,
``LayerNorm``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes as flax_dtypes

from bn_jax.core.batch_norm import (BatchNormState, batch_norm,
                                    batch_norm_state, batch_statistics,
                                    feature_layout)
from bn_jax.core.batch_renorm import batch_renorm, batch_renorm_state
from bn_jax.core.frozen_batch_norm import frozen_batch_norm
from bn_jax.core.group_norm import group_norm, group_norm_state
from bn_jax.core.layer_norm import layer_norm, layer_norm_state
from bn_jax.core.lp_norm import lp_norm, lp_norm_state
from bn_jax.core.moments import Moments
from bn_jax.core.noisy_batch_norm import noisy_batch_norm
from bn_jax.core.precise_batch_norm import pool_moments

Initializer = Callable[..., jax.Array]
Dtype = Any

BATCH_MOMENTS = "batch_moments"


def _feature_shape(x, axis):
  return feature_layout(x, axis)[2]


def _output_dtype(x, scale, bias, dtype):
  """flax's rule: ``dtype`` if given, else the result type of x and params."""
  return flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype)


def _compute_input(x, out_dtype):
  """The input the core function sees.

  The core returns ``y`` in its input's dtype and computes statistics in at
  least float32 either way, so upcasting ``x`` to the wider of its own dtype
  and the output dtype reproduces flax's arithmetic (float32 at least, then one
  cast to the output dtype) without touching the math.
  """
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, out_dtype))


def _call_core(module: nn.Module, x, core_fn, param_shape, state, **kwargs):
  """What every module shares: its parameters and the call of its core.

  Creates ``params/scale`` and ``params/bias`` of ``param_shape`` (as the
  module's ``use_scale``/``use_bias``/``*_init``/``param_dtype`` say), calls
  ``core_fn(x, state, scale, bias, **kwargs)`` on the input in the compute
  dtype and returns the core's outputs with ``y`` cast to the output dtype.
  """
  scale = module.param("scale", module.scale_init, param_shape,
                       module.param_dtype) if module.use_scale else None
  bias = module.param("bias", module.bias_init, param_shape,
                      module.param_dtype) if module.use_bias else None
  out_dtype = _output_dtype(x, scale, bias, module.dtype)
  y, *rest = core_fn(_compute_input(x, out_dtype), state, scale, bias,
                     **kwargs)
  return (y.astype(out_dtype), *rest)


def _state_variables(module: nn.Module, init_state) -> list:
  """``batch_stats/<field>`` for every field of ``init_state`` (its values)."""
  return [module.variable("batch_stats", name, lambda v=value: v)
          for name, value in zip(init_state._fields, init_state)]


def _train_batch_usable(x, axis, ghost_batch_size) -> bool:
  """Whether ``x`` has enough samples for train-mode statistics.

  Only consulted during ``init``: flax initializes with whatever dummy batch
  the user has at hand (often a single sample), where train-mode statistics
  are undefined. The init output then uses the initial running statistics;
  the variables are the same either way.
  """
  _, reduction_axes, _, _ = feature_layout(x, axis)
  count = 1
  for a in reduction_axes:
    count *= x.shape[a]
  if ghost_batch_size is not None:
    if x.shape[0] % ghost_batch_size:
      return False
    count = count // x.shape[0] * ghost_batch_size
  return count >= 2


def _wants_batch_moments(module: nn.Module) -> bool:
  """The PreciseBN hook is active: ``batch_moments`` mutable, not ``init``."""
  return not module.is_initializing() and module.is_mutable_collection(
      BATCH_MOMENTS)


def store_batch_moments(module: nn.Module, x, *, axis, mask=None,
                        axis_name=None, axis_index_groups=None,
                        ghost_batch_size=None,
                        moments: Optional[Moments] = None) -> None:
  """The PreciseBN hook: stores this batch's moments when asked to.

  Call it from a batch-statistics module in training mode. When the
  ``batch_moments`` collection is mutable (and the module is not being
  initialized), it stores ``mean`` and biased ``var`` (feature-shaped) and the
  sample ``count`` behind them (a scalar; feature-shaped when a ``mask`` is
  given, since a mask can leave different features with different counts).
  With ghost batches the groups' moments are pooled into the moments of the
  whole batch (law of total variance), so that the population statistics do
  not depend on how the batch was split for normalization.

  ``moments``: the batch statistics of ``x`` if the caller has them already
  (the ``return_moments=True`` output of the core functions, shaped as
  :func:`bn_jax.core.batch_statistics` returns them); otherwise they are
  computed here with ``batch_statistics`` and the other arguments.
  """
  if not _wants_batch_moments(module):
    return
  feature_shape = _feature_shape(x, axis)
  m = moments if moments is not None else batch_statistics(
      x, axis=axis, mask=mask, axis_name=axis_name,
      axis_index_groups=axis_index_groups, ghost_batch_size=ghost_batch_size)
  mean, var, count = m.mean, m.var, jnp.broadcast_to(m.count, m.mean.shape)
  if ghost_batch_size is not None:  # leading group axis: pool the groups
    mean, var, count = pool_moments(mean, var, count, axis=0)
  count = count.reshape(feature_shape) if mask is not None else (
      count.reshape(-1)[0])
  module.put_variable(BATCH_MOMENTS, "mean",
                      jax.lax.stop_gradient(mean.reshape(feature_shape)))
  module.put_variable(BATCH_MOMENTS, "var",
                      jax.lax.stop_gradient(var.reshape(feature_shape)))
  module.put_variable(BATCH_MOMENTS, "count", jax.lax.stop_gradient(count))


class _BatchStatsNorm(nn.Module):
  """Attributes and ``__call__`` shared by the batch-statistics modules.

  The attributes are those of ``flax.linen.BatchNorm``. A subclass adds its
  own attributes and sets (as class attributes, wrapped in ``staticmethod``)
  ``_core_fn``, its :mod:`bn_jax.core` function, and ``_state_init``, the
  constructor of that function's state, called with the feature shape and
  float32; every field of the state becomes ``batch_stats/<field>``.
  ``_core_kwargs(train)`` gives the further keyword arguments of ``_core_fn``
  (with a ``ghost_batch_size`` attribute, pass it there too: ``init`` and the
  PreciseBN hook read it). ``_stores_batch_moments = False`` turns the hook
  off (state that is not a mean/variance pair); otherwise ``_core_fn`` must
  accept ``return_moments``.
  """
  use_running_average: Optional[bool] = None
  axis: Any = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: Optional[str] = None
  axis_index_groups: Any = None

  _stores_batch_moments = True

  def _core_kwargs(self, train: bool) -> dict:
    """Keyword arguments of ``_core_fn`` beyond the shared ones."""
    del train
    return {}

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None):
    """Normalizes ``x``; updates ``batch_stats`` in training mode.

    Creates ``batch_stats/<field>`` for every field of the core state, and
    ``params/scale``, ``params/bias``; in training outside ``init`` it writes
    the new state back and runs the PreciseBN hook.

    Args:
      x: the input.
      use_running_average: normalize with the running statistics (eval)
        instead of the batch statistics (training).
      mask: boolean, broadcastable to ``x``; True entries enter the batch
        statistics (ignored with running averages, as in flax).
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    feature_shape = _feature_shape(x, self.axis)
    init_state = self._state_init(feature_shape, jnp.float32)
    state_vars = _state_variables(self, init_state)
    initializing = self.is_initializing()
    train = not use_running_average
    # Only BatchNorm and NoisyBatchNorm have ghost batches.
    ghost_batch_size = getattr(self, "ghost_batch_size", None)
    if initializing and train:
      train = _train_batch_usable(x, self.axis, ghost_batch_size)
    kwargs = self._core_kwargs(train)
    # The core returns the batch moments it normalized with, so the hook
    # does not compute them a second time.
    store_moments = (train and self._stores_batch_moments and
                     _wants_batch_moments(self))
    if store_moments:
      kwargs["return_moments"] = True
    state = type(init_state)(*(v.value for v in state_vars))
    y, new_state, *batch = _call_core(
        self, x, self._core_fn, feature_shape, state, train=train,
        axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
        # As flax: no cross-device reduction during init (the axis need not
        # exist).
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask, **kwargs)
    if train and not initializing:
      for var, value in zip(state_vars, new_state):
        var.value = value
    if store_moments:
      store_batch_moments(self, x, axis=self.axis, mask=mask,
                          ghost_batch_size=ghost_batch_size,
                          moments=batch[0])
    return y


class BatchNorm(_BatchStatsNorm):
  """Batch normalization; a drop-in replacement for ``flax.linen.BatchNorm``.

  Same attributes, variable names (``params/scale``, ``params/bias``,
  ``batch_stats/mean``, ``batch_stats/var``), shapes and call signature as
  flax, computed by :func:`bn_jax.core.batch_norm` (accurate shifted one-pass
  statistics, so ``use_fast_variance`` is accepted for compatibility and has
  no effect). Additionally:

  Attributes:
    unbiased_running_var: feed Bessel-corrected batch variances to the running
      variance (PyTorch convention; flax feeds the biased one).
    ghost_batch_size: normalize groups of this many samples along axis 0
      separately (ghost / virtual batch norm).

  Example::

    y, updates = model.apply(variables, x, use_running_average=False,
                             mutable=['batch_stats'])
  """
  use_fast_variance: bool = True  # accepted for flax compatibility; unused
  unbiased_running_var: bool = False
  ghost_batch_size: Optional[int] = None

  _core_fn = staticmethod(batch_norm)
  _state_init = staticmethod(batch_norm_state)

  def _core_kwargs(self, train: bool) -> dict:
    del train
    return dict(unbiased_running_var=self.unbiased_running_var,
                ghost_batch_size=self.ghost_batch_size)


class BatchRenorm(_BatchStatsNorm):
  """Batch Renormalization (Ioffe, 2017) over :func:`bn_jax.core.batch_renorm`.

  Attributes and call signature as :class:`BatchNorm` (flax's BatchNorm),
  plus the clip limits: constant ``r_max``/``d_max``, or (left ``None``) the
  schedule ``warmup_steps``, ``r_max_final``, ``r_max_steps``,
  ``d_max_final``, ``d_max_steps`` (defaults: the paper's 5k/3@40k/5@25k)
  driven by the training-step counter ``batch_stats/step`` (int32), which
  is updated with ``batch_stats/mean`` and ``batch_stats/var``. The
  PreciseBN hook stores the plain batch moments of the input (``mu_B``,
  ``sigma_B^2``), whose population values are what BRN's running statistics
  estimate.
  """
  r_max: Optional[float] = None
  d_max: Optional[float] = None
  warmup_steps: int = 5000
  r_max_final: float = 3.0
  r_max_steps: int = 40000
  d_max_final: float = 5.0
  d_max_steps: int = 25000
  unbiased_running_var: bool = False

  _core_fn = staticmethod(batch_renorm)
  _state_init = staticmethod(batch_renorm_state)

  def _core_kwargs(self, train: bool) -> dict:
    del train
    return dict(r_max=self.r_max, d_max=self.d_max,
                warmup_steps=self.warmup_steps, r_max_final=self.r_max_final,
                r_max_steps=self.r_max_steps, d_max_final=self.d_max_final,
                d_max_steps=self.d_max_steps,
                unbiased_running_var=self.unbiased_running_var)


class NoisyBatchNorm(_BatchStatsNorm):
  """Batch norm + step-varying noise (Santurkar et al., 2018, section 2.1).

  Wraps :func:`bn_jax.core.noisy_batch_norm`. Attributes and call signature
  as :class:`BatchNorm`, plus ``noise_mean_range`` and ``noise_std_range``.
  In training the noise key comes from the ``'noise'`` rng stream
  (``apply(..., rngs={'noise': key})``, a new key every step); in eval there
  is no noise and no rng is needed. The PreciseBN hook stores the moments of
  the input (the noise is added after normalization and does not enter the
  statistics).
  """
  noise_mean_range: tuple[float, float] = (-1.0, 1.0)
  noise_std_range: tuple[float, float] = (0.5, 1.5)
  unbiased_running_var: bool = False
  ghost_batch_size: Optional[int] = None

  _core_fn = staticmethod(noisy_batch_norm)
  _state_init = staticmethod(batch_norm_state)

  def _core_kwargs(self, train: bool) -> dict:
    kwargs = dict(noise_mean_range=tuple(self.noise_mean_range),
                  noise_std_range=tuple(self.noise_std_range),
                  unbiased_running_var=self.unbiased_running_var,
                  ghost_batch_size=self.ghost_batch_size)
    if train:
      if not self.has_rng("noise"):
        raise ValueError(
            f"NoisyBatchNorm ({'/'.join(self.scope.path) or 'top level'}) "
            "needs the 'noise' rng stream in training: pass rngs={'noise': "
            "key} to apply (a new key every step), or "
            "use_running_average=True.")
      kwargs["key"] = self.make_rng("noise")
    return kwargs


class LpNorm(_BatchStatsNorm):
  """l_p batch normalization (Santurkar et al., 2018) over
  :func:`bn_jax.core.lp_norm`.

  Attributes and call signature as :class:`BatchNorm` (no ghost batches),
  plus ``p`` (1, 2 or inf). The running statistics are
  ``batch_stats/mean`` and ``batch_stats/norm`` (an EMA of the batch's
  average l_p norm, not a variance). Because of that, LpNorm has no PreciseBN
  hook: the population-moment formula of
  :func:`bn_jax.core.precise_batch_stats` yields a variance, which is not
  what ``norm`` holds (an average of per-batch l_p norms), so LpNorm layers
  keep their EMA statistics under ``precise_batch_stats``.
  """
  p: Any = 2

  _core_fn = staticmethod(lp_norm)
  _state_init = staticmethod(lp_norm_state)
  _stores_batch_moments = False

  def _core_kwargs(self, train: bool) -> dict:
    del train
    return dict(p=self.p)


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics, over
  :func:`bn_jax.core.frozen_batch_norm`.

  ``y = scale * (x - mean) / sqrt(var + epsilon) + bias`` in training and in
  eval, with ``batch_stats/mean`` and ``batch_stats/var`` (same names and
  initial values as :class:`BatchNorm`, so a trained BatchNorm's variables
  load directly) never updated. Freezing ``scale``/``bias`` too is the
  optimizer's business. ``use_running_average`` is accepted (as attribute
  and call argument) so that it can replace a BatchNorm in code that passes
  it, and has no effect.
  """
  use_running_average: Optional[bool] = None  # no effect; interchangeability
  axis: Any = -1
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None):
    """Normalizes ``x`` with the stored statistics (both modes)."""
    del use_running_average  # same computation in both modes
    feature_shape = _feature_shape(x, self.axis)
    state_vars = _state_variables(
        self, batch_norm_state(feature_shape, jnp.float32))
    y, _ = _call_core(self, x, frozen_batch_norm, feature_shape,
                      BatchNormState(*(v.value for v in state_vars)),
                      axis=self.axis, epsilon=self.epsilon)
    return y


class GroupNorm(nn.Module):
  """Group Normalization (Wu & He, 2018) over :func:`bn_jax.core.group_norm`.

  Per-sample statistics over groups of channels; same parameters
  (``params/scale``, ``params/bias`` of shape ``(C,)``) and results as
  ``flax.linen.GroupNorm`` with its default (last-axis) channel layout. No
  ``batch_stats``.

  Attributes:
    num_groups: number of channel groups (32 by default; ``None`` when
      ``group_size`` is given).
    group_size: channels per group, exclusive with ``num_groups``.
    epsilon: added to the variance inside the square root.
    dtype: output dtype (default: result type of input and params, as flax).
    param_dtype: dtype of scale and bias.
    use_bias, use_scale, bias_init, scale_init: the affine parameters.
    axis: the channel axis (axis 0 is the batch axis).
  """
  num_groups: Optional[int] = 32
  group_size: Optional[int] = None
  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis: int = -1

  @nn.compact
  def __call__(self, x):
    # train is unused by the stateless norms; passed for the common signature.
    y, _ = _call_core(self, x, group_norm, (x.shape[self.axis],),
                      group_norm_state(), train=True,
                      num_groups=self.num_groups, group_size=self.group_size,
                      axis=self.axis, epsilon=self.epsilon)
    return y


class LayerNorm(nn.Module):
  """Layer Normalization (Ba et al., 2016) over :func:`bn_jax.core.layer_norm`.

  Per-sample statistics over ``axis`` (default: the last axis);
  ``flax.linen.LayerNorm`` with ``reduction_axes = feature_axes = axis``.
  Parameters ``params/scale``, ``params/bias`` have the shape of the
  normalized axes. No ``batch_stats``.
  """
  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis: Any = -1

  @nn.compact
  def __call__(self, x):
    y, _ = _call_core(self, x, layer_norm, _feature_shape(x, self.axis),
                      layer_norm_state(), train=True, axis=self.axis,
                      epsilon=self.epsilon)
    return y
