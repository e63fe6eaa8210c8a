"""Deep linear network (Santurkar et al. 2018, Section 3 / PAPERS.md).

Flatten -> ``depth - 1`` Dense layers of ``width`` units -> a Dense output
layer: ``depth`` weight matrices in all and no nonlinearity, so the network
computes a linear (affine) map of its input; the loss landscape is still
non-convex in the weights. With a norm, every hidden Dense is followed by it
("norm between layers"); with norm='none' the Dense layers have biases (the
rule of :mod:`bn_jax.models.norms`).

The paper's depth (~25) and width are unverified; both are arguments
(defaults ``depth=25``, ``width=100``). Weights use LeCun-normal init
(variance 1/fan_in), which keeps the activation scale roughly constant with
depth in a linear network.

Names in forward order: ``layer_0`` ... ``layer_{depth-2}``, ``head``. Although
there is no nonlinearity, each hidden layer's output (the identity's input) is
sown at ``intermediates/layer_i/preact`` so the analysis tools work unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_jax.models import norms


class DeepLinear(nn.Module):
  """Deep linear network with an optional norm between layers.

  Attributes:
    num_classes: output size.
    depth: number of weight matrices (hidden layers + output layer), >= 1.
    width: hidden width.
    norm, norm_kwargs, dtype, axis_name: see :mod:`bn_jax.models.norms`.
  """
  num_classes: int = 10
  depth: int = 25
  width: int = 100
  norm: str = 'bn'
  norm_kwargs: Optional[Mapping[str, Any]] = None
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  def __post_init__(self):
    norms.check_model_args(self)
    for name in ('depth', 'width'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be an int >= 1, got {value!r}.')
    super().__post_init__()

  def layer_names(self) -> tuple[str, ...]:
    """Top-level submodule (``params``) names in forward order (not the
    sorted order of a params dict after jit)."""
    return tuple(f'layer_{i}' for i in range(self.depth - 1)) + ('head',)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """x: [batch, ...] (flattened). Returns float32 outputs [batch, classes]."""
    x = x.reshape((x.shape[0], -1))
    for i in range(self.depth - 1):
      x = norms.DenseNorm(
          self.width, norm=self.norm, norm_kwargs=self.norm_kwargs,
          dtype=self.dtype, axis_name=self.axis_name,
          activation=norms.ACTIVATIONS['identity'],
          name=f'layer_{i}')(x, train=train)
    return norms.logits_head(x, self.num_classes)
