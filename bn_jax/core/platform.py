"""Workarounds for XLA backends, kept out of the normalization math.

Two helpers the Cross-Iteration BN code calls (``cross_iteration_batch_norm``
reads as math; the reasons for the odd shapes of its program live here):

* :func:`compute_if` -- skip work behind a predicate: ``lax.cond`` on GPU/TPU,
  compute-and-select on CPU (XLA:CPU runs convolutions inside a ``cond``
  branch ~25x slower).
* :func:`after` -- give an in-place buffer write a data dependency on earlier
  reads of that buffer, so XLA updates it in place instead of copying it.

:func:`force_conditional` makes :func:`compute_if` take the ``lax.cond`` path
on every platform, so that path's numbers can be executed (and tested) on a
CPU.
"""
from __future__ import annotations

import contextlib
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
