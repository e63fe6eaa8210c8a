"""Flax NNX modules over the functional core (thin wrappers, no math here).

``BatchNorm``, ``LayerNorm`` and ``GroupNorm`` take exactly the constructor
arguments of ``flax.nnx.BatchNorm``/``LayerNorm``/``GroupNorm`` (same order,
same defaults) and keep the same variables: ``scale``/``bias`` as
``nnx.Param``, ``mean``/``var`` as ``nnx.BatchStat`` (float32). Train/eval
switching is flax's: the ``use_running_average`` attribute, which
``model.train()``, ``model.eval()`` and ``nnx.view(model,
use_running_average=...)`` set, or the ``use_running_average=`` call
argument, which takes precedence.

bn_jax's own modules follow the same conventions: ``BatchRenorm``,
``NoisyBatchNorm`` (noise key from an ``nnx.Rngs`` stream), ``LpNorm``,
``FrozenBatchNorm``; ghost batches (``ghost_batch_size``) and SyncBN
(``axis_name``, count-weighted, ``mask``-aware) are options of the
batch-statistics modules.

Each call goes through :func:`bn_jax.nn.normalization.call_core` with the
same :mod:`bn_jax.core` function and options readers as the Linen modules,
so an NNX module and its Linen twin compute bit for bit the same. What NNX
adds is only ``promote_dtype`` (flax.nnx's hook, applied to the input,
running statistics and parameters before the core call, as flax.nnx does).

Differences from flax.nnx (on purpose):

* Statistics are always the accurate shifted one-pass form in at least
  float32 (:mod:`bn_jax.core.moments`); ``use_fast_variance`` is accepted
  and has no effect.
* Train-mode batch statistics of one value per feature raise a ValueError
  (flax normalizes them to 0), as in PyTorch.
* SyncBN (``axis_name``) weights devices by their sample counts, so
  devices with different numbers of valid (masked) samples are exact.
* Complex inputs: the running mean becomes complex (as in flax.linen);
  flax.nnx writes the complex batch mean into its float32 ``mean`` and
  drops the imaginary part (with a ComplexWarning).
"""
from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.module import first_from

from bn_jax.core.batch_norm import (BatchNormState, batch_norm_state,
                                    batch_norm_with_moments)
from bn_jax.core.batch_renorm import (batch_renorm_state,
                                      batch_renorm_with_moments)
from bn_jax.core.common import feature_layout
from bn_jax.core.frozen_batch_norm import frozen_batch_norm
from bn_jax.core.group_norm import (group_norm, group_norm_state,
                                    resolve_num_groups)
from bn_jax.core.layer_norm import layer_norm, layer_norm_state
from bn_jax.core.lp_norm import lp_norm_state
from bn_jax.core.noisy_batch_norm import noisy_batch_norm_with_moments
from bn_jax.nn.normalization import (batch_moments_record, batch_norm_options,
                                     batch_renorm_options, call_core,
                                     lp_norm_options, lp_norm_with_moments,
                                     noisy_batch_norm_options)

Initializer = Callable[..., jax.Array]
Dtype = Any
PromoteDtypeFn = Callable[..., Any]

_EMPTY = MappingProxyType({})


# --- The PreciseBN recorder (read by bn_jax.nnx.precise_batch_stats). ---

_recording = threading.local()


def active_moments_recorder() -> Optional[dict]:
  """The dict PreciseBN records into while it traces a forward pass."""
  return getattr(_recording, "records", None)


def set_moments_recorder(records: Optional[dict]) -> Optional[dict]:
  """Installs ``records`` as the recorder; returns the previous one."""
  previous = active_moments_recorder()
  _recording.records = records
  return previous


def record_batch_moments(layer: nnx.Module, record: Mapping) -> None:
  """Hands one training batch's moments to PreciseBN, when it listens.

  ``record`` is ``{'mean', 'var', 'count'}`` (see
  :func:`bn_jax.nn.normalization.batch_moments_record`); outside
  :func:`bn_jax.nnx.precise_batch_stats` this does nothing.
  """
  records = active_moments_recorder()
  if records is not None:
    records[id(layer)] = dict(record)


# --- Construction helpers. ---


def _feature_shape(num_features) -> tuple:
  """``(num_features,)``, or the feature shape when ``axis`` names several."""
  if isinstance(num_features, (tuple, list)):
    return tuple(num_features)
  return (num_features,)


def _check_num_features(num_features) -> None:
  for n in _feature_shape(num_features):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise TypeError(f"num_features must be an int >= 1 (or a tuple of "
                      f"them for several feature axes), got "
                      f"{num_features!r}.")


def _affine(module, feature_shape, *, use_scale, use_bias, scale_init,
            bias_init, param_dtype, rngs, scale_metadata, bias_metadata):
  """``module.scale``/``module.bias`` as ``nnx.Param`` (or None), as flax."""
  if use_scale:
    module.scale = nnx.Param(
        scale_init(rngs.params(), feature_shape, param_dtype),
        **scale_metadata)
  else:
    module.scale = nnx.data(None)
  if use_bias:
    module.bias = nnx.Param(
        bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
  else:
    module.bias = nnx.data(None)


def _param_values(module):
  scale = module.scale[...] if module.scale is not None else None
  bias = module.bias[...] if module.bias is not None else None
  return scale, bias


_NO_MODE_MESSAGE = (
    "No `use_running_average` argument was provided to {name}. Pass it to "
    "the constructor or to __call__, call model.train() / model.eval(), or "
    "use nnx.view(model, use_running_average=True/False).")


class _BatchStatsNorm(nnx.Module):
  """What the batch-statistics modules share: state, mode, core call.

  A subclass's ``__init__`` calls ``_setup`` and sets as class attributes
  (``staticmethod``): ``_core_fn`` (the :mod:`bn_jax.core`
  ``*_with_moments`` function), ``_state_init`` (its state constructor; every
  field becomes an ``nnx.BatchStat`` attribute) and ``_options(module)``
  (the core keyword arguments beyond flax's, shared with the Linen module).
  """
  _stores_batch_moments = True
  _options = staticmethod(lambda module: {})

  def _setup(self, num_features, *, use_running_average, axis, momentum,
             epsilon, dtype, param_dtype, use_bias, use_scale, bias_init,
             scale_init, axis_name, axis_index_groups, use_fast_variance,
             promote_dtype, rngs, bias_metadata, scale_metadata):
    _check_num_features(num_features)
    feature_shape = _feature_shape(num_features)
    init_state = self._state_init(feature_shape, jnp.float32)
    self._state_type = type(init_state)
    for name, value in zip(init_state._fields, init_state):
      setattr(self, name, nnx.BatchStat(value))
    _affine(self, feature_shape, use_scale=use_scale, use_bias=use_bias,
            scale_init=scale_init, bias_init=bias_init,
            param_dtype=param_dtype, rngs=rngs,
            scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance  # no effect (see docstring)
    self.promote_dtype = promote_dtype

  def _core_kwargs(self, train: bool, call_rngs) -> dict:
    """The core's keyword arguments beyond flax's (a subclass adds a key)."""
    del train, call_rngs
    return self._options(self)

  def __call__(self, x, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None):
    """Normalizes ``x``; in training, updates the running statistics.

    Args:
      x: the input.
      use_running_average: normalize with the running statistics (eval)
        instead of the batch statistics; takes precedence over the
        attribute.
      mask: boolean, broadcastable to ``x``; True entries enter the batch
        statistics (ignored with running averages, as in flax).
    """
    return self._forward(x, use_running_average, mask, None)

  def _forward(self, x, use_running_average, mask, call_rngs):
    use_running_average = first_from(
        use_running_average, self.use_running_average,
        error_msg=_NO_MODE_MESSAGE.format(name=type(self).__name__))
    train = not use_running_average
    scale, bias = _param_values(self)
    fields = self._state_type._fields
    stored = [getattr(self, f)[...] for f in fields]
    # flax.nnx promotes the input, the running mean/variance and the
    # parameters together (its default promote_dtype); the EMA update starts
    # from the stored float32 values, eval mode uses the promoted ones.
    x, mean, second, scale, bias = self.promote_dtype(
        (x, stored[0], stored[1], scale, bias), dtype=self.dtype)
    if not train:
      stored[0], stored[1] = mean, second
    state = self._state_type(*stored)
    y, new_state, batch = call_core(
        self._core_fn, x, state, scale, bias, self.dtype, train=train,
        axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        mask=mask, **self._core_kwargs(train, call_rngs))
    if train:
      for name, value in zip(fields, new_state):
        variable, value = getattr(self, name), jax.lax.stop_gradient(value)
        if value.dtype == variable[...].dtype:
          variable[...] = value
        else:  # a complex input's running mean turns complex, as in Linen
          variable.set_value(value)
      if self._stores_batch_moments:
        record_batch_moments(self, batch_moments_record(
            batch, feature_layout(x, self.axis).feature_shape,
            masked=mask is not None,
            ghost_batch_size=getattr(self, "ghost_batch_size", None)))
    return y

  def set_view(self, use_running_average: Optional[bool] = None):
    """Class method used by ``nnx.view``.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchNorm(_BatchStatsNorm):
  """Batch normalization; a drop-in for ``flax.nnx.BatchNorm``.

  Same constructor (``num_features, *, use_running_average=False, axis=-1,
  momentum=0.99, epsilon=1e-5, dtype, param_dtype, use_bias, use_scale,
  bias_init, scale_init, axis_name, axis_index_groups, use_fast_variance,
  promote_dtype, rngs, bias_metadata, scale_metadata``), variables and call
  signature, computed by :func:`bn_jax.core.batch_norm`. Additionally
  (keyword-only, after flax's): ``unbiased_running_var`` (Bessel-corrected
  running variance, PyTorch's) and ``ghost_batch_size`` (ghost / virtual
  BN: groups of this many samples along axis 0 normalized separately).
  ``num_features`` may be a tuple when ``axis`` names several axes.

  Example::

    bn = BatchNorm(16, rngs=nnx.Rngs(0))
    y = bn(x)              # training: batch statistics, EMA update
    bn.eval(); y = bn(x)   # running statistics
  """

  _core_fn = staticmethod(batch_norm_with_moments)
  _state_init = staticmethod(batch_norm_state)
  _options = staticmethod(batch_norm_options)

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: Optional[bool] = False,
      axis: int = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      axis_name: Optional[str] = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _EMPTY,
      scale_metadata: Mapping[str, Any] = _EMPTY,
      unbiased_running_var: bool = False,
      ghost_batch_size: Optional[int] = None,
  ):
    self.unbiased_running_var = unbiased_running_var
    self.ghost_batch_size = ghost_batch_size
    self._setup(
        num_features, use_running_average=use_running_average, axis=axis,
        momentum=momentum, epsilon=epsilon, dtype=dtype,
        param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale,
        bias_init=bias_init, scale_init=scale_init, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance, promote_dtype=promote_dtype,
        rngs=rngs, bias_metadata=bias_metadata, scale_metadata=scale_metadata)


def _flax_batch_norm_args(use_running_average, axis, momentum, epsilon,
                          dtype, param_dtype, use_bias, use_scale, bias_init,
                          scale_init, axis_name, axis_index_groups,
                          use_fast_variance, promote_dtype, rngs,
                          bias_metadata, scale_metadata) -> dict:
  """flax.nnx.BatchNorm's keyword arguments, as ``_setup`` takes them."""
  return dict(use_running_average=use_running_average, axis=axis,
              momentum=momentum, epsilon=epsilon, dtype=dtype,
              param_dtype=param_dtype, use_bias=use_bias,
              use_scale=use_scale, bias_init=bias_init,
              scale_init=scale_init, axis_name=axis_name,
              axis_index_groups=axis_index_groups,
              use_fast_variance=use_fast_variance,
              promote_dtype=promote_dtype, rngs=rngs,
              bias_metadata=bias_metadata, scale_metadata=scale_metadata)


class BatchRenorm(_BatchStatsNorm):
  """Batch Renormalization (Ioffe, 2017) over
  :func:`bn_jax.core.batch_renorm`.

  Constructor, variables and call as :class:`BatchNorm`, plus (keyword-only)
  the clip limits: constant ``r_max``/``d_max``, or (left None) the schedule
  ``warmup_steps``, ``r_max_final``, ``r_max_steps``, ``d_max_final``,
  ``d_max_steps`` driven by the step counter ``step`` (an int32
  ``nnx.BatchStat``, updated with ``mean`` and ``var``).
  """

  _core_fn = staticmethod(batch_renorm_with_moments)
  _state_init = staticmethod(batch_renorm_state)
  _options = staticmethod(batch_renorm_options)

  def __init__(
      self, num_features: int, *,
      use_running_average: Optional[bool] = False, axis: int = -1,
      momentum: float = 0.99, epsilon: float = 1e-5,
      dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
      use_bias: bool = True, use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      axis_name: Optional[str] = None, axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = _EMPTY,
      scale_metadata: Mapping[str, Any] = _EMPTY,
      r_max: Optional[float] = None, d_max: Optional[float] = None,
      warmup_steps: int = 5000, r_max_final: float = 3.0,
      r_max_steps: int = 40000, d_max_final: float = 5.0,
      d_max_steps: int = 25000, unbiased_running_var: bool = False):
    self.r_max, self.d_max = r_max, d_max
    self.warmup_steps = warmup_steps
    self.r_max_final, self.r_max_steps = r_max_final, r_max_steps
    self.d_max_final, self.d_max_steps = d_max_final, d_max_steps
    self.unbiased_running_var = unbiased_running_var
    self._setup(num_features, **_flax_batch_norm_args(
        use_running_average, axis, momentum, epsilon, dtype, param_dtype,
        use_bias, use_scale, bias_init, scale_init, axis_name,
        axis_index_groups, use_fast_variance, promote_dtype, rngs,
        bias_metadata, scale_metadata))


class NoisyBatchNorm(_BatchStatsNorm):
  """Batch norm + step-varying noise (Santurkar et al., 2018), over
  :func:`bn_jax.core.noisy_batch_norm`.

  Constructor, variables and call as :class:`BatchNorm`, plus
  ``noise_mean_range``, ``noise_std_range``, ``noise_form``,
  ``unbiased_running_var``, ``ghost_batch_size`` and ``rng_collection``
  (default ``'noise'``). In
  training every call draws a new key from the ``rng_collection`` stream of
  the ``rngs`` given to the constructor (as ``nnx.Dropout`` does; a stream
  missing from the ``nnx.Rngs`` falls back to its ``default`` stream), or
  from ``rngs=`` passed to the call (an ``nnx.Rngs``, a stream or a key).
  Eval mode adds no noise.
  """

  _core_fn = staticmethod(noisy_batch_norm_with_moments)
  _state_init = staticmethod(batch_norm_state)
  _options = staticmethod(noisy_batch_norm_options)

  def __init__(
      self, num_features: int, *,
      use_running_average: Optional[bool] = False, axis: int = -1,
      momentum: float = 0.99, epsilon: float = 1e-5,
      dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
      use_bias: bool = True, use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      axis_name: Optional[str] = None, axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = _EMPTY,
      scale_metadata: Mapping[str, Any] = _EMPTY,
      noise_mean_range: tuple[float, float] = (-1.0, 1.0),
      noise_std_range: tuple[float, float] = (0.5, 1.5),
      noise_form: str = "additive",
      unbiased_running_var: bool = False,
      ghost_batch_size: Optional[int] = None,
      rng_collection: str = "noise"):
    self.noise_mean_range = tuple(noise_mean_range)
    self.noise_std_range = tuple(noise_std_range)
    self.noise_form = noise_form
    self.unbiased_running_var = unbiased_running_var
    self.ghost_batch_size = ghost_batch_size
    self.rng_collection = rng_collection
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}.")
    self.rngs = rngs[rng_collection].fork()
    self._setup(num_features, **_flax_batch_norm_args(
        use_running_average, axis, momentum, epsilon, dtype, param_dtype,
        use_bias, use_scale, bias_init, scale_init, axis_name,
        axis_index_groups, use_fast_variance, promote_dtype, rngs,
        bias_metadata, scale_metadata))

  def __call__(self, x, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None, rngs=None):
    """As :meth:`BatchNorm.__call__`; ``rngs`` overrides the noise stream."""
    return self._forward(x, use_running_average, mask, rngs)

  def _core_kwargs(self, train: bool, call_rngs) -> dict:
    kwargs = self._options(self)
    if train:
      rngs = self.rngs if call_rngs is None else call_rngs
      if isinstance(rngs, nnx.Rngs):
        kwargs["key"] = rngs[self.rng_collection]()
      elif isinstance(rngs, nnx.RngStream):
        kwargs["key"] = rngs()
      elif isinstance(rngs, jax.Array):
        kwargs["key"] = rngs
      else:
        raise TypeError("rngs must be an nnx.Rngs, an nnx.RngStream or a "
                        f"key, got {type(rngs).__name__}.")
    return kwargs


class LpNorm(_BatchStatsNorm):
  """l_p batch normalization (Santurkar et al., 2018) over
  :func:`bn_jax.core.lp_norm`.

  Constructor and call as :class:`BatchNorm` (no ghost batches), plus ``p``
  (1, 2 or inf). The running statistics are ``mean`` and ``norm``
  (``nnx.BatchStat``; an EMA of the average l_p norm, not a variance), so
  PreciseBN leaves LpNorm layers alone.
  """

  _core_fn = staticmethod(lp_norm_with_moments)
  _state_init = staticmethod(lp_norm_state)
  _options = staticmethod(lp_norm_options)
  _stores_batch_moments = False

  def __init__(
      self, num_features: int, *,
      use_running_average: Optional[bool] = False, axis: int = -1,
      momentum: float = 0.99, epsilon: float = 1e-5,
      dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
      use_bias: bool = True, use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      axis_name: Optional[str] = None, axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = _EMPTY,
      scale_metadata: Mapping[str, Any] = _EMPTY, p: Any = 2):
    self.p = p
    self._setup(num_features, **_flax_batch_norm_args(
        use_running_average, axis, momentum, epsilon, dtype, param_dtype,
        use_bias, use_scale, bias_init, scale_init, axis_name,
        axis_index_groups, use_fast_variance, promote_dtype, rngs,
        bias_metadata, scale_metadata))


class FrozenBatchNorm(nnx.Module):
  """Batch norm with fixed statistics, over
  :func:`bn_jax.core.frozen_batch_norm`.

  ``y = scale * (x - mean) / sqrt(var + epsilon) + bias`` in both modes,
  with ``mean``/``var`` (``nnx.BatchStat``, the names and initial values of
  :class:`BatchNorm`, so a trained BatchNorm's state loads directly) never
  updated. ``use_running_average`` is accepted (constructor and call) so it
  can replace a BatchNorm, and has no effect.
  """

  def __init__(
      self, num_features: int, *,
      use_running_average: Optional[bool] = None, axis: int = -1,
      epsilon: float = 1e-5, dtype: Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32, use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = _EMPTY,
      scale_metadata: Mapping[str, Any] = _EMPTY):
    _check_num_features(num_features)
    feature_shape = _feature_shape(num_features)
    state = batch_norm_state(feature_shape, jnp.float32)
    self.mean = nnx.BatchStat(state.mean)
    self.var = nnx.BatchStat(state.var)
    _affine(self, feature_shape, use_scale=use_scale, use_bias=use_bias,
            scale_init=scale_init, bias_init=bias_init,
            param_dtype=param_dtype, rngs=rngs,
            scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.use_running_average = use_running_average  # no effect
    self.axis, self.epsilon = axis, epsilon
    self.dtype, self.param_dtype = dtype, param_dtype
    self.use_bias, self.use_scale = use_bias, use_scale
    self.promote_dtype = promote_dtype

  def __call__(self, x, use_running_average: Optional[bool] = None):
    """Normalizes ``x`` with the stored statistics (both modes)."""
    del use_running_average  # same computation in both modes
    scale, bias = _param_values(self)
    x, mean, var, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
    y, _ = call_core(frozen_batch_norm, x, BatchNormState(mean, var),
                     scale, bias,
                     self.dtype, axis=self.axis, epsilon=self.epsilon)
    return y


class LayerNorm(nnx.Module):
  """Layer normalization; a drop-in for ``flax.nnx.LayerNorm``.

  Same constructor (``num_features, *, epsilon=1e-6, dtype, param_dtype,
  use_bias, use_scale, bias_init, scale_init, reduction_axes=-1,
  feature_axes=-1, axis_name, axis_index_groups, use_fast_variance,
  promote_dtype, rngs, bias_metadata, scale_metadata``), variables and call
  (``mask=``), computed by :func:`bn_jax.core.layer_norm`.
  """

  def __init__(
      self, num_features: int, *, epsilon: float = 1e-6,
      dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
      use_bias: bool = True, use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      reduction_axes: Any = -1, feature_axes: Any = -1,
      axis_name: Optional[str] = None, axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = _EMPTY,
      scale_metadata: Mapping[str, Any] = _EMPTY):
    _check_num_features(num_features)
    _affine(self, _feature_shape(num_features), use_scale=use_scale,
            use_bias=use_bias, scale_init=scale_init, bias_init=bias_init,
            param_dtype=param_dtype, rngs=rngs,
            scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype, self.param_dtype = dtype, param_dtype
    self.use_bias, self.use_scale = use_bias, use_scale
    self.reduction_axes, self.feature_axes = reduction_axes, feature_axes
    self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
    self.use_fast_variance = use_fast_variance  # no effect
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: Optional[jax.Array] = None):
    """Layer-normalizes ``x``; ``mask`` selects the entries of the
    statistics."""
    scale, bias = _param_values(self)
    x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    y, _ = call_core(layer_norm, x, layer_norm_state(), scale, bias,
                     self.dtype, train=True, axis=self.reduction_axes,
                     feature_axes=self.feature_axes, epsilon=self.epsilon,
                     mask=mask, axis_name=self.axis_name,
                     axis_index_groups=self.axis_index_groups)
    return y


class GroupNorm(nnx.Module):
  """Group normalization; a drop-in for ``flax.nnx.GroupNorm``.

  Same constructor (``num_features, num_groups=32, group_size=None, *,
  epsilon=1e-6, dtype, param_dtype, use_bias, use_scale, bias_init,
  scale_init, reduction_axes=None, axis_name, axis_index_groups,
  use_fast_variance, promote_dtype, rngs, bias_metadata,
  scale_metadata``), the same ValueErrors for groups that do not divide
  ``num_features``, variables and call (``mask=``), computed by
  :func:`bn_jax.core.group_norm`. The channel axis is the last.
  """

  def __init__(
      self, num_features: int, num_groups: Optional[int] = 32,
      group_size: Optional[int] = None, *, epsilon: float = 1e-6,
      dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
      use_bias: bool = True, use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      reduction_axes: Any = None, axis_name: Optional[str] = None,
      axis_index_groups: Any = None, use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = _EMPTY,
      scale_metadata: Mapping[str, Any] = _EMPTY):
    if isinstance(num_features, bool) or not isinstance(num_features, int) or (
        num_features < 1):
      raise TypeError(f"num_features must be an int >= 1, got "
                      f"{num_features!r}.")
    # The core's check, so the message names the argument (at construction,
    # as flax.nnx checks).
    groups = resolve_num_groups(num_features, num_groups, group_size)
    self.feature_axis = -1
    self.num_groups = groups
    self.group_size = num_features // groups
    _affine(self, (num_features,), use_scale=use_scale, use_bias=use_bias,
            scale_init=scale_init, bias_init=bias_init,
            param_dtype=param_dtype, rngs=rngs,
            scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.epsilon = epsilon
    self.dtype, self.param_dtype = dtype, param_dtype
    self.use_bias, self.use_scale = use_bias, use_scale
    self.reduction_axes = reduction_axes
    self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
    self.use_fast_variance = use_fast_variance  # no effect
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: Optional[jax.Array] = None):
    """Group-normalizes ``x`` (channels last); ``mask`` selects the entries
    of the statistics."""
    scale, bias = _param_values(self)
    x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    y, _ = call_core(group_norm, x, group_norm_state(), scale, bias,
                     self.dtype, train=True, num_groups=self.num_groups,
                     axis=self.feature_axis,
                     reduction_axes=self.reduction_axes, epsilon=self.epsilon,
                     mask=mask, axis_name=self.axis_name,
                     axis_index_groups=self.axis_index_groups)
    return y
