"""The normalization of every model, chosen by name.

Every model in :mod:`bn_jax.models` builds its layers from the two blocks
defined here, :class:`ConvNorm` and :class:`DenseNorm`. A block is a linear
layer followed by the normalization named by ``norm`` (and optionally by a
nonlinearity), and returns the normalized pre-activation::

  'none'      Conv/Dense WITH bias, no normalization.
  'bn'        Conv/Dense without bias -> bn_jax.nn.BatchNorm.
  'ghost'     Conv/Dense without bias -> bn_jax.nn.BatchNorm(ghost_batch_size=
              DEFAULT_GHOST_BATCH_SIZE) unless norm_kwargs sets it (Hoffer et
              al. 2017; Wu & Johnson 2021: normalization batches of 32-128 are
              the sweet spot). The batch size must be a multiple of it.
  'gn'        Conv/Dense without bias -> bn_jax.nn.GroupNorm. Unless norm_kwargs
              sets ``num_groups`` or ``group_size``, each layer uses the largest
              number of groups <= 32 (Wu & He's default) that divides its
              channel count (16 channels -> 16 groups, 100 -> 25, 512 -> 32).
  'ln'        Dense without bias -> bn_jax.nn.LayerNorm (per sample over the
              features). Conv without bias -> bn_jax.nn.GroupNorm(num_groups=1):
              per sample over all of (H, W, C) with per-channel scale/bias,
              which is Layer Normalization for conv nets as Wu & He (2018,
              Section 3.1) define it ("LN is GN with G=1"), and keeps the
              parameters independent of the image size. norm_kwargs are the
              LayerNorm arguments (epsilon, use_scale, ...), which GroupNorm
              shares.
  'brn'       Conv/Dense without bias -> bn_jax.nn.BatchRenorm.
  'noisy_bn'  Conv/Dense without bias -> bn_jax.nn.NoisyBatchNorm (needs the
              'noise' rng stream in training).
  'lp'        Conv/Dense without bias -> bn_jax.nn.LpNorm (``{'p': 1}`` etc.).
  'frozen'    Conv/Dense without bias -> bn_jax.nn.FrozenBatchNorm.
  'cbn'       bn_jax.nn.ConvCBN / DenseCBN: they own the kernel, because
              Cross-Iteration BN compensates old statistics with the kernel.
  'naive_cbn' the same with ``rho=0`` unless norm_kwargs sets it: past
              statistics used without compensation (Yao et al.'s baseline).

The bias of a Conv/Dense followed by a normalization is dropped because the
mean subtraction cancels it (BN paper, Section 3.2).

What the block sets itself (and ``norm_kwargs`` therefore may not): the
feature ``axis`` (-1, NHWC), ``dtype`` (the activation dtype; parameters and
statistics stay float32 via ``param_dtype=float32``), ``axis_name`` (SyncBN:
forwarded to every module that has the attribute), ``use_running_average =
not train`` (for the batch-statistics norms) and, for 'cbn', the convolution's
geometry and kernel initializer. Every other constructor argument of the norm
module may be given in ``norm_kwargs`` (e.g. ``{'momentum': 0.9}``,
``{'num_groups': 8}``, ``{'window': 4, 'burn_in': 100}``, ``{'p': 1}``); an
unknown key raises a ValueError listing the valid ones.

The norm modules come from :mod:`bn_jax.nn`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_jax import nn as bn_nn
from bn_jax.core import validation

# Normalization batch size of 'ghost' when norm_kwargs does not set one.
DEFAULT_GHOST_BATCH_SIZE = 32
# Wu & He (2018)'s default number of groups; layers with fewer channels (or a
# channel count it does not divide) use the largest divisor below it.
DEFAULT_MAX_GROUPS = 32

# The norms: name -> the bn_jax.nn class(es) implementing it. The one list of
# norm names (NORMS and everything else derive from it).
_NORM_MODULES = {
    'none': (),
    'bn': ('BatchNorm',),
    'cbn': ('ConvCBN', 'DenseCBN'),
    'naive_cbn': ('ConvCBN', 'DenseCBN'),
    'gn': ('GroupNorm',),
    'ln': ('LayerNorm',),
    'brn': ('BatchRenorm',),
    'noisy_bn': ('NoisyBatchNorm',),
    'lp': ('LpNorm',),
    'frozen': ('FrozenBatchNorm',),
    'ghost': ('BatchNorm',),
}
NORMS = tuple(_NORM_MODULES)

# Defaults the blocks choose themselves (not the module's): None = per layer.
_BLOCK_DEFAULTS = {
    'gn': {'num_groups': None},  # default_num_groups(channels)
    'ghost': {'ghost_batch_size': DEFAULT_GHOST_BATCH_SIZE},
    'naive_cbn': {'rho': 0.0},
}
# The norms built by ConvCBN/DenseCBN (they own the kernel).
_CBN_NORMS = frozenset({'cbn', 'naive_cbn'})

# Constructor arguments the blocks set themselves.
_SET_BY_BLOCK = frozenset({
    'parent', 'name', 'use_running_average', 'axis_name', 'dtype',
    'param_dtype', 'axis', 'feature_axes', 'reduction_axes'})
_SET_BY_CBN_BLOCK = _SET_BY_BLOCK | frozenset({
    'features', 'kernel_size', 'strides', 'padding', 'kernel_init',
    'kernel_dilation', 'feature_group_count'})

Activation = Optional[Callable[[jax.Array], jax.Array]]


def _nn_class(class_name: str) -> type:
  """bn_jax.nn.<class_name>, looked up when a norm is first used."""
  cls = getattr(bn_nn, class_name, None)
  if cls is None:
    raise ImportError(
        f'bn_jax.nn.{class_name} is not available in this installation.')
  return cls


def norm_module_classes(norm: str) -> tuple[type, ...]:
  """The Flax module class(es) that implement ``norm`` ('none' -> ())."""
  check_norm_name(norm)
  return tuple(_nn_class(name) for name in _NORM_MODULES[norm])


def _fields(cls: type) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.init}


def check_norm_name(norm) -> str:
  if not isinstance(norm, str) or norm not in NORMS:
    raise ValueError(
        f'norm={norm!r} is not a known normalization; valid choices are '
        f'{", ".join(repr(n) for n in NORMS)}.')
  return norm


def check_norm(norm: str, norm_kwargs: Optional[Mapping[str, Any]]) -> dict:
  """Validates ``norm`` and ``norm_kwargs``; returns the kwargs as a dict.

  Raises:
    ValueError: unknown ``norm``, a key of ``norm_kwargs`` that the norm
      module does not take, or a key the blocks set themselves.
    TypeError: ``norm_kwargs`` is not a mapping with string keys.
  """
  check_norm_name(norm)
  if norm_kwargs is None:
    return {}
  if not isinstance(norm_kwargs, Mapping):
    raise TypeError(f'norm_kwargs must be a dict of constructor arguments of '
                    f'the norm module, got {type(norm_kwargs).__name__}.')
  kwargs = dict(norm_kwargs)
  if not kwargs:
    return kwargs
  if norm == 'none':
    raise ValueError(
        f"norm='none' takes no norm_kwargs, got keys {sorted(kwargs)}.")
  classes = norm_module_classes(norm)
  accepted = set.intersection(*(_fields(c) for c in classes))
  reserved = _SET_BY_CBN_BLOCK if norm in _CBN_NORMS else _SET_BY_BLOCK
  valid = sorted(accepted - reserved)
  for key in kwargs:
    if not isinstance(key, str):
      raise TypeError(f'norm_kwargs keys must be strings, got {key!r}.')
    if key in reserved and key in accepted:
      raise ValueError(
          f'norm_kwargs[{key!r}] is set by the model (axis, dtype, axis_name, '
          f'use_running_average'
          f'{", conv geometry" if norm in _CBN_NORMS else ""} '
          f'come from create_model/the layer); valid keys for norm={norm!r} '
          f'are {valid}.')
    if key not in accepted:
      raise ValueError(
          f'norm_kwargs has unknown key {key!r} for norm={norm!r} '
          f'({", ".join(c.__name__ for c in classes)}); valid keys are '
          f'{valid}.')
  return kwargs


# Default types a config can hold and the command line can override.
_CONFIGURABLE_TYPES = (bool, int, float, str, tuple)


def configurable_norm_kwargs(norm: str) -> dict[str, tuple[type, Any]]:
  """The keyword arguments of ``norm`` a config may set, with their defaults:
  ``{name: (type, default)}``.

  Read from the norm module's constructor (dataclass fields), so they follow
  the modules; the arguments the blocks set themselves and those without a
  plain-value default (initializers) are left out. Where the blocks choose a
  default per layer (GroupNorm's ``num_groups``: :func:`default_num_groups`)
  the default is None. ``type`` is the value's type: ``float`` for a float
  (or ``Any``) argument with an int default (``p=2`` of LpNorm: ``p=inf``
  must parse), ``int``/``float`` for an
  Optional one whose default is None, so that a command-line override parses.
  """
  classes = norm_module_classes(norm)
  reserved = _SET_BY_CBN_BLOCK if norm in _CBN_NORMS else _SET_BY_BLOCK
  out = {}
  for cls in classes[:1]:  # CBN: ConvCBN's and DenseCBN's agree (a base)
    for field in dataclasses.fields(cls):
      if not field.init or field.name in reserved:
        continue
      default = _BLOCK_DEFAULTS.get(norm, {}).get(field.name, field.default)
      annotation = str(field.type)
      if default is None:
        kind = next((t for t in (int, float) if t.__name__ in annotation),
                    None)
        if kind is None:
          continue
      elif isinstance(default, _CONFIGURABLE_TYPES):
        kind = type(default)
        if kind is int and ('float' in annotation or annotation == 'Any'):
          kind, default = float, float(default)
      else:
        continue
      out[field.name] = (kind, default)
  return out


def default_num_groups(channels: int,
                       max_groups: int = DEFAULT_MAX_GROUPS) -> int:
  """The largest number of groups <= max_groups that divides ``channels``."""
  for groups in range(min(max_groups, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def _norm_layer(norm: str, kwargs: dict, *, features: int, train: bool,
                dtype, axis_name, name: str, conv: bool) -> nn.Module:
  """Constructs the (non-CBN) norm module of a block."""
  kwargs = dict(kwargs)
  if norm == 'ln' and conv:
    # LN over (H, W, C) with per-channel affine = GroupNorm with one group.
    norm = 'gn'
    kwargs['num_groups'] = 1
  (cls,) = norm_module_classes(norm)
  fields = _fields(cls)
  # A default the block chooses (see configurable_norm_kwargs): unset or None.
  if norm == 'ghost' and kwargs.get('ghost_batch_size') is None:
    kwargs['ghost_batch_size'] = DEFAULT_GHOST_BATCH_SIZE
  if (norm == 'gn' and kwargs.get('num_groups') is None
      and kwargs.get('group_size') is None):
    kwargs['num_groups'] = default_num_groups(features)
  if norm == 'gn' and kwargs.get('group_size') is not None:
    # GroupNorm's num_groups has a default of 32; group_size alone decides.
    kwargs.setdefault('num_groups', None)
  if 'use_running_average' in fields:
    kwargs['use_running_average'] = not train
  # GroupNorm/LayerNorm have flax's axis_name too, for features sharded
  # across devices; their per-sample statistics must not be psum-ed over a
  # data-parallel batch axis.
  if 'axis_name' in fields and norm not in ('gn', 'ln'):
    kwargs['axis_name'] = axis_name
  if 'dtype' in fields:
    kwargs['dtype'] = dtype
  if 'param_dtype' in fields:
    kwargs['param_dtype'] = jnp.float32
  return cls(name=name, **kwargs)


class NormSettings(nn.Module, kw_only=True):
  """The attributes every model and block shares (keyword-only).

  Attributes:
    norm: one of :data:`NORMS`.
    norm_kwargs: extra constructor arguments of the norm module.
    dtype: activation (computation) dtype; parameters are float32.
    axis_name: mapped axis for cross-device statistics (SyncBN) or None.
  """
  norm: str = 'bn'
  norm_kwargs: Optional[Mapping[str, Any]] = None
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  def norm_settings(self) -> dict:
    """These attributes as keyword arguments, to pass on to a submodule."""
    return dict(norm=self.norm, norm_kwargs=self.norm_kwargs, dtype=self.dtype,
                axis_name=self.axis_name)


class _Block(NormSettings):
  """What ConvNorm and DenseNorm share: linear layer -> norm -> activation."""

  def _activate(self, y: jax.Array) -> jax.Array:
    if self.activation is None:
      return y
    # The analysis tools (percentiles, Figure 1(b,c) of the BN paper) read the
    # input of every nonlinearity from here.
    self.sow('intermediates', 'preact', y)
    return self.activation(y)

  def _linear_norm_activation(self, x: jax.Array, *, train: bool,
                              conv_geometry: Optional[dict]) -> jax.Array:
    """Conv (with ``conv_geometry``: kernel_size, strides, padding) or Dense
    (``conv_geometry=None``), then the norm, then the activation."""
    kwargs = check_norm(self.norm, self.norm_kwargs)
    conv = conv_geometry is not None
    geometry = conv_geometry or {}
    linear_args = dict(dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=self.kernel_init, **geometry)
    if self.norm in _CBN_NORMS:
      for name, default in _BLOCK_DEFAULTS.get(self.norm, {}).items():
        kwargs.setdefault(name, default)  # naive CBN: rho=0
      conv_cls, dense_cls = norm_module_classes(self.norm)
      y = (conv_cls if conv else dense_cls)(
          features=self.features, use_running_average=not train,
          axis_name=self.axis_name, name='cbn', **linear_args, **kwargs)(x)
      return self._activate(y)
    linear = nn.Conv if conv else nn.Dense
    y = linear(self.features, use_bias=self.norm == 'none',
               name='conv' if conv else 'dense', **linear_args)(x)
    if self.norm != 'none':
      y = _norm_layer(self.norm, kwargs, features=self.features, train=train,
                      dtype=self.dtype, axis_name=self.axis_name,
                      name='norm', conv=conv)(y)
    return self._activate(y)


class ConvNorm(_Block):
  """Conv (3x3 by default) -> normalization [-> activation].

  Submodule names: 'conv' and 'norm' (for 'cbn': a single 'cbn').

  Attributes:
    features: output channels.
    kernel_size: spatial size of the kernel.
    strides: spatial stride.
    kernel_init: initializer of the convolution kernel.
    padding: convolution padding.
    activation: applied after the norm when not None; its input is sown as
      ``intermediates/<path>/preact``.
    norm, norm_kwargs, dtype, axis_name: keyword-only, see
      :class:`NormSettings`.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Union[int, Sequence[int]] = 1
  kernel_init: Callable = nn.initializers.kaiming_normal()
  padding: Any = 'SAME'
  activation: Activation = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    strides = ((self.strides,) * len(self.kernel_size)
               if isinstance(self.strides, int) else tuple(self.strides))
    return self._linear_norm_activation(
        x, train=train,
        conv_geometry=dict(kernel_size=tuple(self.kernel_size),
                           strides=strides, padding=self.padding))


class DenseNorm(_Block):
  """Dense -> normalization [-> activation].

  Submodule names: 'dense' and 'norm' (for 'cbn': a single 'cbn').
  Attributes as :class:`ConvNorm`, without the convolution geometry.
  """
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  activation: Activation = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self._linear_norm_activation(x, train=train, conv_geometry=None)


def logits_head(x: jax.Array, num_classes: int, *, name: str = 'head',
                kernel_init: Callable = nn.initializers.lecun_normal()
                ) -> jax.Array:
  """The output layer (Dense with bias), computed in float32 whatever the
  activation dtype, so that the softmax/cross-entropy sees float32 logits.

  Must be called inside a compact method (it creates an ``nn.Dense``).
  """
  return nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                  kernel_init=kernel_init, name=name)(x.astype(jnp.float32))


def check_model_args(model: nn.Module) -> None:
  """Validates the attributes every model shares (num_classes, norm,
  norm_kwargs, dtype), at construction, before any compute."""
  num_classes = model.num_classes
  if isinstance(num_classes, bool) or not isinstance(num_classes, int):
    raise TypeError(f'num_classes must be an int >= 1, got {num_classes!r}.')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  check_norm(model.norm, model.norm_kwargs)
  try:
    floating = jnp.issubdtype(jnp.dtype(model.dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise TypeError(f'dtype must be a floating-point dtype (e.g. jnp.float32 '
                    f'or jnp.bfloat16), got {model.dtype!r}.')
  if model.axis_name is not None and not isinstance(model.axis_name,
                                                    (str, tuple)):
    raise TypeError(f'axis_name must be a mapped axis name (str or tuple of '
                    f'str) or None, got {model.axis_name!r}.')


def check_positive_int_attr(model: nn.Module, name: str) -> None:
  """The attribute ``name`` of ``model`` is an int >= 1 (TypeError /
  ValueError naming it, from the one checker in ``bn_jax.core.validation``)."""
  validation.check_positive_int(getattr(model, name), name)


def check_positive_ints_attr(model: nn.Module, name: str, *,
                             non_empty: bool = False) -> None:
  """The attribute ``name`` of ``model`` is a sequence of ints >= 1 (a
  non-empty one with ``non_empty``)."""
  values = getattr(model, name)
  if non_empty and not values:
    raise ValueError(f'{name} must be a non-empty sequence of positive ints, '
                     f'got {values!r}.')
  for i, value in enumerate(values):
    validation.check_positive_int(value, f'{name}[{i}]')


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'sigmoid': nn.sigmoid,
    'relu': nn.relu,
    'tanh': jnp.tanh,
    'gelu': nn.gelu,
    'identity': lambda x: x,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """The nonlinearity called ``name``; ValueError listing the valid names."""
  if not isinstance(name, str) or name not in ACTIVATIONS:
    raise ValueError(f'activation={name!r} is not known; valid choices are '
                     f'{sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]
