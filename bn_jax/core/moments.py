r"""Per-feature mean and variance: the one reduction every normalization shares.

Why a shifted one-pass formula
------------------------------
The textbook one-pass variance ``E[x^2] - E[x]^2`` (flax's
``use_fast_variance=True``) cancels catastrophically when ``|mean| >> std``:
in float32, at ``|mean| = 1e4 * std`` both terms are ~1e8 std^2 and their
difference is pure rounding noise. The two-pass formula ``E[(x - E[x])^2]`` is
exact but reads ``x`` twice.

We use the *shifted* one-pass formula with a per-feature pivot ``K`` taken from
the data itself (the first sample along the reduced axes, gradient stopped):

.. math::

   d = x - K,\qquad \bar d = E[d],\qquad
   \mathrm{mean} = K + \bar d,\qquad \mathrm{var} = E[d^2] - \bar d^2 .

Because ``K`` is a sample, ``|d|`` is of the order of the spread of the data,
so the subtraction ``E[d^2] - \bar d^2`` loses no more precision than a
two-pass variance, while ``E[d]`` and ``E[d^2]`` are sibling reductions of the
same elementwise input that XLA fuses into one pass. Normalizing with
``(x - K) - \bar d`` instead of ``x - mean`` keeps the output accurate too
(``x - K`` is exact in floating point for nearby values, Sterbenz's lemma).

Mathematically ``K`` cancels, so gradients equal those of the textbook
formula; ``K`` carries ``stop_gradient`` so autodiff does not trace through it.

Across devices (SyncBN, ``axis_name``) the sums and the sample count are
``psum``-ed, so devices holding different numbers of samples are weighted by
their counts, and the pivot is the ``pmean`` of the devices' pivots so that
every device shifts by the same value. With a ``mask`` the first sample could
be padding, so the pivot is the masked mean itself (one extra reduction): the
"corrected two-pass" algorithm, whose second pass re-measures the pivot's
rounding error as ``E[x - K]``.

Statistics are computed in at least float32 (bf16/f16 inputs are upcast).

Complex inputs (batch norm only, as flax): the mean is complex and the
variance is the real ``E[|x - mean|^2]``, with the same shifted sums
``var = E[|d|^2] - |E[d]|^2``; ``|v|^2 = Re(v)^2 + Im(v)^2``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax


class Moments(NamedTuple):
  """Per-feature statistics of one reduction.

  Attributes:
    mean: E[x] per feature, in ``stats_dtype(x)`` (complex for complex x).
    var: biased variance E[|x - mean|^2] per feature, real
      (``real_dtype(stats_dtype(x))``).
    count: number of samples that entered each feature's statistics
      (a scalar, or per feature when a mask is used), after any ``psum``.
    shift: the pivot K the sums were taken around.
    shifted_mean: E[x - K]; ``(x - shift) - shifted_mean`` is the accurate
      centering (``mean - shift`` would re-introduce the rounding of ``mean``).
  """
  mean: jax.Array
  var: jax.Array
  count: jax.Array
  shift: jax.Array
  shifted_mean: jax.Array


def stats_dtype(dtype) -> jnp.dtype:
  """float32 for half-precision inputs, else the input's own float dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
  """The real dtype of ``dtype``'s components: float32 for complex64."""
  return jnp.finfo(dtype).dtype


def abs_sq(v: jax.Array) -> jax.Array:
  """``|v|^2`` elementwise, real: ``v * v``, or ``Re(v)^2 + Im(v)^2``."""
  if jnp.iscomplexobj(v):
    return lax.square(lax.real(v)) + lax.square(lax.imag(v))
  return v * v


def _pivot(x: jax.Array, reduction_axes: Sequence[int]) -> jax.Array:
  """First element along every reduced axis, kept with size-1 dims."""
  k = x
  for a in reduction_axes:
    k = lax.slice_in_dim(k, 0, 1, axis=a)
  return lax.stop_gradient(k)


def moments(
    x: jax.Array,
    reduction_axes: Sequence[int],
    *,
    mask: Optional[jax.Array] = None,
    axis_name=None,
    axis_index_groups=None,
) -> Moments:
  """Mean and biased variance of ``x`` over ``reduction_axes`` (keepdims).

  Args:
    x: floating (or complex) input; it is upcast to at least float32.
    reduction_axes: the axes to reduce (non-negative ints).
    mask: optional boolean array broadcastable to ``x``; only True entries
      enter the statistics.
    axis_name: if given, the statistics are over the union of all devices'
      samples along this mapped axis (SyncBN), weighted by sample count.
    axis_index_groups: optional device groups for the cross-device reduction.

  Returns:
    ``Moments`` whose arrays keep the reduced axes with size 1, so they
    broadcast against ``x``.
  """
  dtype = stats_dtype(x.dtype)
  count_dtype = real_dtype(dtype)  # counts and variances are real
  xf = x.astype(dtype)
  axes = tuple(reduction_axes)

  def psum(v):
    if axis_name is None:
      return v
    return lax.psum(v, axis_name, axis_index_groups=axis_index_groups)

  if mask is not None:
    m = jnp.broadcast_to(mask, x.shape)
    mf = m.astype(count_dtype)
    count = psum(jnp.sum(mf, axes, keepdims=True))
    safe_count = jnp.maximum(count, 1.0)
    # Corrected two-pass (Chan, Golub & LeVeque): a first masked mean is the
    # pivot (a sample could be padding), then the same shifted sums as below.
    # The pivot's own rounding (~eps * |mean|) cancels: it is re-measured by
    # E[x - pivot], which is small and therefore accurate.
    shift = lax.stop_gradient(psum(jnp.sum(jnp.where(m, xf, 0.0), axes,
                                           keepdims=True)) /
                              safe_count)
    d = jnp.where(m, xf - shift, 0.0)
    sum_d, sum_d2 = psum((jnp.sum(d, axes, keepdims=True),
                          jnp.sum(abs_sq(d), axes, keepdims=True)))
    mean_d = sum_d / safe_count
    var = jnp.maximum(sum_d2 / safe_count - abs_sq(mean_d), 0.0)
    return Moments(shift + mean_d, var, count, shift, mean_d)

  local_count = 1
  for a in axes:
    local_count *= x.shape[a]
  count = psum(jnp.asarray(local_count, count_dtype))
  shift = _pivot(xf, axes)
  if axis_name is not None:
    shift = lax.pmean(shift, axis_name, axis_index_groups=axis_index_groups)
  d = xf - shift
  sum_d = jnp.sum(d, axes, keepdims=True)
  sum_d2 = jnp.sum(abs_sq(d), axes, keepdims=True)
  sum_d, sum_d2 = psum((sum_d, sum_d2))  # one collective for both sums
  mean_d = sum_d / count
  # The clamp only removes rounding-level negatives; see the module docstring.
  var = jnp.maximum(sum_d2 / count - abs_sq(mean_d), 0.0)
  return Moments(shift + mean_d, var, count, shift, mean_d)


def centered(x: jax.Array, m: Moments) -> jax.Array:
  """``x - mean`` computed as ``(x - shift) - E[x - shift]`` (accurate)."""
  xf = x.astype(m.mean.dtype)
  return (xf - m.shift) - m.shifted_mean
