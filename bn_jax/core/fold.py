r"""Folding an inference-mode batch norm into the preceding Dense/Conv.

At inference BN is one affine map per output feature (BN paper, section 3.1):

.. math::

   \mathrm{BN}(z) = a \odot z + b,\qquad
   a = \frac{\gamma}{\sqrt{\mathrm{Var}[z] + \epsilon}},\qquad
   b = \beta - a \odot E[z] .

With ``z = x W + c`` (Dense, or a convolution, which is linear in its kernel
per output channel) the composition is one layer with

.. math::

   W' = W \odot a \ (\text{scaled along the output axis}),\qquad
   c' = a \odot (c - E[z]) + \beta .

Works for any kernel whose LAST axis is the output feature axis: flax Dense
``(in, out)``, Conv ``(*window, in // feature_group_count, out)`` (grouped and
depthwise convolutions included, since each output channel has its own slice
of the kernel).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from bn_jax.core import validation
from bn_jax.core.moments import stats_dtype


def _state_entry(state: Any, name: str):
  if isinstance(state, Mapping):
    if name not in state:
      raise ValueError(f"state must have a '{name}' entry (running statistics "
                       f"such as BatchNormState or a batch_stats layer dict), "
                       f"got keys {sorted(state)}.")
    return state[name]
  if not hasattr(state, name):
    raise TypeError(f"state must be a BatchNormState (or a mapping with 'mean' "
                    f"and 'var'), got {type(state).__name__}.")
  return getattr(state, name)


def fold_batch_norm(
    kernel: jax.Array,
    bias: Optional[jax.Array],
    state: Any,
    scale: Optional[jax.Array] = None,
    bn_bias: Optional[jax.Array] = None,
    *,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  """Folds an eval-mode BN (after a Dense/Conv) into that layer's weights.

  Args:
    kernel: the layer's kernel, output features on the last axis (Dense
      ``(in, out)``, Conv ``(..., in, out)``).
    bias: the layer's bias ``(out,)``, or None (no bias: zeros).
    state: the BN's running statistics: a ``BatchNormState`` or a mapping
      with ``mean`` and ``var`` (e.g. ``batch_stats['BatchNorm_0']``), each
      ``(out,)``.
    scale: BN gamma ``(out,)``, or None (``use_scale=False``: ones).
    bn_bias: BN beta ``(out,)``, or None (``use_bias=False``: zeros).
    epsilon: the BN's epsilon (inside the square root).

  Returns:
    ``(folded_kernel, folded_bias)`` in the kernel's dtype (computed in at
    least float32), such that ``layer(x; folded) == BN_eval(layer(x))``.
  """
  validation.check_floating(kernel, "kernel")
  if jnp.ndim(kernel) < 2:
    raise ValueError(f"kernel must have at least 2 dims (..., in, out) with the "
                     f"output features last, got shape {jnp.shape(kernel)}.")
  validation.check_epsilon(epsilon)
  out_features = (jnp.shape(kernel)[-1],)
  mean, var = _state_entry(state, "mean"), _state_entry(state, "var")
  validation.check_feature_shape(mean, out_features, "state.mean")
  validation.check_feature_shape(var, out_features, "state.var")
  validation.check_feature_shape(bias, out_features, "bias")
  validation.check_feature_shape(scale, out_features, "scale")
  validation.check_feature_shape(bn_bias, out_features, "bn_bias")

  dtype = stats_dtype(kernel.dtype)
  multiplier = jax.lax.rsqrt(jnp.asarray(var, dtype) + epsilon)
  if scale is not None:
    multiplier = multiplier * jnp.asarray(scale, dtype)
  folded_kernel = jnp.asarray(kernel, dtype) * multiplier
  folded_bias = -jnp.asarray(mean, dtype)
  if bias is not None:
    folded_bias = folded_bias + jnp.asarray(bias, dtype)
  folded_bias = folded_bias * multiplier
  if bn_bias is not None:
    folded_bias = folded_bias + jnp.asarray(bn_bias, dtype)
  return folded_kernel.astype(kernel.dtype), folded_bias.astype(kernel.dtype)
