"""Workarounds for XLA backends, kept out of the normalization math.

Two helpers the Cross-Iteration BN code calls (``cross_iteration_batch_norm``
reads as math; the reasons for the odd shapes of its program live here):

* :func:`compute_if` -- skip work behind a predicate: ``lax.cond`` on GPU/TPU,
  compute-and-select on CPU (XLA:CPU runs convolutions inside a ``cond``
  branch ~25x slower).
* :func:`after` -- give an in-place buffer write a data dependency on earlier
  reads of that buffer, so XLA updates it in place instead of copying it.
* :func:`weight_pullback` -- a layer's vector-Jacobian product w.r.t. its
  weight, with a convolution's weight gradient computed as one matrix product
  per kernel tap on CPU (XLA:CPU's own weight-gradient convolution is its
  slowest convolution).

:func:`force_conditional` makes :func:`compute_if` take the ``lax.cond`` path
on every platform, so that path's numbers can be executed (and tested) on a
CPU.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Callable, Iterator, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

T = TypeVar("T")

_local = threading.local()


def _forced() -> bool:
  return getattr(_local, "force_conditional", False)


@contextlib.contextmanager
def force_conditional(enabled: bool = True) -> Iterator[None]:
  """Within the block, :func:`compute_if` lowers to ``lax.cond`` everywhere.

  The choice is made when a function is traced: jit (or re-trace) inside the
  block. Thread-local, restored on exit. Used by the tests to execute the
  GPU/TPU branch of CBN on a CPU; costs speed only (see :func:`compute_if`).
  """
  previous = _forced()
  _local.force_conditional = bool(enabled)
  try:
    yield
  finally:
    _local.force_conditional = previous


def compute_if(pred: jax.Array, compute: Callable[[], T],
               skip: Callable[[], T]) -> T:
  """``compute()`` if ``pred`` else ``skip()``, skipping the work off CPU.

  On GPU/TPU this is ``lax.cond``: early in CBN's burn-in the Jacobians are
  not computed at all. On CPU it computes unconditionally and selects,
  because XLA:CPU canonicalizes convolutions to its fast (Eigen/oneDNN/
  YNNPACK) layout only in the entry computation (``ConvCanonicalization``
  visits ``module->entry_computation()`` only): the weight-gradient
  convolutions of the Jacobians inside a ``cond`` branch (or a ``while``
  body) fall back to XLA's naive loop emitter, ~25x slower (a 32x16x16x8 3x3
  weight gradient: 0.85 ms at top level, 17-24 ms inside ``lax.cond``), which
  made a CBN train step with ``burn_in > window - 1`` ~11x a BN step once
  recording started (the small CIFAR ResNet of
  ``experiments/cbn_small_batch.py``, batch 32). Computing the Jacobians
  during burn-in costs far less than that. ``lax.platform_dependent``
  resolves the choice at lowering time, so the compiled CPU program contains
  no conditional. Both branches return the same numbers (``where`` selects
  ``compute()``'s exact values), which a test checks by forcing the
  ``cond`` path on CPU (:func:`force_conditional`).
  """
  def on_cpu():
    taken, skipped = compute(), skip()
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), taken, skipped)

  def elsewhere():
    return lax.cond(pred, compute, skip)

  if _forced():
    return elsewhere()
  return lax.platform_dependent(cpu=on_cpu, default=elsewhere)


def after(value: jax.Array, token: jax.Array) -> jax.Array:
  """``value``, made data-dependent on the scalar ``token`` (same numbers).

  CBN's window buffers are read (compensation) and then overwritten one slot
  in place with ``dynamic_update_slice``. When nothing orders the write
  after the reads, XLA's copy insertion must keep the old buffer alive and
  copies every window buffer (in a ``jax.grad`` train step: twice, ~2 x 3
  (k-1) |W| bytes written per step); ``lax.optimization_barrier`` does not
  help on CPU (it is expanded away before copy insertion). Adding
  ``0 * token`` (``token`` computed from the reads; a float ``0 * t`` is not
  folded by XLA, as it would be NaN for ``t = inf``) gives the write a true
  data dependency on the reads, and the update happens in place. ``token``
  is zeroed when not finite, so ``value`` is returned unchanged.
  """
  token = lax.stop_gradient(token)
  token = jnp.where(jnp.isfinite(token), token, jnp.zeros_like(token))
  return value + (jnp.zeros((), value.dtype) * token.astype(value.dtype))


def weight_pullback(layer_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    x: jax.Array, weight: jax.Array
                    ) -> Callable[[jax.Array], jax.Array]:
  """``ct -> d <ct, layer_fn(x, w)> / d w`` at ``w = weight`` (a VJP).

  Equal to ``jax.vjp(lambda w: layer_fn(x, w), weight)[1]`` up to float
  summation order. When ``layer_fn(x, .)`` is a single
  ``lax.conv_general_dilated`` (flax's ``Conv`` without bias and dtype
  promotion is; no feature/batch groups, no input dilation), the weight
  gradient on CPU is computed tap by tap: for each kernel position ``t``,
  ``dW[t] = X_t^T G`` with ``X_t`` the input rows that tap reads (one strided
  slice of the padded input, ``(N * out_positions, C_in)``) and ``G`` the
  cotangent ``(N * out_positions, C_out)``. XLA:CPU emits the weight gradient
  as a convolution whose "kernel" is the whole output cotangent, a
  contraction Eigen runs far below peak (a 32x32x16 -> 16 3x3 layer at batch
  32: ~12.5 ms against ~8.6 ms tap by tap; batch 128: ~295 ms against ~75 ms
  on the 2-core CPU of benchmarks/RESULTS.md, bench_weight_gradient). Other
  platforms, and any other layer, use XLA's own transpose
  (``lax.platform_dependent``, resolved at lowering: the CPU program holds no
  conditional).
  """
  _, xla_pull = jax.vjp(lambda w: layer_fn(x, w), weight)

  def xla(ct):
    return xla_pull(ct)[0]

  conv = _single_convolution(layer_fn, x, weight)
  if conv is None:
    return xla
  lhs, params = conv

  def by_taps(ct):
    return conv_weight_gradient_by_taps(lhs, ct, weight.shape, params)

  def pull(ct):
    return lax.platform_dependent(ct, cpu=by_taps, default=xla)

  return pull


def _single_convolution(layer_fn, x, weight):
  """``(lhs, conv params)`` when ``w -> layer_fn(x, w)`` is exactly one
  supported ``conv_general_dilated`` of a closed-over input, else None."""
  closed = jax.make_jaxpr(lambda w: layer_fn(x, w))(weight)
  jaxpr = closed.jaxpr
  if len(jaxpr.eqns) != 1:
    return None
  eqn, = jaxpr.eqns
  if eqn.primitive is not lax.conv_general_dilated_p:
    return None
  lhs_var, rhs_var = eqn.invars
  if (rhs_var is not jaxpr.invars[0] or eqn.outvars[0] is not jaxpr.outvars[0]
      or lhs_var not in jaxpr.constvars):
    return None
  params = eqn.params
  if (params["feature_group_count"] != 1 or params["batch_group_count"] != 1
      or any(d != 1 for d in params["lhs_dilation"])
      or params["preferred_element_type"] is not None):
    return None
  lhs = closed.consts[jaxpr.constvars.index(lhs_var)]
  if jnp.dtype(lhs.dtype) != jnp.dtype(weight.dtype):
    return None
  return lhs, params


def conv_weight_gradient_by_taps(lhs: jax.Array, ct: jax.Array,
                                 weight_shape, params) -> jax.Array:
  """Weight gradient of ``conv_general_dilated(lhs, W, **params)`` for the
  output cotangent ``ct``, one ``(N*P, C_in)^T (N*P, C_out)`` product per
  kernel tap (see :func:`weight_pullback`). ``params`` are the primitive's
  (explicit padding, dimension numbers as index tuples)."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  spatial = len(lhs_spec) - 2
  # (N, spatial..., C) and (N, out_spatial..., O).
  x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  g = jnp.transpose(ct, (out_spec[0], *out_spec[2:], out_spec[1]))
  c_in, c_out = x.shape[-1], g.shape[-1]
  kernel = [weight_shape[d] for d in rhs_spec[2:]]
  strides = params["window_strides"]
  dilation = params["rhs_dilation"]
  out_size = g.shape[1:-1]
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in
                                       params["padding"]] + [(0, 0, 0)])
  g2 = g.reshape(-1, c_out)
  taps = []
  for tap in itertools.product(*(range(k) for k in kernel)):
    start = [t * d for t, d in zip(tap, dilation)]
    limit = [s0 + s * (o - 1) + 1 for s0, s, o in zip(start, strides,
                                                        out_size)]
    rows = lax.slice(xp, [0, *start, 0], [xp.shape[0], *limit, c_in],
                     [1, *strides, 1])
    taps.append(lax.dot_general(rows.reshape(-1, c_in), g2,
                                (((0,), (0,)), ((), ())),
                                precision=params["precision"]))
  # (taps, C_in, C_out) -> (kernel..., C_in, C_out) -> the weight's layout.
  dw = jnp.stack(taps).reshape(*kernel, c_in, c_out)
  axis_of = {rhs_spec[0]: spatial + 1, rhs_spec[1]: spatial}
  axis_of.update({d: i for i, d in enumerate(rhs_spec[2:])})
  return jnp.transpose(dw, [axis_of[d] for d in range(spatial + 2)])
