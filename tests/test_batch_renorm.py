"""batch_renorm against a NumPy float64 reference of Ioffe (2017), its
schedule, its reduction to batch_norm, and r/d as constants for autodiff."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bn_jax import (BatchRenormState, batch_norm, batch_norm_state,
                    batch_renorm, batch_renorm_limits, batch_renorm_state)


def _np_brn(x, mean, var, gamma, beta, r_max, d_max, eps, momentum):
  """One training step of Algorithm 1 (float64), variance EMA (documented)."""
  mu_b = x.mean(0)
  var_b = x.var(0)
  sig_b = np.sqrt(var_b + eps)
  sig = np.sqrt(var + eps)
  r = np.clip(sig_b / sig, 1.0 / r_max, r_max)
  d = np.clip((mu_b - mean) / sig, -d_max, d_max)
  y = gamma * ((x - mu_b) / sig_b * r + d) + beta
  new_mean = momentum * mean + (1 - momentum) * mu_b
  new_var = momentum * var + (1 - momentum) * var_b
  return y, new_mean, new_var, r, d


def _np_limits(t, w, r_final, r_steps, d_final, d_steps):
  """The documented schedule, written independently of the implementation."""
  if t <= w:
    return 1.0, 0.0
  r = r_final if t >= r_steps else 1.0 + (r_final - 1.0) * (t - w) / (
      r_steps - w)
  d = d_final if t >= d_steps else d_final * (t - w) / (d_steps - w)
  return r, d


def test_schedule_values_at_chosen_steps():
  steps = np.array([0, 4999, 5000, 5001, 12500, 25000, 30000, 40000, 10**6])
  r, d = batch_renorm_limits(jnp.asarray(steps))
  expected_r = [1, 1, 1, 1 + 2 / 35000, 1 + 2 * 7500 / 35000,
                1 + 2 * 20000 / 35000, 1 + 2 * 25000 / 35000, 3, 3]
  expected_d = [0, 0, 0, 5 / 20000, 5 * 7500 / 20000, 5, 5, 5, 5]
  np.testing.assert_allclose(r, expected_r, rtol=1e-6)
  np.testing.assert_allclose(d, expected_d, rtol=1e-6, atol=1e-7)
  # A relaxation that ends at the warm-up is a jump there.
  r, d = batch_renorm_limits(jnp.asarray([2, 3]), warmup_steps=3,
                             r_max_steps=3, d_max_steps=3)
  np.testing.assert_allclose(r, [1, 3])
  np.testing.assert_allclose(d, [0, 5])


def test_matches_numpy_reference_over_steps_with_schedule_and_clipping():
  sched = dict(warmup_steps=2, r_max_final=2.0, r_max_steps=6,
               d_max_final=1.0, d_max_steps=4)
  eps, momentum = 1e-3, 0.5
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    step_fn = jax.jit(functools.partial(batch_renorm, train=True,
                                        momentum=momentum, epsilon=eps,
                                        **sched))
    gamma = 1 + 0.2 * rng.normal(size=3)
    beta = 0.3 * rng.normal(size=3)
    state = batch_renorm_state(3, jnp.float64)
    mean, var = np.zeros(3), np.ones(3)
    r_clipped = d_clipped = False
    for t in range(8):
      # Scale and shift swing between steps so the clips engage.
      x = rng.normal(size=(16, 3)) * [0.2, 5.0, 1.0][t % 3] + (-1) ** t * 3
      r_lim, d_lim = _np_limits(t, 2, 2.0, 6, 1.0, 4)
      y_ref, mean, var, r, d = _np_brn(x, mean, var, gamma, beta, r_lim,
                                       d_lim, eps, momentum)
      y, state = step_fn(jnp.asarray(x), state, jnp.asarray(gamma),
                         jnp.asarray(beta))
      np.testing.assert_allclose(y, y_ref, atol=1e-10, err_msg=f"step {t}")
      np.testing.assert_allclose(state.mean, mean, atol=1e-12)
      np.testing.assert_allclose(state.var, var, atol=1e-12)
      assert int(state.step) == t + 1
      r_clipped |= r_lim > 1 and bool(np.any(np.isclose(np.abs(np.log(r)),
                                                        np.log(r_lim))))
      d_clipped |= d_lim > 0 and bool(np.any(np.isclose(np.abs(d), d_lim)))
    assert r_clipped and d_clipped  # the reference exercised both clips


@pytest.mark.parametrize("fixed", [{"r_max": 1.25}, {"d_max": 0.25}],
                         ids=["only_r_max", "only_d_max"])
def test_one_explicit_limit_leaves_the_other_on_its_schedule(fixed):
  """Passing exactly one of r_max / d_max fixes that limit for every step;
  the other still follows its own schedule (documented: an explicit limit
  replaces "the corresponding schedule", not both). Float64 against the
  NumPy reference, so 1e-10 is rounding (O(10) float64 ops) with margin."""
  sched = dict(warmup_steps=1, r_max_final=3.0, r_max_steps=5,
               d_max_final=2.0, d_max_steps=3)
  eps, momentum = 1e-3, 0.5
  rng = np.random.default_rng(7)
  with jax.enable_x64(True):
    step_fn = jax.jit(functools.partial(batch_renorm, train=True,
                                        momentum=momentum, epsilon=eps,
                                        **sched, **fixed))
    state = batch_renorm_state(3, jnp.float64)
    mean, var = np.zeros(3), np.ones(3)
    gamma, beta = np.ones(3), np.zeros(3)
    fixed_limit_bound = other_limit_bound = False
    for t in range(6):
      # Scale and location swing so that |log r| and |d| exceed the limits.
      x = rng.normal(size=(16, 3)) * [0.2, 5.0, 1.0][t % 3] + (-1) ** t * 3
      r_sched, d_sched = _np_limits(t, 1, 3.0, 5, 2.0, 3)
      r_lim = fixed.get("r_max", r_sched)
      d_lim = fixed.get("d_max", d_sched)
      y_ref, mean, var, r, d = _np_brn(x, mean, var, gamma, beta, r_lim,
                                       d_lim, eps, momentum)
      y, state = step_fn(jnp.asarray(x), state, jnp.asarray(gamma),
                         jnp.asarray(beta))
      np.testing.assert_allclose(y, y_ref, atol=1e-10, err_msg=f"step {t}")
      r_bound = bool(np.any(np.isclose(np.abs(np.log(r)), np.log(r_lim))))
      d_bound = d_lim > 0 and bool(np.any(np.isclose(np.abs(d), d_lim)))
      if "r_max" in fixed:
        fixed_limit_bound |= r_bound and r_lim != r_sched
        other_limit_bound |= d_bound
      else:
        fixed_limit_bound |= d_bound and d_lim != d_sched
        other_limit_bound |= r_bound and r_lim > 1
    # The reference used both limits where they differ from the alternatives
    # (the given one where the schedule's is different, the scheduled one
    # while it was active), so swapping either source changes y.
    assert fixed_limit_bound and other_limit_bound


def test_plain_batch_norm_when_rmax_1_dmax_0():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 2, 4)) * 3 + 1, jnp.float32)
  gamma = jnp.asarray(rng.normal(size=4), jnp.float32)
  beta = jnp.asarray(rng.normal(size=4), jnp.float32)
  state = batch_renorm_state(4)._replace(
      mean=jnp.full((4,), 0.7), var=jnp.full((4,), 2.5))
  bn_y, bn_state = batch_norm(x, batch_norm_state(4)._replace(
      mean=state.mean, var=state.var), gamma, beta, train=True)
  # Explicit limits, and the default schedule during warm-up (step 0).
  for kwargs in ({"r_max": 1.0, "d_max": 0.0}, {}):
    y, new = batch_renorm(x, state, gamma, beta, train=True, **kwargs)
    # Two float32 paths to the same numbers (|y| <= ~4): measured 1.1e-7,
    # 2e-6 (~4 ulps of the largest) is >= 10x that; r != 1 or d != 0
    # would move y by O(0.1).
    np.testing.assert_allclose(y, bn_y, atol=2e-6)
    np.testing.assert_allclose(new.mean, bn_state.mean, rtol=1e-6)
    np.testing.assert_allclose(new.var, bn_state.var, rtol=1e-6)
    assert int(new.step) == 1


def test_eval_uses_running_statistics_and_keeps_state():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, 3)).astype(np.float32)
  state = BatchRenormState(jnp.asarray([0.5, -1.0, 2.0]),
                           jnp.asarray([4.0, 0.25, 1.0]),
                           jnp.asarray(7, jnp.int32))
  y, new = batch_renorm(x, state, train=False, epsilon=1e-5)
  assert new is state
  ref = (x - np.array([0.5, -1.0, 2.0])) / np.sqrt(
      np.array([4.0, 0.25, 1.0]) + 1e-5)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_gradient_treats_r_and_d_as_constants():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 3)) * 1.5 + 0.5
  w = rng.normal(size=(6, 3))
  gamma, beta = 1 + 0.3 * rng.normal(size=3), rng.normal(size=3)
  mean, var = np.array([0.3, 0.6, 0.4]), np.array([2.0, 1.5, 3.0])
  eps, r_lim, d_lim = 1e-3, 10.0, 10.0  # wide limits: r, d are not clipped

  _, _, _, r0, d0 = _np_brn(x, mean, var, gamma, beta, r_lim, d_lim, eps, 0.9)
  assert np.all(np.abs(np.log(r0)) < np.log(r_lim))
  assert np.all(np.abs(d0) < d_lim)

  def loss_np(xv, frozen):
    mu_b, sig_b = xv.mean(0), np.sqrt(xv.var(0) + eps)
    if frozen:
      r, d = r0, d0
    else:  # r, d differentiated (what stop_gradient must prevent)
      sig = np.sqrt(var + eps)
      r, d = sig_b / sig, (mu_b - mean) / sig
    return np.sum(w * (gamma * ((xv - mu_b) / sig_b * r + d) + beta))

  def num_grad(frozen, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      e = np.zeros_like(x)
      e[idx] = h
      g[idx] = (loss_np(x + e, frozen) - loss_np(x - e, frozen)) / (2 * h)
    return g

  with jax.enable_x64(True):
    state = BatchRenormState(jnp.asarray(mean), jnp.asarray(var),
                             jnp.asarray(0, jnp.int32))
    grad = jax.jit(jax.grad(lambda xv: jnp.sum(w * batch_renorm(
        xv, state, jnp.asarray(gamma), jnp.asarray(beta), train=True,
        epsilon=eps, r_max=r_lim, d_max=d_lim)[0])))(jnp.asarray(x))
  np.testing.assert_allclose(grad, num_grad(frozen=True), atol=1e-6)
  # The test can fail: differentiating through r and d gives another answer.
  assert np.max(np.abs(num_grad(frozen=False) - num_grad(frozen=True))) > 0.1


def test_check_grads_second_order():
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(5, 3)) * 2 + 1)
    g = jnp.asarray(1 + 0.3 * rng.normal(size=3))
    b = jnp.asarray(rng.normal(size=3))
    # Finite differences see r and d move with x; autodiff (by design) does
    # not. They agree where both clips are active (r, d locally constant):
    # sigma_B / sigma ~ 0.2 < 1 / 1.5 and |mu_B - mu| / sigma ~ 0.9 > 0.5.
    state = BatchRenormState(jnp.asarray([10.0, -10.0, 10.0]),
                             jnp.asarray([100.0, 100.0, 100.0]),
                             jnp.asarray(0, jnp.int32))
    check_grads(jax.jit(lambda x, g, b: batch_renorm(
        x, state, g, b, train=True, r_max=1.5, d_max=0.5)[0]), (x, g, b),
                order=2, modes=("fwd", "rev"))
    # (Eval mode is frozen_batch_norm's affine map, checked there.)


def test_half_precision_keeps_float32_state():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 4)), jnp.bfloat16)
  y, new = batch_renorm(x, batch_renorm_state(4), train=True, r_max=2.0,
                        d_max=1.0)
  assert y.dtype == jnp.bfloat16 and new.mean.dtype == jnp.float32
  assert new.step.dtype == jnp.int32


def test_bad_arguments():
  x = jnp.ones((4, 3))
  state = batch_renorm_state(3)
  cases = [
      (TypeError, "x must be a floating", dict(x=jnp.ones((4, 3), jnp.int32))),
      (ValueError, "momentum must be in", dict(momentum=1.0)),
      (ValueError, "momentum must be in", dict(momentum=-0.1)),
      (ValueError, "epsilon must be > 0", dict(epsilon=0.0)),
      (ValueError, "scale has shape", dict(scale=jnp.ones((4,)))),
      (ValueError, "state.mean has shape", dict(state=batch_renorm_state(4))),
      (ValueError, "r_max must be >= 1", dict(r_max=0.5)),
      (ValueError, "d_max must be >= 0", dict(d_max=-1.0)),
      (ValueError, "r_max_final must be >= 1", dict(r_max_final=0.9)),
      (ValueError, "r_max_steps=10 must be >= warmup_steps",
       dict(warmup_steps=20, r_max_steps=10)),
      (TypeError, "warmup_steps must be an int", dict(warmup_steps=1.5)),
      (ValueError, "train-mode batch norm needs more than 1",
       dict(x=jnp.ones((1, 3)))),
  ]
  for error, message, kwargs in cases:
    args = dict(x=x, state=state, scale=None)
    args.update(kwargs)
    with pytest.raises(error, match=message):
      batch_renorm(args.pop("x"), args.pop("state"), args.pop("scale"),
                   train=True, **args)
