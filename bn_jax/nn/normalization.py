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
  :func:`bn_jax.nn.precise_batch_stats`). Nothing is computed otherwise.
  BatchNorm, BatchRenorm and NoisyBatchNorm have it; LpNorm does not (its
  running ``norm`` is not a variance), FrozenBatchNorm computes no batch
  statistics. Other modules (e.g. CBN) can call :func:`store_batch_moments`.
* Train-mode statistics of one value per feature raise a ValueError (as in
  PyTorch; flax returns zeros), except during ``init``.

The module-level functions below (``call_core``, ``batch_moments_record``,
the ``*_options`` readers) hold what does not depend on Linen; the NNX
modules of :mod:`bn_jax.nnx` call the same ones, so both front-ends compute
bit for bit the same thing.

Modules: ``BatchNorm`` (drop-in for ``flax.linen.BatchNorm``), ``BatchRenorm``,
``NoisyBatchNorm``, ``LpNorm``, ``FrozenBatchNorm``, ``GroupNorm`` and
``LayerNorm`` (drop-ins for flax's, every constructor argument included).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes as flax_dtypes

from bn_jax.core.batch_norm import (BatchNormState, batch_norm_state,
                                    batch_norm_with_moments, batch_statistics)
from bn_jax.core.batch_renorm import (batch_renorm_state,
                                      batch_renorm_with_moments)
from bn_jax.core.common import feature_layout
from bn_jax.core.frozen_batch_norm import frozen_batch_norm
from bn_jax.core.group_norm import group_norm, group_norm_state
from bn_jax.core.layer_norm import layer_norm, layer_norm_state
from bn_jax.core.lp_norm import lp_norm, lp_norm_state
from bn_jax.core.moments import Moments
from bn_jax.core.noisy_batch_norm import noisy_batch_norm_with_moments
from bn_jax.core.precise_batch_norm import pool_moments
from bn_jax.nn.precise_bn import BATCH_MOMENTS, BATCH_STATS

Initializer = Callable[..., jax.Array]
Dtype = Any


# --- What the Linen and NNX front-ends share (no Linen in here). ---


def output_dtype(x, scale, bias, dtype):
  """flax's rule: ``dtype`` if given, else the result type of x and params."""
  return flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype)


def call_core(core_fn, x, state, scale, bias, dtype, **kwargs):
  """Calls ``core_fn(x, state, scale, bias, **kwargs)`` as flax computes.

  The core returns ``y`` in its input's dtype and computes statistics in at
  least float32 either way, so upcasting ``x`` to the wider of its own dtype
  and the output dtype (``output_dtype``) reproduces flax's arithmetic
  (float32 at least, then one cast to the output dtype) without touching the
  math. Returns the core's outputs with ``y`` cast to the output dtype.
  """
  out_dtype = output_dtype(x, scale, bias, dtype)
  x = jnp.asarray(x)
  y, *rest = core_fn(x.astype(jnp.promote_types(x.dtype, out_dtype)), state,
                     scale, bias, **kwargs)
  return (y.astype(out_dtype), *rest)


def lp_norm_with_moments(*args, **kwargs):
  """:func:`bn_jax.core.lp_norm` in the ``*_with_moments`` shape (no moments:
  its running ``norm`` is not a variance, so it has no PreciseBN hook)."""
  y, new_state = lp_norm(*args, **kwargs)
  return y, new_state, None


def train_batch_usable(x, axis, ghost_batch_size) -> bool:
  """Whether ``x`` has enough samples for train-mode statistics.

  Only consulted during Linen's ``init``: flax initializes with whatever
  dummy batch the user has at hand (often a single sample), where train-mode
  statistics are undefined. The init output then uses the initial running
  statistics; the variables are the same either way.
  """
  reduction_axes = feature_layout(x, axis).reduction_axes
  count = 1
  for a in reduction_axes:
    count *= x.shape[a]
  if ghost_batch_size is not None:
    if x.shape[0] % ghost_batch_size:
      return False
    count = count // x.shape[0] * ghost_batch_size
  return count >= 2


def batch_moments_record(moments: Moments, feature_shape, *,
                         masked: bool = False,
                         ghost_batch_size=None) -> dict:
  """The PreciseBN record of one batch: ``{'mean', 'var', 'count'}``.

  ``mean`` and biased ``var`` are feature-shaped, ``count`` (the samples
  behind them) a scalar, or feature-shaped when ``masked`` (a mask can leave
  features with different counts). ``moments`` are the batch statistics as
  :func:`bn_jax.core.batch_statistics` returns them; with ghost batches the
  groups' moments are pooled into those of the whole batch (law of total
  variance), so the population statistics do not depend on how the batch was
  split for normalization. Gradients are stopped.
  """
  mean, var = moments.mean, moments.var
  count = jnp.broadcast_to(moments.count, mean.shape)
  if ghost_batch_size is not None:  # leading group axis: pool the groups
    mean, var, count = pool_moments(mean, var, count, axis=0)
  count = count.reshape(feature_shape) if masked else count.reshape(-1)[0]
  return jax.lax.stop_gradient({"mean": mean.reshape(feature_shape),
                                "var": var.reshape(feature_shape),
                                "count": count})


def batch_norm_options(module) -> dict:
  """Core keyword arguments of BatchNorm beyond flax's (attribute readers
  shared by the Linen and NNX modules, which have the same attributes)."""
  return dict(unbiased_running_var=module.unbiased_running_var,
              ghost_batch_size=module.ghost_batch_size)


def batch_renorm_options(module) -> dict:
  """Core keyword arguments of BatchRenorm beyond flax's BatchNorm's."""
  return dict(r_max=module.r_max, d_max=module.d_max,
              warmup_steps=module.warmup_steps,
              r_max_final=module.r_max_final, r_max_steps=module.r_max_steps,
              d_max_final=module.d_max_final, d_max_steps=module.d_max_steps,
              unbiased_running_var=module.unbiased_running_var)


def noisy_batch_norm_options(module) -> dict:
  """Core keyword arguments of NoisyBatchNorm (the key excepted)."""
  return dict(noise_mean_range=tuple(module.noise_mean_range),
              noise_std_range=tuple(module.noise_std_range),
              noise_form=module.noise_form,
              unbiased_running_var=module.unbiased_running_var,
              ghost_batch_size=module.ghost_batch_size)


def lp_norm_options(module) -> dict:
  """Core keyword arguments of LpNorm beyond flax's BatchNorm's."""
  return dict(p=module.p)


# --- Linen plumbing. ---


def _affine_params(module: nn.Module, shape):
  """``params/scale`` and ``params/bias`` (or None) as the module says."""
  scale = module.param("scale", module.scale_init, shape,
                       module.param_dtype) if module.use_scale else None
  bias = module.param("bias", module.bias_init, shape,
                      module.param_dtype) if module.use_bias else None
  return scale, bias


def _state_variables(module: nn.Module, init_state) -> list:
  """``batch_stats/<field>`` for every field of ``init_state`` (its values)."""
  return [module.variable(BATCH_STATS, name, lambda v=value: v)
          for name, value in zip(init_state._fields, init_state)]


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
  initialized), it stores :func:`batch_moments_record` there as
  ``batch_moments/{mean,var,count}``.

  ``moments``: the batch statistics of ``x`` if the caller has them already
  (the third output of the core's ``*_with_moments`` functions, shaped as
  :func:`bn_jax.core.batch_statistics` returns them); otherwise they are
  computed here with ``batch_statistics`` and the other arguments.
  """
  if not _wants_batch_moments(module):
    return
  if moments is None:
    moments = batch_statistics(
        x, axis=axis, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_batch_size=ghost_batch_size)
  record = batch_moments_record(
      moments, feature_layout(x, axis).feature_shape,
      masked=mask is not None, ghost_batch_size=ghost_batch_size)
  for name, value in record.items():
    module.put_variable(BATCH_MOMENTS, name, value)


def _noise_key(module: nn.Module):
  """NoisyBatchNorm's key of this step, from the ``'noise'`` rng stream."""
  if not module.has_rng("noise"):
    raise ValueError(
        f"NoisyBatchNorm ({'/'.join(module.scope.path) or 'top level'}) "
        "needs the 'noise' rng stream in training: pass rngs={'noise': "
        "key} to apply (a new key every step), or use_running_average=True.")
  return module.make_rng("noise")


class _BatchStatsNorm(nn.Module):
  """Attributes and ``__call__`` shared by the batch-statistics modules.

  The attributes are those of ``flax.linen.BatchNorm``. A subclass adds its
  own attributes and sets (as class attributes, wrapped in ``staticmethod``
  so that Linen neither wraps them as module methods nor shows them in
  ``nn.tabulate``) ``_core_fn``, its :mod:`bn_jax.core` ``*_with_moments``
  function, ``_state_init``, the constructor of that function's state
  (called with the feature shape and float32; every field becomes
  ``batch_stats/<field>``) and ``_options(module)``, the further keyword
  arguments of ``_core_fn``. ``_stores_batch_moments = False`` turns the
  PreciseBN hook off (state that is not a mean/variance pair);
  ``_needs_noise_key`` passes ``key=`` from the ``'noise'`` rng stream in
  training.
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
  _needs_noise_key = False
  _options = staticmethod(lambda module: {})

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
    feature_shape = feature_layout(x, self.axis).feature_shape
    init_state = self._state_init(feature_shape, jnp.float32)
    state_vars = _state_variables(self, init_state)
    initializing = self.is_initializing()
    train = not use_running_average
    # Only BatchNorm and NoisyBatchNorm have ghost batches.
    ghost_batch_size = getattr(self, "ghost_batch_size", None)
    if initializing and train:
      train = train_batch_usable(x, self.axis, ghost_batch_size)
    kwargs = self._options(self)
    if train and self._needs_noise_key:
      kwargs["key"] = _noise_key(self)
    scale, bias = _affine_params(self, feature_shape)
    state = type(init_state)(*(v.value for v in state_vars))
    y, new_state, batch = call_core(
        self._core_fn, x, state, scale, bias, self.dtype, train=train,
        axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
        # As flax: no cross-device reduction during init (the axis need not
        # exist).
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask, **kwargs)
    if train and not initializing:
      for var, value in zip(state_vars, new_state):
        var.value = value
    # The core returned the moments it normalized with: the hook does not
    # compute them a second time.
    if train and self._stores_batch_moments:
      store_batch_moments(self, x, axis=self.axis, mask=mask,
                          ghost_batch_size=ghost_batch_size, moments=batch)
    return y


class BatchNorm(_BatchStatsNorm):
  """Batch normalization; a drop-in replacement for ``flax.linen.BatchNorm``.

  Same attributes, variable names (``params/scale``, ``params/bias``,
  ``batch_stats/mean``, ``batch_stats/var``), shapes and call signature as
  flax, computed by :func:`bn_jax.core.batch_norm` (accurate shifted one-pass
  statistics, so ``use_fast_variance`` is accepted for compatibility and has
  no effect). One difference on purpose: train-mode statistics of one value
  per feature raise a ValueError (flax normalizes them to 0). Complex inputs
  as in flax: complex mean, real variance ``E|x - mean|^2``, and the running
  mean turns complex. Additionally:

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

  _core_fn = staticmethod(batch_norm_with_moments)
  _state_init = staticmethod(batch_norm_state)
  _options = staticmethod(batch_norm_options)


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

  _core_fn = staticmethod(batch_renorm_with_moments)
  _state_init = staticmethod(batch_renorm_state)
  _options = staticmethod(batch_renorm_options)


class NoisyBatchNorm(_BatchStatsNorm):
  """Batch norm + step-varying noise (Santurkar et al., 2018, section 2.1).

  Wraps :func:`bn_jax.core.noisy_batch_norm`. Attributes and call signature
  as :class:`BatchNorm`, plus ``noise_mean_range``, ``noise_std_range`` and
  ``noise_form`` (``'additive'`` or ``'affine'``, see the core function).
  In training the noise key comes from the ``'noise'`` rng stream
  (``apply(..., rngs={'noise': key})``, a new key every step); in eval there
  is no noise and no rng is needed. The PreciseBN hook stores the moments of
  the input (the noise is added after normalization and does not enter the
  statistics).
  """
  noise_mean_range: tuple[float, float] = (-1.0, 1.0)
  noise_std_range: tuple[float, float] = (0.5, 1.5)
  noise_form: str = "additive"
  unbiased_running_var: bool = False
  ghost_batch_size: Optional[int] = None

  _core_fn = staticmethod(noisy_batch_norm_with_moments)
  _state_init = staticmethod(batch_norm_state)
  _options = staticmethod(noisy_batch_norm_options)
  _needs_noise_key = True


class LpNorm(_BatchStatsNorm):
  """l_p batch normalization (Santurkar et al., 2018) over
  :func:`bn_jax.core.lp_norm`.

  Attributes and call signature as :class:`BatchNorm` (no ghost batches),
  plus ``p`` (1, 2 or inf). The running statistics are
  ``batch_stats/mean`` and ``batch_stats/norm`` (an EMA of the batch's
  average l_p norm, not a variance). Because of that, LpNorm has no PreciseBN
  hook: the population-moment formula of
  :func:`bn_jax.nn.precise_batch_stats` yields a variance, which is not
  what ``norm`` holds (an average of per-batch l_p norms), so LpNorm layers
  keep their EMA statistics under ``precise_batch_stats``.
  """
  p: Any = 2

  _core_fn = staticmethod(lp_norm_with_moments)
  _state_init = staticmethod(lp_norm_state)
  _options = staticmethod(lp_norm_options)
  _stores_batch_moments = False


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
    feature_shape = feature_layout(x, self.axis).feature_shape
    state_vars = _state_variables(
        self, batch_norm_state(feature_shape, jnp.float32))
    scale, bias = _affine_params(self, feature_shape)
    y, _ = call_core(frozen_batch_norm, x,
                     BatchNormState(*(v.value for v in state_vars)), scale,
                     bias, self.dtype, axis=self.axis, epsilon=self.epsilon)
    return y


class GroupNorm(nn.Module):
  """Group Normalization (Wu & He, 2018) over :func:`bn_jax.core.group_norm`.

  A drop-in for ``flax.linen.GroupNorm``: the same attributes (in the same
  order, with the same defaults), parameters (``params/scale``,
  ``params/bias`` of shape ``(C,)``), ``mask`` argument and results. Per-sample
  statistics over groups of channels; no ``batch_stats``.

  Attributes:
    num_groups: number of channel groups (32 by default; ``None`` when
      ``group_size`` is given).
    group_size: channels per group, exclusive with ``num_groups``.
    epsilon: added to the variance inside the square root.
    dtype: output dtype (default: result type of input and params, as flax).
    param_dtype: dtype of scale and bias.
    use_bias, use_scale, bias_init, scale_init: the affine parameters.
    reduction_axes: the axes of the statistics; they must include the channel
      axis (default: every axis but the leading batch axis).
    axis_name, axis_index_groups: statistics also over a mapped axis (for
      features sharded across devices, as in flax; not for data parallelism).
    use_fast_variance: accepted for flax compatibility; bn_jax's statistics
      are always the accurate shifted form (see :mod:`bn_jax.core.moments`).
    force_float32_reductions: accepted for flax compatibility; bn_jax's
      statistics are always at least float32.
    axis: bn_jax's own: the channel axis (flax's is always the last).
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
  reduction_axes: Any = None
  axis_name: Optional[str] = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True  # accepted for flax compatibility; unused
  force_float32_reductions: bool = True  # always: statistics >= float32
  axis: int = -1

  @nn.compact
  def __call__(self, x, *, mask: Optional[jax.Array] = None):
    """Group-normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the
    entries that enter the statistics."""
    scale, bias = _affine_params(self, (jnp.shape(x)[self.axis],))
    # train is unused by the stateless norms; passed for the common signature.
    y, _ = call_core(group_norm, x, group_norm_state(), scale, bias,
                     self.dtype, train=True, num_groups=self.num_groups,
                     group_size=self.group_size, axis=self.axis,
                     reduction_axes=self.reduction_axes, epsilon=self.epsilon,
                     mask=mask, axis_name=self.axis_name,
                     axis_index_groups=self.axis_index_groups)
    return y


class LayerNorm(nn.Module):
  """Layer Normalization (Ba et al., 2016) over :func:`bn_jax.core.layer_norm`.

  A drop-in for ``flax.linen.LayerNorm``: the same attributes (in the same
  order, with the same defaults), parameters (``params/scale``,
  ``params/bias`` of the shape of ``feature_axes``), ``mask`` argument and
  results. Per-sample statistics over ``reduction_axes`` (default: the last
  axis); no ``batch_stats``. ``use_fast_variance`` and
  ``force_float32_reductions`` are accepted and have no effect: bn_jax's
  statistics are always the accurate shifted form, in at least float32.
  """
  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  reduction_axes: Any = -1
  feature_axes: Any = -1
  axis_name: Optional[str] = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True  # accepted for flax compatibility; unused
  force_float32_reductions: bool = True  # always: statistics >= float32

  @nn.compact
  def __call__(self, x, *, mask: Optional[jax.Array] = None):
    """Layer-normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the
    entries that enter the statistics."""
    scale, bias = _affine_params(
        self, feature_layout(x, self.feature_axes).feature_shape)
    y, _ = call_core(layer_norm, x, layer_norm_state(), scale, bias,
                     self.dtype, train=True, axis=self.reduction_axes,
                     feature_axes=self.feature_axes, epsilon=self.epsilon,
                     mask=mask, axis_name=self.axis_name,
                     axis_index_groups=self.axis_index_groups)
    return y
