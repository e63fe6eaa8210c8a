r"""Frozen batch norm (FrozenBN) as a pure function.

Batch norm whose statistics are fixed: in BOTH modes

.. math::

   y = \gamma \frac{x - \mu}{\sqrt{\mathrm{var} + \epsilon}} + \beta

with ``mu``, ``var`` the given ``BatchNormState`` (typically population
statistics from a trained BN layer or from PreciseBN), and the state is
returned unchanged. This is what detection backbones use, and the
train-test-consistent fine-tuning remedy of Wu & Johnson (2021, Sec. 4 of
PAPERS.md). It equals ``batch_norm(..., train=False)``.

Gradients: the statistics are constants (``stop_gradient``), so gradients
flow to ``x``, ``scale`` and ``bias`` through the per-feature affine map only;
freezing ``scale``/``bias`` as well is the optimizer's business (or pass
``lax.stop_gradient(scale)``).
"""
from __future__ import annotations

from typing import Optional

import jax
from jax import lax

from bn_jax.core.batch_norm import BatchNormState
from bn_jax.core.common import check_common, normalize_with


def frozen_batch_norm(
    x: jax.Array,
    state: BatchNormState,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    train: bool = True,
    axis=-1,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, BatchNormState]:
  """Normalizes ``x`` with the fixed statistics of ``state``; ``(y, state)``.

  Args:
    x: floating input, any rank. bf16/f16 inputs are normalized in float32
      and ``y`` is returned in the input dtype.
    state: fixed statistics (``BatchNormState``), feature-shaped.
    scale: optional gamma, feature-shaped.
    bias: optional beta, feature-shaped.
    train: unused (FrozenBN computes the same in both modes); accepted so all
      normalizations are interchangeable.
    axis: the feature axis or axes.
    epsilon: added to the variance inside the square root, > 0.

  Returns:
    ``(y, state)`` with the state object returned unchanged.
  """
  del train  # same computation in both modes
  _, _, _, bshape = check_common(x, state, scale, bias, axis=axis,
                                 momentum=None, epsilon=epsilon)
  y = normalize_with(x, lax.stop_gradient(state.mean),
                     lax.stop_gradient(state.var), scale, bias,
                     epsilon=epsilon, broadcast_shape=bshape)
  return y, state
