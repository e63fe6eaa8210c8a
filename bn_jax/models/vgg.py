"""VGG for CIFAR-10, as used by Santurkar et al. (2018) to compare networks
with and without BatchNorm.

The convolutional part is Simonyan & Zisserman's configuration A/B/D/E
(VGG-11/13/16/19): stacks of 3x3 convolutions (stride 1, 'SAME' padding) ->
norm -> ReLU, with 2x2 max-pooling (stride 2) between the stacks. On 32x32
inputs the five poolings leave a 1x1x512 map, which is flattened into the
classifier. The classifier is the common CIFAR one (e.g. kuangliu/pytorch-
cifar): a single Dense(512 -> num_classes) by default; ``classifier_hidden``
adds hidden Dense -> norm -> ReLU layers before it (e.g. (512, 512) for the
VGG-A classifier of several BN-landscape reproductions). No dropout.

Max-pooling uses 'SAME' padding: identical to PyTorch's floor-mode pooling on
even sizes (32 -> 16 -> 8 -> 4 -> 2 -> 1) and it keeps tiny test images (a
1x1 map stays 1x1) valid.

``width_multiplier`` scales every channel count and hidden width (rounded,
at least 1), for tiny test versions.

Names in forward order: ``conv_0`` ... ``conv_{n-1}`` (ConvNorm blocks with
``conv``/``norm`` or ``cbn``), ``fc_0`` ... (hidden classifier layers),
``head``. Each ReLU's input is sown at ``intermediates/<block>/preact``.
Convolutions use He-normal init (fan_in).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from bn_jax.models import norms

# Integers are 3x3 conv output channels; 'M' is a 2x2 max-pool.
VGG_CONFIGS = {
    'vgg11': (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    'vgg13': (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512,
              512, 'M'),
    'vgg16': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512,
              'M', 512, 512, 512, 'M'),
    'vgg19': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512,
              512, 512, 'M', 512, 512, 512, 512, 'M'),
}


def scaled_width(width: int, multiplier: float) -> int:
  return max(1, int(round(width * multiplier)))


class VGG(norms.NormSettings):
  """CIFAR VGG with the normalization chosen by name.

  Attributes:
    num_classes: output size.
    variant: one of ``VGG_CONFIGS`` ('vgg11', 'vgg13', 'vgg16', 'vgg19').
    width_multiplier: scales every channel count / hidden width.
    classifier_hidden: widths of hidden Dense layers before the output layer.
    norm, norm_kwargs, dtype, axis_name: keyword-only, see
      :class:`~bn_jax.models.norms.NormSettings`.
  """
  num_classes: int = 10
  variant: str = 'vgg11'
  width_multiplier: float = 1.0
  classifier_hidden: Sequence[int] = ()

  def __post_init__(self):
    norms.check_model_args(self)
    if self.variant not in VGG_CONFIGS:
      raise ValueError(f'variant={self.variant!r} is not known; valid choices '
                       f'are {sorted(VGG_CONFIGS)}.')
    if not (isinstance(self.width_multiplier, (int, float))
            and self.width_multiplier > 0):
      raise ValueError(f'width_multiplier must be a number > 0, got '
                       f'{self.width_multiplier!r}.')
    norms.check_positive_ints_attr(self, 'classifier_hidden')
    super().__post_init__()

  def layer_names(self) -> tuple[str, ...]:
    """Top-level submodule (``params``) names in forward order (not the
    sorted order of a params dict after jit: 'conv_10' < 'conv_2')."""
    num_convs = sum(item != 'M' for item in VGG_CONFIGS[self.variant])
    return (tuple(f'conv_{i}' for i in range(num_convs))
            + tuple(f'fc_{i}' for i in range(len(self.classifier_hidden)))
            + ('head',))

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """x: NHWC images. Returns float32 logits [batch, num_classes]."""
    if x.ndim != 4:
      raise ValueError(f'VGG expects NHWC images (4 dims), got shape '
                       f'{x.shape}.')
    common = dict(activation=nn.relu, **self.norm_settings())
    conv_index = 0
    for item in VGG_CONFIGS[self.variant]:
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
      else:
        x = norms.ConvNorm(scaled_width(item, self.width_multiplier),
                           (3, 3), name=f'conv_{conv_index}',
                           **common)(x, train=train)
        conv_index += 1
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.classifier_hidden):
      x = norms.DenseNorm(scaled_width(width, self.width_multiplier),
                          name=f'fc_{i}', **common)(x, train=train)
    return norms.logits_head(x, self.num_classes)
