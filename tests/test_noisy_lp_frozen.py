"""noisy_batch_norm, lp_norm and frozen_batch_norm against NumPy float64
references, batch_norm, finite differences and argument checks."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bn_jax import (BatchNormState, LpNormState, batch_norm, batch_norm_state,
                    frozen_batch_norm, lp_norm, lp_norm_state,
                    noisy_batch_norm)


EPS_F32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def _assert_f32_close(got, ref, ulps=32):
  """Two float32 computations of the same quantity (different op orders):
  within ``ulps`` float32 ulps of the largest magnitude of ``ref``. Each
  side is a reduction over <= 8 values and a few elementwise ops (a few
  ulps; <= 6e-7 absolute at |y| ~ 3 measured under SSE4.2/AVX/AVX2);
  32 ulps is >= 10x that."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  err = np.max(np.abs(got - ref))
  assert err <= ulps * EPS_F32 * np.max(np.abs(ref)), err


def _data(shape, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * 1.7 + 0.4).astype(np.float32)


# ----------------------------------------------------------------- noisy BN


def _noise(x, key, **kwargs):
  """The noise noisy_batch_norm added on top of batch_norm (same settings)."""
  y, state = noisy_batch_norm(x, batch_norm_state(x.shape[-1]), key=key,
                              train=True, **kwargs)
  y_bn, bn_state = batch_norm(x, batch_norm_state(x.shape[-1]), train=True)
  # The state update is batch norm's: the noise does not enter the EMA.
  np.testing.assert_allclose(state.mean, bn_state.mean, atol=1e-7)
  np.testing.assert_allclose(state.var, bn_state.var, atol=1e-7)
  return np.asarray(y, np.float64) - np.asarray(y_bn, np.float64)


def test_noise_has_documented_step_varying_distribution():
  x = _data((4096, 8))
  n = x.shape[0]
  sampling = 4.0 / np.sqrt(n)  # 4 standard errors (std <= 1.5 here)
  per_step = []
  for step in range(2):
    noise = _noise(x, jax.random.key(step))
    mean_f, std_f = noise.mean(0), noise.std(0)
    # Default ranges: mean ~ U(-1, 1), std ~ U(0.5, 1.5) per feature.
    assert np.all(np.abs(mean_f) <= 1.0 + 1.5 * sampling)
    assert np.all((std_f >= 0.5 - 2 * sampling) & (std_f <= 1.5 + 2 * sampling))
    # Non-zero mean and non-unit variance (not standard noise).
    assert np.max(np.abs(mean_f)) > 0.2
    assert np.max(np.abs(std_f - 1.0)) > 0.1
    per_step.append(mean_f)
  # Re-drawn every step: another key gives another per-feature mean.
  assert np.max(np.abs(per_step[0] - per_step[1])) > 10 * sampling

  # Custom ranges are honoured (they do not contain the standard values).
  noise = _noise(x, jax.random.key(7), noise_mean_range=(2.0, 3.0),
                 noise_std_range=(0.1, 0.2))
  assert np.all((noise.mean(0) > 2.0 - 0.1) & (noise.mean(0) < 3.0 + 0.1))
  assert np.all((noise.std(0) > 0.1 - 0.02) & (noise.std(0) < 0.2 + 0.02))
  # Per activation: i.i.d. within a feature, i.e. not one shift per feature.
  assert np.all(noise.std(0) > 0.05)


def test_affine_noise_rescales_and_shifts_each_feature():
  """noise_form='affine': per step, each feature's BN output is mapped by
  one line y = s_f * y_bn + m_f with s_f, m_f from their ranges (no
  per-activation noise), and another key draws another line."""
  x = _data((256, 6))
  state = batch_norm_state(6)
  gamma = np.linspace(0.5, 1.5, 6).astype(np.float32)
  beta = np.linspace(-0.3, 0.3, 6).astype(np.float32)
  y_bn = np.asarray(batch_norm(x, state, gamma, beta, train=True)[0],
                    np.float64)
  lines = []
  for step in range(2):
    y, new_state = noisy_batch_norm(
        x, state, gamma, beta, key=jax.random.key(step), train=True,
        noise_form="affine", noise_mean_range=(-0.5, 0.5),
        noise_std_range=(0.8, 1.2))
    assert new_state.mean.shape == (6,)
    y = np.asarray(y, np.float64)
    # Least squares in float64, per feature: slope s_f, intercept m_f.
    design = np.stack([y_bn, np.ones_like(y_bn)], -1)  # [N, F, 2]
    coef = np.stack([np.linalg.lstsq(design[:, f], y[:, f], rcond=None)[0]
                     for f in range(6)])
    slope, intercept = coef[:, 0], coef[:, 1]
    fit = y_bn * slope + intercept
    # Exactly affine: the residual is float32 rounding of |y| <= ~6 values.
    assert np.max(np.abs(fit - y)) <= 32 * EPS_F32 * np.max(np.abs(y))
    assert np.all((slope >= 0.8 - 1e-5) & (slope <= 1.2 + 1e-5)), slope
    assert np.all(np.abs(intercept) <= 0.5 + 1e-5), intercept
    assert np.max(np.abs(slope - 1.0)) > 0.02  # not the identity
    assert np.max(np.abs(intercept)) > 0.05  # shifted
    lines.append(coef)
  assert np.max(np.abs(lines[0] - lines[1])) > 0.02  # re-drawn per step
  # The additive form with the same ranges is not affine in y_bn.
  y_add = np.asarray(noisy_batch_norm(
      x, state, gamma, beta, key=jax.random.key(0), train=True,
      noise_mean_range=(-0.5, 0.5), noise_std_range=(0.8, 1.2))[0])
  assert np.std(y_add - y_bn, axis=0).min() > 0.5


def test_noisy_same_key_same_output_and_no_noise_in_eval():
  x = _data((16, 3, 4))
  state = batch_norm_state(4)._replace(mean=jnp.full((4,), 0.3))
  key = jax.random.key(3)
  y1, _ = noisy_batch_norm(x, state, key=key, train=True)
  y2, _ = noisy_batch_norm(x, state, key=key, train=True)
  np.testing.assert_array_equal(y1, y2)
  y_eval, s_eval = noisy_batch_norm(x, state, key=None, train=False)
  y_bn, _ = batch_norm(x, state, train=False)
  np.testing.assert_array_equal(y_eval, y_bn)
  assert s_eval is state
  # Eval ignores the key: same output with a key.
  y_eval_k, _ = noisy_batch_norm(x, state, key=key, train=False)
  np.testing.assert_array_equal(y_eval_k, y_bn)


def test_noisy_check_grads_second_order():
  with jax.enable_x64(True):
    x = jnp.asarray(_data((6, 3)), jnp.float64)
    g = jnp.asarray([1.2, 0.8, 1.0])
    b = jnp.asarray([0.1, -0.2, 0.3])
    key = jax.random.key(0)
    check_grads(jax.jit(lambda x, g, b: noisy_batch_norm(
        x, batch_norm_state(3, jnp.float64), g, b, key=key, train=True)[0]),
                (x, g, b), order=2, modes=("fwd", "rev"))
    # The affine form scales the BN output by s_f: first order suffices to
    # see its gradient (the second order is batch norm's, checked above).
    check_grads(jax.jit(lambda x, g, b: noisy_batch_norm(
        x, batch_norm_state(3, jnp.float64), g, b, key=key, train=True,
        noise_form="affine")[0]), (x, g, b), order=1, modes=("rev",))


def test_noisy_bad_arguments():
  x = jnp.ones((4, 3))
  state = batch_norm_state(3)
  with pytest.raises(ValueError, match="needs a PRNG `key`"):
    noisy_batch_norm(x, state, train=True)
  with pytest.raises(ValueError, match="noise_std_range must be non-negative"):
    noisy_batch_norm(x, state, key=jax.random.key(0), train=True,
                     noise_std_range=(-1.0, 1.0))
  with pytest.raises(ValueError, match="noise_mean_range=.*low <= high"):
    noisy_batch_norm(x, state, key=jax.random.key(0), train=True,
                     noise_mean_range=(1.0, -1.0))
  with pytest.raises(ValueError, match="noise_form must be one of"):
    noisy_batch_norm(x, state, key=jax.random.key(0), train=True,
                     noise_form="multiplicative")
  with pytest.raises(TypeError, match="noise_mean_range must be a pair"):
    noisy_batch_norm(x, state, key=jax.random.key(0), train=True,
                     noise_mean_range=0.5)
  with pytest.raises(TypeError, match="x must be a floating"):
    noisy_batch_norm(jnp.ones((4, 3), jnp.int32), state,
                     key=jax.random.key(0), train=True)
  with pytest.raises(ValueError, match="momentum must be in"):
    noisy_batch_norm(x, state, key=jax.random.key(0), train=True,
                     momentum=1.5)


# ------------------------------------------------------------------ lp_norm


def _np_lp(x, p, eps, axes=(0,)):
  """Train-mode l_p normalization in float64 (no affine) and n_p."""
  x = np.asarray(x, np.float64)
  c = x - x.mean(axes, keepdims=True)
  if p == 1:
    n = np.abs(c).mean(axes, keepdims=True)
  elif p == 2:
    n = np.sqrt((c ** 2).mean(axes, keepdims=True))
  else:
    n = np.abs(c).max(axes, keepdims=True)
  return c / np.sqrt(n ** 2 + eps), n


@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_lp_norm_matches_numpy(p):
  x = _data((6, 2, 3), seed=1)
  rng = np.random.default_rng(2)
  gamma, beta = 1 + 0.3 * rng.normal(size=3), rng.normal(size=3)
  eps, momentum = 1e-3, 0.8
  with jax.enable_x64(True):
    state = LpNormState(jnp.asarray([0.1, 0.2, 0.3]),
                        jnp.asarray([1.5, 0.5, 2.0]))
    step = jax.jit(functools.partial(lp_norm, p=p, epsilon=eps,
                                     momentum=momentum),
                   static_argnames="train")
    y, new = step(jnp.asarray(x, jnp.float64), state, jnp.asarray(gamma),
                  jnp.asarray(beta), train=True)
    x_hat, n = _np_lp(x, math.inf if p == "inf" else p, eps, axes=(0, 1))
    np.testing.assert_allclose(y, x_hat * gamma + beta, atol=1e-12)
    np.testing.assert_allclose(
        new.mean, 0.8 * np.array([0.1, 0.2, 0.3]) + 0.2 * x.astype(
            np.float64).mean((0, 1)), atol=1e-12)
    np.testing.assert_allclose(
        new.norm, 0.8 * np.array([1.5, 0.5, 2.0]) + 0.2 * n.reshape(3),
        atol=1e-12)
    # Eval: running mean and norm, state unchanged.
    y_eval, same = step(jnp.asarray(x, jnp.float64), new, jnp.asarray(gamma),
                        jnp.asarray(beta), train=False)
    np.testing.assert_array_equal(same.mean, new.mean)
    np.testing.assert_array_equal(same.norm, new.norm)
    ref = (x - np.asarray(new.mean)) / np.sqrt(np.asarray(new.norm) ** 2 +
                                               eps) * gamma + beta
    np.testing.assert_allclose(y_eval, ref, atol=1e-12)


def test_lp_norm_p2_is_batch_norm():
  x = _data((8, 5), seed=3)
  gamma, beta = jnp.linspace(0.5, 1.5, 5), jnp.linspace(-1, 1, 5)
  y, st = lp_norm(x, lp_norm_state(5), gamma, beta, train=True, p=2.0)
  y_bn, bn_st = batch_norm(x, batch_norm_state(5), gamma, beta, train=True)
  _assert_f32_close(y, y_bn)
  _assert_f32_close(st.mean, bn_st.mean)
  # p=2's running norm is the EMA of sigma_B (documented), not of var_B.
  sigma_b = np.asarray(x, np.float64).std(0)
  np.testing.assert_allclose(st.norm, 0.99 + 0.01 * sigma_b, rtol=1e-6)
  # Eval with norm = sqrt(var) is batch-norm inference.
  bn_state = BatchNormState(jnp.asarray([0.1, 0, 0, 0, 0.5]),
                            jnp.asarray([2.0, 1, 3, 1, 0.5]))
  y_eval, _ = lp_norm(x, LpNormState(bn_state.mean, jnp.sqrt(bn_state.var)),
                      gamma, beta, train=False)
  y_bn_eval, _ = batch_norm(x, bn_state, gamma, beta, train=False)
  _assert_f32_close(y_eval, y_bn_eval)


def test_half_precision_outputs():
  x = jnp.asarray(_data((8, 4), seed=9), jnp.bfloat16)
  for p in (1, 2, "inf"):
    y, st = lp_norm(x, lp_norm_state(4), train=True, p=p)
    assert y.dtype == jnp.bfloat16 and st.norm.dtype == jnp.float32
    ref, _ = _np_lp(np.asarray(x.astype(jnp.float32)), math.inf if p == "inf"
                    else p, 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.05)
  y, st = noisy_batch_norm(x, batch_norm_state(4), key=jax.random.key(0),
                           train=True)
  assert y.dtype == jnp.bfloat16 and st.var.dtype == jnp.float32


def test_lp_norm_accepts_inf_spellings_and_mask_and_axis_name():
  x = _data((6, 4), seed=4)
  ref, _ = lp_norm(x, lp_norm_state(4), train=True, p="inf")
  for p in (math.inf, float("inf"), np.inf, "INF"):
    y, _ = lp_norm(x, lp_norm_state(4), train=True, p=p)
    np.testing.assert_array_equal(y, ref)
  for p in (1, "inf"):
    # mask: the statistics of the kept rows only.
    mask = np.array([1, 1, 0, 1, 0, 1], bool)[:, None]
    y_m, s_m = lp_norm(x, lp_norm_state(4), train=True, p=p, mask=mask)
    y_k, s_k = lp_norm(x[mask[:, 0]], lp_norm_state(4), train=True, p=p)
    _assert_f32_close(y_m[mask[:, 0]], y_k)
    _assert_f32_close(s_m.norm, s_k.norm)
    # axis_name: two shards of 3 rows give the statistics of all 6 rows.
    shard = jax.vmap(lambda xs: lp_norm(xs, lp_norm_state(4), train=True, p=p,
                                        axis_name="d")[0], axis_name="d")
    y_s = shard(x.reshape(2, 3, 4)).reshape(6, 4)
    y_all, _ = lp_norm(x, lp_norm_state(4), train=True, p=p)
    _assert_f32_close(y_s, y_all)


def test_lp_norm_check_grads_second_order():
  with jax.enable_x64(True):
    x = jnp.asarray(_data((5, 3), seed=5), jnp.float64)
    g = jnp.asarray([1.2, 0.8, 1.0])
    b = jnp.asarray([0.1, -0.2, 0.3])
    for p in (1, 2, "inf"):
      check_grads(jax.jit(lambda x, g, b, p=p: lp_norm(
          x, lp_norm_state(3, jnp.float64), g, b, train=True, p=p,
          epsilon=1e-3)[0]), (x, g, b), order=2, modes=("fwd", "rev"))


def test_lp_norm_bad_arguments():
  x = jnp.ones((4, 3))
  state = lp_norm_state(3)
  for p in (3, 0, "two", True, -math.inf, None):
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
      lp_norm(x, state, train=True, p=p)
  with pytest.raises(TypeError, match="x must be a floating"):
    lp_norm(jnp.ones((4, 3), jnp.int32), state, train=True)
  with pytest.raises(ValueError, match="scale has shape"):
    lp_norm(x, state, jnp.ones((2,)), train=True)
  with pytest.raises(ValueError, match="state.norm has shape"):
    lp_norm(x, LpNormState(jnp.zeros(3), jnp.ones(4)), train=True)
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    lp_norm(x, state, train=True, epsilon=0.0)
  with pytest.raises(ValueError, match="momentum must be in"):
    lp_norm(x, state, train=True, momentum=1.0)
  with pytest.raises(ValueError, match="momentum must be in"):
    lp_norm(x, state, train=True, momentum=-0.5)


# ------------------------------------------------------------ frozen BN


def test_frozen_equals_batch_norm_eval_and_keeps_state():
  x = _data((4, 3, 3, 5), seed=6)
  state = BatchNormState(jnp.linspace(-1, 1, 5), jnp.linspace(0.5, 2.0, 5))
  gamma, beta = jnp.linspace(0.5, 1.5, 5), jnp.linspace(-1, 1, 5)
  y_bn, _ = batch_norm(x, state, gamma, beta, train=False)
  for train in (True, False):
    y, new = frozen_batch_norm(x, state, gamma, beta, train=train)
    assert new is state
    np.testing.assert_array_equal(y, y_bn)
  ref = (x - np.asarray(state.mean)) / np.sqrt(np.asarray(state.var) + 1e-5)
  np.testing.assert_allclose(y, ref * np.asarray(gamma) + np.asarray(beta),
                             atol=1e-5)
  y16, _ = frozen_batch_norm(x.astype(jnp.bfloat16), state, gamma, beta)
  assert y16.dtype == jnp.bfloat16


def test_frozen_gradients_through_affine_map_only():
  x = _data((4, 3), seed=7)
  w = _data((4, 3), seed=8)
  mean, var = jnp.asarray([0.5, -0.5, 1.0]), jnp.asarray([2.0, 0.5, 1.0])
  gamma, beta = jnp.asarray([1.5, 0.5, 1.0]), jnp.asarray([0.1, 0.2, 0.3])

  def loss(x, g, b, mean, var):
    return jnp.sum(w * frozen_batch_norm(x, BatchNormState(mean, var), g,
                                         b)[0])

  gx, gg, gb, gm, gv = jax.grad(loss, argnums=range(5))(x, gamma, beta, mean,
                                                        var)
  inv = 1 / np.sqrt(np.asarray(var) + 1e-5)
  np.testing.assert_allclose(gx, w * np.asarray(gamma) * inv, rtol=1e-6)
  np.testing.assert_allclose(
      gg, np.sum(w * (x - np.asarray(mean)) * inv, 0), rtol=1e-5)
  np.testing.assert_allclose(gb, w.sum(0), rtol=1e-6)
  np.testing.assert_array_equal(gm, 0.0)  # statistics are frozen
  np.testing.assert_array_equal(gv, 0.0)
  with jax.enable_x64(True):
    state = BatchNormState(jnp.asarray([0.5, -0.5, 1.0]),
                           jnp.asarray([2.0, 0.5, 1.0]))
    check_grads(jax.jit(lambda x, g, b: frozen_batch_norm(
        x, state, g, b)[0]), (jnp.asarray(x, jnp.float64),
                              jnp.asarray([1.5, 0.5, 1.0]),
                              jnp.asarray([0.1, 0.2, 0.3])),
                order=2, modes=("fwd", "rev"))


def test_frozen_bad_arguments():
  x = jnp.ones((4, 3))
  state = batch_norm_state(3)
  with pytest.raises(TypeError, match="x must be a floating"):
    frozen_batch_norm(jnp.ones((4, 3), jnp.int32), state)
  with pytest.raises(ValueError, match="bias has shape"):
    frozen_batch_norm(x, state, None, jnp.ones((4,)))
  with pytest.raises(ValueError, match="state.var has shape"):
    frozen_batch_norm(x, BatchNormState(jnp.zeros(3), jnp.ones(2)))
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    frozen_batch_norm(x, state, epsilon=-1.0)
