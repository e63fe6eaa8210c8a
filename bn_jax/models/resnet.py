"""CIFAR ResNets: ResNet-20 (He et al. 2016, Section 4.2) and ResNet-18 (the
common CIFAR adaptation of the ImageNet ResNet-18, e.g. kuangliu/pytorch-cifar).

Both: a 3x3 stem convolution (stride 1) -> norm -> ReLU, stages of
:class:`BasicBlock` (two 3x3 conv -> norm, ReLU between them and after the
residual addition), global average pooling and one Dense output layer. The
first block of every stage but the first halves the spatial size (stride 2)
and doubles the channels. A norm follows every convolution.

* ResNet-20: 3 stages of 3 blocks, 16/32/64 channels (``width=16``), and
  option-A shortcuts by default, as in the paper's CIFAR experiments: when the
  shape changes the shortcut subsamples the input (stride 2) and zero-pads the
  new channels (half before, half after), so it has no parameters
  (0.27M parameters in total with 10 classes). ``shortcut='B'`` uses a
  1x1 conv -> norm projection where the shape changes instead.
* ResNet-18: 4 stages of 2 blocks, 64/128/256/512 channels (``width=64``),
  projection shortcuts (1x1 conv stride 2 -> norm, option B) where the shape
  changes (11.2M parameters with 10 classes).

``width`` scales the stage widths (width, 2*width, ...) for tiny tests.
Convolutions use He-normal init (fan_in); the output layer LeCun-normal.

Names in forward order: ``stem``, ``stage{s}_block{b}`` (s, b from 0), ``head``.
Inside a block: ``conv1``, ``conv2``, ``shortcut`` (projection only), each a
:class:`~bn_jax.models.norms.ConvNorm` (``conv``/``norm`` or ``cbn``). Sown
ReLU inputs: ``intermediates/stem/preact``,
``intermediates/stage{s}_block{b}/conv1/preact`` and, after the residual
addition, ``intermediates/stage{s}_block{b}/preact``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_jax.models import norms

SHORTCUTS = ('A', 'B')


class BasicBlock(norms.NormSettings):
  """Two 3x3 conv -> norm layers with a residual connection.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the shortcut).
    shortcut: 'A' (parameter-free: subsample + zero-pad channels) or 'B'
      (1x1 conv -> norm projection), used only when the shape changes.
    norm, norm_kwargs, dtype, axis_name: keyword-only, see
      :class:`~bn_jax.models.norms.NormSettings`.
  """
  features: int
  strides: int = 1
  shortcut: str = 'B'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    common = self.norm_settings()
    y = norms.ConvNorm(self.features, (3, 3), strides=self.strides,
                       activation=nn.relu, name='conv1', **common)(
                           x, train=train)
    y = norms.ConvNorm(self.features, (3, 3), name='conv2', **common)(
        y, train=train)
    in_features = x.shape[-1]
    if self.strides == 1 and in_features == self.features:
      residual = x
    elif self.shortcut == 'B':
      residual = norms.ConvNorm(self.features, (1, 1), strides=self.strides,
                                name='shortcut', **common)(x, train=train)
    else:  # option A
      if self.features < in_features:
        raise ValueError(f"shortcut='A' cannot reduce channels "
                         f'({in_features} -> {self.features}).')
      residual = x[:, ::self.strides, ::self.strides, :]
      extra = self.features - in_features
      residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0),
                                    (extra // 2, extra - extra // 2)))
    z = y + residual.astype(y.dtype)
    self.sow('intermediates', 'preact', z)
    return nn.relu(z)


class CifarResNet(norms.NormSettings):
  """ResNet for 32x32 images (3x3 stem, no stem max-pool).

  Attributes:
    num_classes: output size.
    stage_sizes: blocks per stage; stage s has ``width * 2**s`` channels.
    width: channels of the stem and the first stage.
    shortcut: 'A' or 'B' (see :class:`BasicBlock`).
    norm, norm_kwargs, dtype, axis_name: keyword-only, see
      :class:`~bn_jax.models.norms.NormSettings`.
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (3, 3, 3)
  width: int = 16
  shortcut: str = 'A'

  def __post_init__(self):
    norms.check_model_args(self)
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f'shortcut={self.shortcut!r} is not known; valid '
                       f'choices are {SHORTCUTS}.')
    norms.check_positive_int_attr(self, 'width')
    norms.check_positive_ints_attr(self, 'stage_sizes', non_empty=True)
    super().__post_init__()

  def layer_names(self) -> tuple[str, ...]:
    """Top-level submodule (``params``) names in forward order (not the
    sorted order of a params dict after jit: 'head' < 'stage0_block0')."""
    return (('stem',) + tuple(
        f'stage{s}_block{b}' for s, n in enumerate(self.stage_sizes)
        for b in range(n)) + ('head',))

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """x: NHWC images. Returns float32 logits [batch, num_classes]."""
    if x.ndim != 4:
      raise ValueError(f'CifarResNet expects NHWC images (4 dims), got shape '
                       f'{x.shape}.')
    common = self.norm_settings()
    x = norms.ConvNorm(self.width, (3, 3), activation=nn.relu, name='stem',
                       **common)(x, train=train)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = BasicBlock(self.width * 2**stage,
                       strides=2 if stage > 0 and block == 0 else 1,
                       shortcut=self.shortcut,
                       name=f'stage{stage}_block{block}',
                       **common)(x, train=train)
    # Average in float32: the pooled features feed the float32 head.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return norms.logits_head(x, self.num_classes)
