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

import flax.linen as nn
import jax

from bn_jax.models import norms


class DeepLinear(norms.NormSettings):
  """Deep linear network with an optional norm between layers.

  Attributes:
    num_classes: output size.
    depth: number of weight matrices (hidden layers + output layer), >= 1.
    width: hidden width.
    norm, norm_kwargs, dtype, axis_name: keyword-only, see
      :class:`~bn_jax.models.norms.NormSettings`.
  """
  num_classes: int = 10
  depth: int = 25
  width: int = 100

  def __post_init__(self):
    norms.check_model_args(self)
    for name in ('depth', 'width'):
      norms.check_positive_int_attr(self, name)
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
          self.width, activation=norms.ACTIVATIONS['identity'],
          name=f'layer_{i}', **self.norm_settings())(x, train=train)
    return norms.logits_head(x, self.num_classes)
