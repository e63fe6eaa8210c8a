"""Models with the normalization as a configuration choice.

Example::

  import jax, jax.numpy as jnp
  from bn_jax.models import create_model

  model = create_model('resnet20', num_classes=10, norm='gn',
                       norm_kwargs={'num_groups': 8})
  x = jnp.zeros((8, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0),
                          'noise': jax.random.key(1)}, x, train=False)
  logits, updates = model.apply(variables, x, train=True,
                                mutable=['batch_stats'],
                                rngs={'noise': jax.random.key(2)})

Models: 'mlp', 'vgg', 'resnet20', 'resnet18', 'deep_linear' (:data:`MODELS`);
norms: :data:`NORMS` (see :mod:`bn_jax.models.norms`). Every model has
``layer_names()``: its top-level parameter names in forward order (for
per-layer analysis; a params dict that went through jit has sorted keys). The
input of every nonlinearity is sown as ``intermediates/<layer path>/preact``
(``mutable=['intermediates']``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp

from bn_jax.models import norms
from bn_jax.models.deep_linear import DeepLinear
from bn_jax.models.mlp import MLP
from bn_jax.models.norms import NORMS, ConvNorm, DenseNorm
from bn_jax.models.resnet import BasicBlock, CifarResNet
from bn_jax.models.vgg import VGG, VGG_CONFIGS

# name -> (class, fixed configuration, keyword arguments the user may set)
_REGISTRY = {
    'mlp': (MLP, {}, ('hidden', 'activation', 'kernel_init_std')),
    'vgg': (VGG, {}, ('variant', 'width_multiplier', 'classifier_hidden')),
    'resnet20': (CifarResNet, dict(stage_sizes=(3, 3, 3), width=16,
                                   shortcut='A'), ('width', 'shortcut')),
    'resnet18': (CifarResNet, dict(stage_sizes=(2, 2, 2, 2), width=64,
                                   shortcut='B'), ('width', 'shortcut')),
    'deep_linear': (DeepLinear, {}, ('depth', 'width')),
}
MODELS = tuple(_REGISTRY)


def _freeze(value):
  """Lists -> tuples, so that model attributes are hashable."""
  return tuple(value) if isinstance(value, list) else value


def create_model(name: str, *, num_classes: int, norm: str = 'bn',
                 norm_kwargs: Optional[Mapping[str, Any]] = None,
                 dtype: Any = jnp.float32, axis_name: Optional[str] = None,
                 **model_kwargs):
  """Builds the model ``name`` with the normalization ``norm``.

  Args:
    name: one of :data:`MODELS`.
    num_classes: size of the output layer.
    norm: one of :data:`NORMS`.
    norm_kwargs: constructor arguments of the norm module (e.g.
      ``{'num_groups': 8}``, ``{'window': 4, 'burn_in': 100}``,
      ``{'ghost_batch_size': 4}``, ``{'p': 1}``, ``{'momentum': 0.9}``).
    dtype: activation dtype (e.g. ``jnp.bfloat16``); parameters and batch
      statistics stay float32 and the logits are float32.
    axis_name: mapped axis for cross-device batch statistics (SyncBN).
    **model_kwargs: 'mlp': hidden, activation, kernel_init_std;
      'vgg': variant, width_multiplier, classifier_hidden;
      'resnet20'/'resnet18': width, shortcut; 'deep_linear': depth, width.

  Returns:
    A Flax module; call it as ``model.apply(variables, x, train=...)``.

  Raises:
    ValueError: unknown model name, model keyword, norm or norm_kwargs key
      (all checked here, before any compute).
  """
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f'model name={name!r} is not known; valid choices are '
                     f'{", ".join(repr(m) for m in MODELS)}.')
  cls, fixed, allowed = _REGISTRY[name]
  unknown = sorted(set(model_kwargs) - set(allowed))
  if unknown:
    raise ValueError(f'unknown keyword argument(s) {unknown} for model '
                     f'{name!r}; valid ones are {list(allowed)}.')
  norm_kwargs = norms.check_norm(norm, norm_kwargs)
  kwargs = dict(fixed)
  kwargs.update({k: _freeze(v) for k, v in model_kwargs.items()})
  return cls(num_classes=num_classes, norm=norm,
             norm_kwargs=norm_kwargs or None, dtype=dtype,
             axis_name=axis_name, **kwargs)


__all__ = [
    'MODELS', 'NORMS', 'create_model', 'norms', 'ConvNorm', 'DenseNorm',
    'MLP', 'VGG', 'VGG_CONFIGS', 'CifarResNet', 'BasicBlock', 'DeepLinear',
]
