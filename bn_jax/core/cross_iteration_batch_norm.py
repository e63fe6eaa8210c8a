r"""Cross-Iteration Batch Normalization (CBN; Yao et al., CVPR 2021).

With small per-step batches the batch statistics are noisy. CBN also uses the
statistics of the last ``k - 1`` training steps. They were computed with older
weights, so each is moved to the current weights ``theta_t`` of the layer that
produced the normalized features, by a first-order Taylor expansion (earlier
layers are ignored, as in the paper). For ``tau = 0 .. k-1`` (``tau = 0`` is
the current batch) and each output channel ``c``:

.. math::

   \mu_{t-\tau}(\theta_t) &= \mu_{t-\tau} + \rho\,\big\langle
       \partial\mu_{t-\tau}/\partial\theta_c,\;
       \theta_{t,c} - \theta_{t-\tau,c}\big\rangle \\
   \nu_{t-\tau}(\theta_t) &= \nu_{t-\tau} + \rho\,\big\langle
       \partial\nu_{t-\tau}/\partial\theta_c,\;
       \theta_{t,c} - \theta_{t-\tau,c}\big\rangle,
       \qquad \nu = E[z^2] \\
   \bar\mu &= \tfrac1k \textstyle\sum_\tau \mu_{t-\tau}(\theta_t),\qquad
   \bar\nu = \tfrac1k \textstyle\sum_\tau
       \max\!\big(\nu_{t-\tau}(\theta_t), \mu_{t-\tau}(\theta_t)^2\big) \\
   \bar\sigma^2 &= \bar\nu - \bar\mu^2,\qquad
   y = \gamma\,(z - \bar\mu)/\sqrt{\bar\sigma^2 + \epsilon} + \beta

where ``z = layer_fn(x, theta)`` (channels on the last axis) and
``<., .>`` sums over the entries of filter ``c`` (``theta[..., c]``).
``rho`` scales the first-order term (``rho = 0``: "naive CBN", plain averaging
of stale statistics). ``aggregation='max'`` is the paper's guard above;
``aggregation='count'`` is the official code's: entries whose compensated
variance ``nu - mu^2`` is negative are dropped and the sums are divided by the
number of entries kept. The current batch is always kept (its variance is >= 0
by construction), so the divisor is >= 1.

Numerics. The variance of the window is ``nu_bar - mu_bar^2`` by definition of
the method: CBN averages *raw* second moments of different batches, so a
``E[z^2] - E[z]^2`` form is inherent to it. We evaluate it in an algebraically
identical but cancellation-free form. Each entry keeps its centered variance
``sigma^2 = nu - mu^2`` (from :func:`bn_jax.core.moments.moments`'s shifted
formula) and its Jacobian ``d sigma^2/d theta = d nu/d theta - 2 mu d mu/d
theta``; then

.. math::

   \nu(\theta_t) - \mu(\theta_t)^2 = \sigma^2 + \rho\langle\partial\sigma^2,
   \Delta\rangle - \rho^2\langle\partial\mu, \Delta\rangle^2, \qquad
   \bar\nu - \bar\mu^2 = \overline{\max(\sigma^2(\theta_t), 0)} +
   \overline{(\mu(\theta_t) - \bar\mu)^2}

(the second identity is the law of total variance). No term of the size of
``mean^2`` is ever subtracted, so the result is accurate when ``|mean| >>
std``. ``CBNState.window_nu`` / ``window_dnu`` give the paper's ``nu`` and
``d nu/d theta`` back.

Gradients. Default (``compensation_grad=True``; new, neither the paper nor
the official code has it): the compensated past statistics are
differentiated with respect to the current weight as well. ``mu_tau(theta_t)``
is linear and ``sigma^2_tau(theta_t)`` quadratic in ``theta_t`` with the
stored Jacobians as coefficients, so the extra gradient is
``rho (g_mu_tau d mu_tau + g_var_tau (d sigma^2_tau - 2 rho <d mu_tau,
Delta> d mu_tau))`` per filter: elementwise work over the window, no extra
convolution; the forward pass is unchanged. With it the per-channel push on
the mean that BN's backward cancels is cancelled by all ``k`` entries, not
only by the current batch's ``1/k`` share. Measured on the digits MLP at 2
examples per step (window 8, lr 0.1, 3 seeds,
``experiments/cbn_compensation_grad.py``): raw-mean drift per 100 steps in
the third hidden layer 0.43 -> 0.08 population std (BN: 0.13), EMA test
accuracy 0.917 -> 0.941 (mean of 3 seeds), |EMA - PreciseBN| 0.015 ->
0.008.

``compensation_grad=False`` gives the official implementation's semantics:
the past entries and the compensation terms are constants
(``stop_gradient``, including the current weights inside ``theta_t -
theta_tau``); gradients flow only through the current batch's ``mu`` and
``sigma^2`` into ``z`` and hence into ``x`` and ``theta``.

Running-statistics momentum. The default is 0.9 (the official code's
PyTorch ``momentum=0.1``), not flax's 0.99. With the official gradient
(``compensation_grad=False``) CBN's gradient reaches the weights only
through the current batch's statistics, with weight ``1/k``:
the per-channel push that BN's backward cancels (under BN the batch sum of
``dL/dz`` is 0 per channel) is cancelled only to ``1/k``, so the raw
pre-normalization means drift several times faster than under BN (digits
MLP, batch 16: 0.70 vs 0.08 population std per 100 steps in the second
hidden layer). The compensated forward hides the drift from the loss, but an
EMA with momentum 0.99 (~100-step memory) cannot follow it and eval
accuracy with the running statistics swings (issue 10: 0.71 mean, 0.44 min
over steps 300-1000 at 0.99; 0.87 / 0.73 at 0.9).

bn_jax, the paper and the official code (Howal/Cross-iterationBatchNorm,
``mmdet/models/utils/CBN.py``):

========================  ====================  ==============  ==========================  ==================================
aspect                    bn_jax default        paper           official code               option to get the official one
========================  ====================  ==============  ==========================  ==================================
running-stat momentum     0.9 (old value)       --              PyTorch 0.1 (= 0.9)         ``momentum=0.9`` (default)
negative compensated var  ``'max'``: clamp      ``max(nu,       drop the entry, divide      ``aggregation='count'``
                          ``sigma^2`` at 0      mu^2)``         by the number kept
current batch, 'count'    always kept           --              dropped if its raw          not reproduced (rounding only;
                                                                ``nu - mu^2`` rounds < 0    0/0 = NaN if all are dropped)
epsilon                   ``sqrt(var + eps)``   inside          ``sqrt(var) + eps``         ``epsilon_on_std=True``
running variance          biased                --              unbiased (torch ``var``)    ``unbiased_running_var=True``
normalization in burn-in  biased (= BN)         BN              unbiased (torch ``var``)    ``unbiased_burn_in_var=True``
window after burn-in      pre-filled (recorded  --              empty, one entry per step   ``window_schedule='empty'``
                          in last k-1 steps)                    (``two_stage=True``)
linear window ramp        --                    --              ``two_stage=False``:        ``window_schedule='linear'``
                                                                ``int((k-1) min(i/B, 1))``
gradient through the      yes (new)             --              no                          ``compensation_grad=False``
compensation
window variance           cancellation-free     ``nu_bar -      ``nu_bar - mu_bar^2``       -- (equal in exact arithmetic)
                                                mu_bar^2``      in float32
========================  ====================  ==============  ==========================  ==================================

``tests/test_cbn_official.py`` checks the official column against a NumPy
port of the official forward (20 steps, both ``two_stage`` settings) and that
each option matters.

Jacobians by autodiff, and why one reverse pass is exact. Channel ``c`` of
``z`` depends on ``theta[..., c]`` only (Dense, and Conv with any
stride/padding/dilation/``feature_group_count``), so ``d mu_c/d theta[..., c']
= 0`` for ``c' != c`` and the gradient of ``sum_c mu_c`` w.r.t. ``theta`` holds
each channel's Jacobian in its own filter: the full ``C x |theta|`` Jacobian
is block diagonal and one vector-Jacobian product with a ones cotangent reads
out all blocks. We build it from two ``jax.vjp`` pullbacks: the statistics'
pullback maps the ones cotangent to ``d(sum_c sigma^2_c)/dz`` (elementwise),
and the layer's pullback w.r.t. ``theta`` maps that to ``theta``-space. Cost:
the layer's weight-gradient (one conv/matmul of the size of the backward
pass's weight gradient; for a convolution on CPU computed tap by tap,
:func:`bn_jax.core.platform.weight_pullback`) plus elementwise work; the
forward ``z`` is shared with the normalization. The mean's Jacobian is, for
``affine_in_x=True`` (any Dense/Conv: affine in ``x`` and applied sample by
sample), taken at the batch-averaged input: ``mean_n layer(x_n) =
layer(mean_n x_n)``, so the Jacobian is exact and costs a weight gradient
over one sample instead of the batch.

Window storage: fixed-size stacked arrays (leading axis ``k - 1``) used as a
ring buffer with a count of valid entries, so a jitted train step never
retraces as the window fills and the update writes one slot in place. For
``k = 1`` the leading axis has size 0 and ``cross_iteration_batch_norm`` *is*
``batch_norm`` (same function, hence identical outputs, gradients and running
statistics; the moments are computed once). The window ``k`` is the state's
(``cbn_state(weight, C, window)``); the ``window=`` argument is only a check.

Burn-in: for the first ``burn_in`` training steps CBN normalizes exactly as
``batch_norm`` (the same shifted statistics and arithmetic). With
``window_schedule='prefill'`` (default) entries ARE recorded during the last
``k - 1`` steps of burn-in, so the window is full at the switch
(``'empty'``/``'linear'``: the official code's schedules, see the table).
Before recording starts, on GPU/TPU, no Jacobian is computed at all
(``lax.cond``), so burn-in costs about what BN costs. On CPU the Jacobians
are computed and discarded during early burn-in instead: XLA:CPU runs the
weight-gradient convolutions inside a ``cond`` branch ~25x slower than at top
level (see :func:`bn_jax.core.platform.compute_if`), which would make every
recording step cost ~10x a BN step. Eval (``train=False``) normalizes with the
running statistics, which are updated from the current batch (flax
convention: ``momentum`` is the weight of the old value), or, with
``compensated_running_stats=True``, from ``mu_bar``/``sigma_bar^2`` once the
window is active.

SyncBN (``axis_name``): the current batch's statistics and their Jacobians are
over all devices (count-weighted): with local counts ``M_d``,
``d sigma_g^2 = sum_d M_d/M_g (d sigma_d^2 + 2 (mu_d - mu_g) d mu_d)`` and
``d mu_g = sum_d M_d/M_g d mu_d`` (exact; ``psum``-ed once), so every device
keeps the same window.

Memory: per layer, ``3 (k - 1)`` weight-sized arrays (``theta``, both
Jacobians) plus ``2 (k - 1) C`` statistics, as the official implementation.
A jitted train step that donates the state updates the window in place (one
slot written per step, no copy of the buffers; see
:func:`bn_jax.core.platform.after`); its
temporaries add one ``(k - 1)|theta|`` array per layer (``theta -
theta_tau``) plus the two current Jacobians.

Cost of a train step (``benchmarks/bench_cbn.py``, ``RESULTS.md``): BN's plus,
per layer, the Jacobians (one weight-gradient convolution over the batch for
``d sigma^2``, one over the batch-mean sample for ``d mu``) and the
compensation (reads ``3 (k - 1)|theta|`` numbers).
"""
from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax.core import platform, validation
from bn_jax.core.batch_norm import BatchNormState, batch_norm_with_moments
from bn_jax.core.common import (affine, check_common, ema_update,
                                normalize_with, running_inputs)
from bn_jax.core.moments import Moments, moments, stats_dtype

AGGREGATIONS = ("max", "count")
WINDOW_SCHEDULES = ("prefill", "empty", "linear")
# The official code's PyTorch momentum 0.1; why: the module docstring.
DEFAULT_MOMENTUM = 0.9


class CBNState(NamedTuple):
  """Running statistics plus the window of the last ``k - 1`` entries.

  Leading axis ``S = k - 1`` of every ``window_*`` array is a ring buffer;
  slots ``0 .. window_count - 1`` are valid and ``window_index`` is the slot
  the next entry overwrites (the oldest once the window is full).

  Attributes:
    mean: running mean, ``(C,)`` (used for eval).
    var: running (biased) variance, ``(C,)``.
    step: number of training steps taken (int32 scalar).
    window_count: number of valid past entries, ``0 .. S`` (int32 scalar).
    window_index: next slot to write (int32 scalar).
    window_weight: ``theta_tau``, ``(S,) + weight.shape``.
    window_mean: ``mu_tau``, ``(S, C)``.
    window_var: ``sigma^2_tau = nu_tau - mu_tau^2`` (centered), ``(S, C)``.
    window_dmean: ``d mu_tau/d theta`` (filter ``c`` in ``[..., c]``),
      ``(S,) + weight.shape``.
    window_dvar: ``d sigma^2_tau/d theta``, ``(S,) + weight.shape``.
  """
  mean: jax.Array
  var: jax.Array
  step: jax.Array
  window_count: jax.Array
  window_index: jax.Array
  window_weight: jax.Array
  window_mean: jax.Array
  window_var: jax.Array
  window_dmean: jax.Array
  window_dvar: jax.Array

  @property
  def window_nu(self) -> jax.Array:
    """The paper's ``nu_tau = E[z^2] = sigma^2_tau + mu_tau^2``, ``(S, C)``."""
    return self.window_var + self.window_mean**2

  @property
  def window_dnu(self) -> jax.Array:
    """The paper's ``d nu_tau/d theta = d sigma^2 + 2 mu d mu``."""
    return self.window_dvar + 2.0 * self.window_mean[
        (slice(None),) + (None,) * (self.window_dmean.ndim - 2) +
        (slice(None),)] * self.window_dmean


def _window_slots(window: int) -> int:
  return window - 1


def cbn_state(weight, num_features: int, window: int,
              dtype=jnp.float32) -> CBNState:
  """Initial CBN state: running mean 0 / var 1 and an empty window.

  Args:
    weight: the layer's weight (array or ``jax.ShapeDtypeStruct``); output
      channels on its last axis. Only its shape and dtype are used.
    num_features: number of output channels ``C`` (= ``weight.shape[-1]``).
    window: ``k >= 1``; the window stores ``k - 1`` past entries (``k = 1``:
      a leading axis of size 0, and CBN is plain BN).
    dtype: dtype of the statistics (keep float32 for bf16 models).
  """
  k = validation.check_positive_int(window, "window")
  c = validation.check_positive_int(num_features, "num_features")
  wshape = tuple(jnp.shape(weight))
  if not wshape or wshape[-1] != c:
    raise ValueError(
        f"weight has shape {wshape} but num_features={c}: the weight's last "
        "axis must be the output features (flax Dense/Conv kernel layout).")
  wdtype = weight.dtype
  s = _window_slots(k)
  zeros_w = jnp.zeros((s,) + wshape, wdtype)
  return CBNState(
      mean=jnp.zeros((c,), dtype), var=jnp.ones((c,), dtype),
      step=jnp.zeros((), jnp.int32), window_count=jnp.zeros((), jnp.int32),
      window_index=jnp.zeros((), jnp.int32),
      window_weight=zeros_w, window_mean=jnp.zeros((s, c), dtype),
      window_var=jnp.zeros((s, c), dtype), window_dmean=zeros_w,
      window_dvar=zeros_w)


def window_of(state: CBNState) -> int:
  """The window ``k`` a state was built for (``k - 1`` stored entries)."""
  return state.window_mean.shape[0] + 1


def _check_args(weight, state, window, burn_in, rho, aggregation,
                window_schedule):
  """Validates the call; returns ``(k, burn_in)`` with ``k`` from the state."""
  if not isinstance(state, CBNState):
    raise TypeError(f"state must be a CBNState (see cbn_state), got "
                    f"{type(state).__name__}.")
  k = window_of(state)
  if window is not None:
    given = validation.check_positive_int(window, "window")
    if given != k:
      raise ValueError(
          f"window={given} but the state holds {k - 1} past entries, i.e. "
          f"window={k} (the window is fixed when the state is built with "
          "cbn_state; omit window= to use the state's).")
  burn_in = validation.check_positive_int(burn_in, "burn_in", minimum=0)
  if validation.is_static_number(rho) and not float(rho) >= 0.0:
    raise ValueError(f"rho must be >= 0 (it scales the first-order "
                     f"compensation; 0 gives naive CBN), got {float(rho)}.")
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got "
                     f"{aggregation!r}.")
  if window_schedule not in WINDOW_SCHEDULES:
    raise ValueError(f"window_schedule must be one of {WINDOW_SCHEDULES}, "
                     f"got {window_schedule!r}.")
  validation.check_floating(weight, "weight")
  c = state.mean.shape[0]
  wshape = tuple(jnp.shape(weight))
  if not wshape or wshape[-1] != c:
    raise ValueError(
        f"weight has shape {wshape}: its last axis (output features) must "
        f"match the state's {c} features.")
  s = _window_slots(k)
  if state.window_weight.shape != (s,) + wshape:
    raise ValueError(
        f"state.window_weight has shape {state.window_weight.shape} but "
        f"a weight of shape {wshape} with the state's window={k} needs "
        f"{(s,) + wshape}; build the state with cbn_state(weight, "
        "num_features, window).")
  return k, burn_in


def _filter_sum(a):
  """Sums ``(S,) + weight.shape`` over every axis but the first and last."""
  return jnp.sum(a, axis=tuple(range(1, a.ndim - 1)))


def _per_channel(v, wndim):
  """``(C,)`` -> shape broadcasting against a weight-shaped array."""
  return v.reshape((1,) * (wndim - 1) + (-1,))



@jax.custom_vjp
def _compensation(weight, window_weight, window_dmean, window_dvar, rho):
  """``(rho <d mu_tau, Delta_tau>, rho <d sigma^2_tau, Delta_tau>)``, each
  ``(S, C)``, with ``Delta_tau = weight - theta_tau`` (all in one dtype)."""
  delta = weight[None] - window_weight
  return (rho * _filter_sum(window_dmean * delta),
          rho * _filter_sum(window_dvar * delta))


def _compensation_fwd(weight, window_weight, window_dmean, window_dvar, rho):
  return (_compensation(weight, window_weight, window_dmean, window_dvar, rho),
          (window_dmean, window_dvar, rho))


def _compensation_bwd(residuals, cotangents):
  """Gradient w.r.t. ``weight`` only (``compensation_grad``):
  ``rho sum_tau (g_1[tau] d mu_tau + g_2[tau] d sigma^2_tau)`` per filter.

  The sum over the window is unrolled into one elementwise expression:
  autodiff's broadcast-multiply-reduce over the leading axis runs ~35x
  slower on XLA:CPU (a 3x3x64x64 kernel, 7 slots: 19.7 ms vs 0.53 ms). The
  window itself is state, never differentiated (None: zero cotangents).
  """
  dmean, dvar, rho = residuals
  g_mean, g_var = cotangents
  g_weight = jnp.zeros(dmean.shape[1:], dmean.dtype)
  for tau in range(dmean.shape[0]):
    g_weight = g_weight + g_mean[tau] * dmean[tau] + g_var[tau] * dvar[tau]
  return rho * g_weight, None, None, None, None


_compensation.defvjp(_compensation_fwd, _compensation_bwd)


def compensate_window(state: CBNState, weight, *, rho=1.0, dtype=None,
                      differentiable: bool = False):
  """The window's statistics moved to ``weight`` (first order, no guard).

  Returns ``(mean, var)``, each ``(S, C)``: for every slot ``tau``,
  ``mu_tau + rho <d mu_tau, Delta>`` and the matching
  ``nu_tau(theta) - mu_tau(theta)^2 = sigma^2_tau + rho <d sigma^2_tau, Delta>
  - (rho <d mu_tau, Delta>)^2`` with ``Delta = weight - theta_tau`` summed over
  each filter (invalid slots are returned too; mask them with
  :func:`window_valid`). ``weight`` is treated as a constant unless
  ``differentiable`` (then gradients flow into it: the result is linear /
  quadratic in ``weight`` with the stored Jacobians as coefficients, so its
  gradient is elementwise work over the window, no layer evaluation).
  """
  dtype = dtype or state.window_mean.dtype
  if not differentiable:
    weight = lax.stop_gradient(weight)
  dmean, dvar = _compensation(
      weight.astype(dtype), state.window_weight.astype(dtype),
      state.window_dmean.astype(dtype), state.window_dvar.astype(dtype),
      jnp.asarray(rho, dtype))
  mean = state.window_mean.astype(dtype) + dmean
  var = state.window_var.astype(dtype) + dvar - dmean * dmean
  return mean, var


def aggregate_window(mean_now, var_now, mean_past, var_past, valid, *,
                     aggregation="max"):
  """``(mu_bar, sigma_bar^2)`` of the current batch and the valid past slots.

  ``aggregation='max'``: every valid slot counts, with its variance clamped at
  0 (the paper's ``max(nu, mu^2)``); ``'count'``: slots with a negative
  variance are dropped (official code). The current batch always counts.
  Computed as the law of total variance (see the module docstring): equal to
  ``nu_bar - mu_bar^2`` without its cancellation.

  Args:
    mean_now, var_now: the current batch's ``(C,)`` mean and variance.
    mean_past, var_past: ``(S, C)`` compensated past statistics.
    valid: ``(S,)`` booleans, the slots that hold an entry.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got "
                     f"{aggregation!r}.")
  valid = jnp.asarray(valid)[:, None]
  if aggregation == "max":
    keep = valid
    var_past = jnp.maximum(var_past, 0.0)
  else:
    keep = valid & (var_past >= 0.0)
  var_past = jnp.where(keep, var_past, 0.0)
  mean_past = jnp.where(keep, mean_past, 0.0)
  keep_f = keep.astype(mean_now.dtype)
  n = 1.0 + jnp.sum(keep_f, axis=0)
  mean_bar = (mean_now + jnp.sum(mean_past, axis=0)) / n
  spread = ((mean_now - mean_bar)**2
            + jnp.sum(keep_f * (mean_past - mean_bar)**2, axis=0)) / n
  var_bar = (var_now + jnp.sum(var_past, axis=0)) / n + spread
  return mean_bar, var_bar


def _device_local(value, axis_name):
  """``value`` typed as varying over ``axis_name`` (shard_map), else as is."""
  axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  aval = jax.typeof(value)
  if hasattr(aval, "mat"):  # jax >= 0.9: manual-axes type
    varying = aval.mat.varying
  elif hasattr(aval, "vma"):
    varying = aval.vma
  else:  # no varying-axes typing (old jax, pmap): gradients stay local
    return value
  missing = tuple(a for a in axes if a not in varying)
  return lax.pcast(value, missing, to="varying") if missing else value


def _jacobians(layer_fn, x, z, weight, mean_g, reduction_axes, *,
               affine_in_x, axis_name, axis_index_groups):
  """``(d mu/d theta, d sigma^2/d theta)``, all channels in one array each.

  Inputs carry no gradient. See the module docstring for why one pullback
  per statistic is exact (block-diagonal Jacobian).
  """
  if axis_name is not None:
    # Differentiate w.r.t. this device's copy of the weight: under shard_map
    # the gradient w.r.t. a replicated (invariant) value would already be
    # psum-ed over the devices, but we want the local Jacobian and combine
    # the devices' ones with their counts below.
    weight = _device_local(weight, axis_name)

  def local_stats(zz):
    m = moments(zz, reduction_axes)
    return jnp.sum(m.var), m

  # Pullback of the statistics (a ones cotangent): d(sum_c sigma^2_c)/dz.
  ct_var, m_local = jax.grad(local_stats, has_aux=True)(z)
  # Pullback of the layer w.r.t. its weight (its forward is dead code here;
  # a convolution's is computed tap by tap on CPU: platform.weight_pullback).
  pull_weight = platform.weight_pullback(layer_fn, x, weight)
  dvar = pull_weight(ct_var)

  def mean_sum_z(zz):
    return jnp.sum(moments(zz, reduction_axes).mean)

  if affine_in_x:
    # mean_n layer(x_n) = layer(mean_n x_n): exact, one sample's worth of work.
    x_bar = jnp.mean(x.astype(stats_dtype(x.dtype)), axis=0,
                     keepdims=True).astype(x.dtype)
    z_bar = layer_fn(x_bar, weight)
    ct_mean = jax.grad(mean_sum_z)(z_bar)
    dmean = platform.weight_pullback(layer_fn, x_bar, weight)(
        ct_mean.astype(z_bar.dtype))
  else:
    ct_mean = jax.grad(mean_sum_z)(z)
    dmean = pull_weight(ct_mean.astype(z.dtype))
  if axis_name is not None:
    # Count-weighted combination of the devices' Jacobians (exact, see the
    # module docstring), one collective for both.
    count_local = m_local.count
    count_global = lax.psum(count_local, axis_name,
                            axis_index_groups=axis_index_groups)
    frac = (count_local / count_global).astype(dmean.dtype)
    mu_gap = (m_local.mean.reshape(-1) - mean_g.reshape(-1)).astype(
        dmean.dtype)
    dvar = frac * (dvar + 2.0 * _per_channel(mu_gap, dvar.ndim) * dmean)
    dmean = frac * dmean
    dmean, dvar = lax.psum((dmean, dvar), axis_name,
                           axis_index_groups=axis_index_groups)
  return dmean, dvar


def window_valid(state: CBNState) -> jax.Array:
  """``(S,)`` booleans: the slots holding one of the newest
  ``window_count`` entries (slot ``window_index - 1`` is the newest)."""
  slots = state.window_mean.shape[0]
  age = (state.window_index - 1 - jnp.arange(slots)) % max(slots, 1)
  return age < state.window_count


class _Schedule(NamedTuple):
  """When a window schedule records entries and normalizes with the window.

  Steps are 0-based (``state.step`` before the update). ``first_record`` and
  ``first_active`` are static; ``capacity(step)`` is the number of entries
  the window may hold after this step's write.
  """
  first_record: int
  first_active: int
  slots: int
  burn_in: int
  linear: bool

  def capacity(self, step):
    if not self.linear or self.burn_in == 0:
      return jnp.asarray(self.slots, step.dtype)
    # The official two_stage=False: int(S * min(iter / burn_in, 1)) with
    # iter = step + 1, in exact integer arithmetic.
    return (self.slots * jnp.minimum(step + 1, self.burn_in)) // self.burn_in


def _schedule(window_schedule: str, burn_in: int, slots: int) -> _Schedule:
  if slots == 0:  # k = 1: nothing to record (the caller never activates)
    return _Schedule(0, 0, 0, burn_in, False)
  if window_schedule == "prefill":  # full window at the switch
    first_record, first_active = max(burn_in - slots, 0), burn_in
  elif window_schedule == "empty":  # official two_stage=True
    first_record = first_active = burn_in
  else:  # "linear", official two_stage=False: capacity > 0 from this step
    first_record = first_active = (-(-burn_in // slots) - 1 if burn_in
                                   else 0)
  return _Schedule(first_record, first_active, slots, burn_in,
                   window_schedule == "linear")


def _inverse_std(var, epsilon, epsilon_on_std):
  """``1 / sqrt(var + eps)``; official code: ``1 / (sqrt(var) + eps)``."""
  if epsilon_on_std:
    return 1.0 / (jnp.sqrt(var) + epsilon)
  return lax.rsqrt(var + epsilon)


class CBNOutput(NamedTuple):
  """What one CBN call produces (fixed arity, train and eval alike).

  Attributes:
    y: the normalized output, ``z``'s shape and dtype.
    state: the new state (``state`` itself in eval mode).
    moments: the current batch's :class:`~bn_jax.core.moments.Moments`
      (train mode; what the PreciseBN hook of the Flax modules stores), None
      in eval mode.
  """
  y: jax.Array
  state: CBNState
  moments: Optional[Moments]


def cross_iteration_batch_norm(
    layer_fn: Callable[[jax.Array, jax.Array], jax.Array],
    weight: jax.Array,
    x: jax.Array,
    state: CBNState,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    train: bool,
    window: Optional[int] = None,
    burn_in: int = 0,
    rho: float = 1.0,
    momentum: float = DEFAULT_MOMENTUM,
    epsilon: float = 1e-5,
    aggregation: str = "max",
    compensated_running_stats: bool = False,
    unbiased_running_var: bool = False,
    affine_in_x: bool = True,
    axis_name=None,
    axis_index_groups=None,
    compensation_grad: bool = True,
    epsilon_on_std: bool = False,
    unbiased_burn_in_var: bool = False,
    window_schedule: str = "prefill",
) -> tuple[jax.Array, CBNState]:
  """Cross-iteration batch-normalizes ``layer_fn(x, weight)``.

  Args:
    layer_fn: ``layer_fn(x, weight) -> z``, the linear map before the norm
      (Dense, or Conv with any stride/padding/dilation/feature groups), with
      output channels on the last axis of ``z`` and channel ``c`` depending
      on ``weight[..., c]`` only. Samples along axis 0 of ``x``.
    weight: the layer's weight, output channels on its last axis.
    x: the layer's input.
    state: ``cbn_state(weight, C, window)``; it fixes the window ``k``.
    scale: optional gamma, ``(C,)``.
    bias: optional beta, ``(C,)``.
    train: CBN statistics + state update (True) or running statistics.
    window: optional check: ``k`` (current batch + ``k - 1`` past); a
      ValueError if it differs from the state's. ``k = 1`` is ``batch_norm``.
    burn_in: plain BN for the first ``burn_in`` training steps (>= 0).
    rho: weight of the first-order compensation, >= 0 (0: naive CBN).
    momentum: weight of the old running value, in [0, 1). Default 0.9 (the
      official code's PyTorch 0.1): CBN's raw pre-normalization statistics
      drift faster than BN's (see the module docstring), and a 0.99 EMA
      (~100-step memory) lags them.
    epsilon: > 0; added to the variance inside the square root, or to the
      standard deviation with ``epsilon_on_std``.
    aggregation: ``'max'`` (paper) or ``'count'`` (official code).
    compensated_running_stats: feed ``mu_bar``/``sigma_bar^2`` (instead of
      the current batch's statistics) to the running statistics once the
      window is active.
    unbiased_running_var: Bessel-correct the current batch's variance before
      it enters the running variance (PyTorch, official code).
    affine_in_x: ``layer_fn`` is affine in ``x`` and per-sample (true for
      Dense/Conv), so ``d mu/d theta`` is computed at the batch-mean input
      (exact, cheaper). Set False for anything else.
    axis_name: SyncBN of the current batch's statistics over this mapped
      axis (count-weighted); the window is then identical on every device.
    axis_index_groups: device groups for SyncBN.
    compensation_grad: differentiate the compensated past statistics with
      respect to the current weight (default; new, neither the paper nor the
      official code does; False: the official gradient). No extra layer
      evaluation; why it is the default: the module docstring.
    epsilon_on_std: normalize by ``sqrt(var) + eps`` (official code) instead
      of ``sqrt(var + eps)``, in train and eval mode.
    unbiased_burn_in_var: normalize with the Bessel-corrected batch variance
      while the window is inactive (official code's plain-BN path).
    window_schedule: ``'prefill'`` (bn_jax: the window is recorded during the
      last ``k - 1`` burn-in steps and full at the switch), ``'empty'``
      (official ``two_stage=True``: recording starts at the switch) or
      ``'linear'`` (official ``two_stage=False``: the window holds up to
      ``floor((k - 1) min((t + 1) / burn_in, 1))`` entries at step ``t``).

  Returns:
    ``(y, new_state)``; ``y`` has ``z``'s shape and dtype; in eval mode
    ``new_state is state``.
  """
  y, new_state, _ = cross_iteration_batch_norm_with_moments(
      layer_fn, weight, x, state, scale, bias, train=train, window=window,
      burn_in=burn_in, rho=rho, momentum=momentum, epsilon=epsilon,
      aggregation=aggregation,
      compensated_running_stats=compensated_running_stats,
      unbiased_running_var=unbiased_running_var, affine_in_x=affine_in_x,
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      compensation_grad=compensation_grad, epsilon_on_std=epsilon_on_std,
      unbiased_burn_in_var=unbiased_burn_in_var,
      window_schedule=window_schedule)
  return y, new_state


def cross_iteration_batch_norm_with_moments(
    layer_fn, weight, x, state, scale=None, bias=None, *, train, window=None,
    burn_in=0, rho=1.0, momentum=DEFAULT_MOMENTUM, epsilon=1e-5,
    aggregation="max", compensated_running_stats=False,
    unbiased_running_var=False, affine_in_x=True, axis_name=None,
    axis_index_groups=None, compensation_grad=True, epsilon_on_std=False,
    unbiased_burn_in_var=False, window_schedule="prefill") -> CBNOutput:
  """:func:`cross_iteration_batch_norm` (same arguments) that also returns
  the current batch's moments: a :class:`CBNOutput` ``(y, state, moments)``
  in both modes (``moments`` None in eval mode).

  The one implementation; internal (not in ``bn_jax.__all__``), as
  ``batch_norm_with_moments``: the Flax modules' PreciseBN hooks store these
  moments without computing them a second time."""
  k, burn_in = _check_args(weight, state, window, burn_in, rho, aggregation,
                           window_schedule)
  z = layer_fn(x, weight)
  c = state.mean.shape[0]
  if jnp.ndim(z) < 1 or z.shape[-1] != c:
    raise ValueError(
        f"layer_fn(x, weight) has shape {jnp.shape(z)}: its last axis must be "
        f"the {c} output features of the state.")
  bn_state = BatchNormState(state.mean, state.var)
  _, reduction_axes, feature_shape, bshape = check_common(
      z, bn_state, scale, bias, axis=-1, momentum=momentum, epsilon=epsilon)
  if not train:
    if epsilon_on_std:
      sdtype = stats_dtype(z.dtype)
      inv = _inverse_std(state.var.astype(sdtype).reshape(bshape), epsilon,
                         True)
      y = affine((z.astype(sdtype) - state.mean.reshape(bshape)) * inv,
                 scale, bias, bshape).astype(z.dtype)
    else:
      y = normalize_with(z, state.mean, state.var, scale, bias,
                         epsilon=epsilon, broadcast_shape=bshape)
    return CBNOutput(y, state, None)
  step = state.step + 1
  if k == 1 and not (epsilon_on_std or unbiased_burn_in_var):
    # CBN with k = 1 is BN: reuse it, bit for bit (moments computed once).
    y, bn_state, m = batch_norm_with_moments(
        z, bn_state, scale, bias, train=True, axis=-1, momentum=momentum,
        epsilon=epsilon, unbiased_running_var=unbiased_running_var,
        axis_name=axis_name, axis_index_groups=axis_index_groups)
    return CBNOutput(y, state._replace(mean=bn_state.mean, var=bn_state.var,
                                       step=step), m)

  m = moments(z, reduction_axes, axis_name=axis_name,
              axis_index_groups=axis_index_groups)
  sdtype = m.mean.dtype
  mean_now = m.mean.reshape(c)
  var_now = m.var.reshape(c)
  slots = state.window_mean.shape[0]
  plan = _schedule(window_schedule, burn_in, slots)

  # --- Compensated past entries and their mix (constants unless
  # compensation_grad). ------------------------------------------------------
  w_now = lax.stop_gradient(weight)
  mean_past, var_past = compensate_window(
      state, weight, rho=rho, dtype=sdtype, differentiable=compensation_grad)
  valid = window_valid(state)
  mean_bar, var_bar = aggregate_window(mean_now, var_now, mean_past, var_past,
                                       valid, aggregation=aggregation)

  # --- Normalize: BN's exact arithmetic before the switch, CBN's after. -----
  # k = 1 (reached here only with an official-code option) never switches:
  # the official code's buffer_num = 0 is its plain-BN path throughout.
  active = (state.step >= plan.first_active if slots
            else jnp.asarray(False))
  var_bn = m.var
  if unbiased_burn_in_var:
    var_bn = var_bn * m.count / jnp.maximum(m.count - 1.0, 1.0)
  offset = jnp.where(active, mean_bar.reshape(bshape) - m.shift,
                     m.shifted_mean)
  var_norm = jnp.where(active, var_bar.reshape(bshape), var_bn)
  mul = _inverse_std(var_norm, epsilon, epsilon_on_std)
  if scale is not None:  # gamma folded into the per-channel multiplier
    mul = mul * jnp.reshape(scale, bshape).astype(mul.dtype)
  y = ((z.astype(sdtype) - m.shift) - offset) * mul
  if bias is not None:
    y = y + jnp.reshape(bias, bshape).astype(y.dtype)
  y = y.astype(z.dtype)
  if slots == 0:  # k = 1 with an official-code option: BN, no window
    run_mean, run_var = running_inputs(m, feature_shape,
                                       unbiased=unbiased_running_var)
    running = ema_update(bn_state, run_mean, run_var, momentum=momentum)
    return CBNOutput(y, state._replace(mean=running.mean, var=running.var,
                                       step=step), m)

  # --- Running statistics. --------------------------------------------------
  run_mean, run_var = running_inputs(m, feature_shape,
                                     unbiased=unbiased_running_var)
  if compensated_running_stats:
    run_mean = jnp.where(active, lax.stop_gradient(mean_bar), run_mean)
    run_var = jnp.where(active, lax.stop_gradient(var_bar), run_var)
  running = ema_update(bn_state, run_mean, run_var, momentum=momentum)

  # --- Record this step's entry (from plan.first_record on). ----------------
  x_c, z_c = lax.stop_gradient(x), lax.stop_gradient(z)
  mean_g = lax.stop_gradient(m.mean)

  def compute():
    dmean, dvar = _jacobians(layer_fn, x_c, z_c, w_now, mean_g,
                             reduction_axes, affine_in_x=affine_in_x,
                             axis_name=axis_name,
                             axis_index_groups=axis_index_groups)
    return (dmean.astype(state.window_dmean.dtype),
            dvar.astype(state.window_dvar.dtype))

  if plan.first_record <= 0:  # always recording: no branch needed
    record = jnp.asarray(True)
    dmean, dvar = compute()
  else:  # skip the Jacobians (the expensive part) before recording starts
    record = state.step >= plan.first_record
    dmean, dvar = platform.compute_if(record, compute, lambda: (
        jnp.zeros_like(w_now, state.window_dmean.dtype),
        jnp.zeros_like(w_now, state.window_dvar.dtype)))
  i = state.window_index
  # Every window buffer was read above (compensation) and is overwritten in
  # place below; make the writes depend on those reads (platform.after).
  reads_done = jnp.sum(lax.stop_gradient(mean_past)) + jnp.sum(
      lax.stop_gradient(var_past))

  def write(buf, entry):
    # Write one slot in place; when not recording, write back what was there.
    new = platform.after(entry.astype(buf.dtype), reads_done)
    if plan.first_record > 0:
      old = lax.dynamic_slice(
          buf, (i,) + (jnp.zeros((), i.dtype),) * new.ndim,
          (1,) + new.shape)[0]
      new = jnp.where(record, new, old)
    return lax.dynamic_update_slice(
        buf, new[None], (i,) + (jnp.zeros((), i.dtype),) * new.ndim)

  count = jnp.minimum(state.window_count + 1, plan.capacity(state.step))
  new_state = CBNState(
      mean=running.mean, var=running.var, step=step,
      window_count=jnp.where(record, count, state.window_count),
      window_index=jnp.where(record, (i + 1) % slots, i),
      window_weight=write(state.window_weight, w_now),
      window_mean=write(state.window_mean, lax.stop_gradient(mean_now)),
      window_var=write(state.window_var, lax.stop_gradient(var_now)),
      window_dmean=write(state.window_dmean, dmean),
      window_dvar=write(state.window_dvar, dvar))
  return CBNOutput(y, new_state, m)
