"""The MNIST network of the BN paper (Ioffe & Szegedy 2015, Section 4.1).

Flatten -> 3 fully connected hidden layers of 100 units, each
Dense -> norm -> sigmoid -> a 10-way output layer (logits; the softmax belongs
to the loss).

Initialization: the paper says only "small random Gaussian values". Every
weight matrix (hidden and output) is drawn from N(0, kernel_init_std^2) with
``kernel_init_std=0.1`` by default (biases start at 0). With standardized
28x28 inputs a first-layer pre-activation then has standard deviation about
0.1 * sqrt(784) = 2.8, so the sigmoids start in their non-linear range, the
regime that Figure 1(b,c) of the paper looks at. Pass another
``kernel_init_std`` to change it.

Submodule (and ``params``) names, in forward order (``model.layer_names()``;
a params dict that went through jit/grad has sorted keys instead):
``hidden_0``, ``hidden_1``, ..., ``hidden_{L-1}``, ``head``. Each
``hidden_i`` is a :class:`~bn_jax.models.norms.DenseNorm` holding ``dense``
(and ``norm``), or a single ``cbn`` for norm='cbn'. The input of layer i's
sigmoid is sown at ``intermediates/hidden_i/preact`` (a 1-tuple per call).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from bn_jax.models import norms


class MLP(norms.NormSettings):
  """Fully connected classifier: flatten -> [Dense -> norm -> act] x L -> Dense.

  Attributes:
    num_classes: size of the output layer.
    hidden: widths of the hidden layers.
    activation: name of the nonlinearity (see ``norms.ACTIVATIONS``).
    kernel_init_std: standard deviation of the Gaussian weight init.
    norm, norm_kwargs, dtype, axis_name: keyword-only, see
      :class:`~bn_jax.models.norms.NormSettings`.
  """
  num_classes: int = 10
  hidden: Sequence[int] = (100, 100, 100)
  activation: str = 'sigmoid'
  kernel_init_std: float = 0.1

  def __post_init__(self):
    norms.check_model_args(self)
    norms.activation_fn(self.activation)
    norms.check_positive_ints_attr(self, 'hidden')
    if not (isinstance(self.kernel_init_std, (int, float))
            and self.kernel_init_std > 0):
      raise ValueError(f'kernel_init_std must be a number > 0, got '
                       f'{self.kernel_init_std!r}.')
    super().__post_init__()

  def layer_names(self) -> tuple[str, ...]:
    """Top-level submodule (``params``) names in forward order.

    Use this, not the order of a params dict: jit/grad/tree_map return dicts
    with sorted keys ('head' before 'hidden_0').
    """
    return tuple(f'hidden_{i}' for i in range(len(self.hidden))) + ('head',)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """x: [batch, ...] (images are flattened). Returns float32 logits."""
    kernel_init = nn.initializers.normal(stddev=self.kernel_init_std)
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = norms.DenseNorm(
          width, kernel_init=kernel_init,
          activation=norms.activation_fn(self.activation),
          name=f'hidden_{i}', **self.norm_settings())(x, train=train)
    return norms.logits_head(x, self.num_classes, kernel_init=kernel_init)
