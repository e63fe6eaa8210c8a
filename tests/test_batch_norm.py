"""Tests of bn_jax.batch_norm against independent references.

References: the BN paper's closed-form backward pass and forward pass written
in NumPy float64, jax.test_util.check_grads (finite differences),
flax.linen.BatchNorm and torch.nn.BatchNorm{1,2}d.
"""
import functools

import chex
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bn_jax
from bn_jax import batch_norm, batch_norm_state

# ---------------------------------------------------------------------------
# NumPy float64 references (independent of the code under test)
# ---------------------------------------------------------------------------


def _reduction_axes(ndim, feature_axes):
  feature_axes = tuple(a % ndim for a in np.atleast_1d(feature_axes))
  return tuple(i for i in range(ndim) if i not in feature_axes), feature_axes


def _per_feature(p, ndim, feature_axes):
  """Reshapes a feature-shaped parameter to broadcast against the input."""
  shape = [1] * ndim
  for a, s in zip(feature_axes, np.shape(p)):
    shape[a] = s
  return np.reshape(p, shape)


def np_batch_norm(x, gamma=None, beta=None, *, eps, feature_axes=-1):
  """Algorithm 1 of the BN paper in float64: y, batch mean, batch var."""
  x = np.asarray(x, np.float64)
  axes, feature_axes = _reduction_axes(x.ndim, feature_axes)
  mu = x.mean(axes, keepdims=True)
  var = ((x - mu)**2).mean(axes, keepdims=True)
  y = (x - mu) / np.sqrt(var + eps)
  if gamma is not None:
    y = y * _per_feature(np.asarray(gamma, np.float64), x.ndim, feature_axes)
  if beta is not None:
    y = y + _per_feature(np.asarray(beta, np.float64), x.ndim, feature_axes)
  return y, np.squeeze(mu, axes), np.squeeze(var, axes)


def np_batch_norm_backward(dy, x, gamma, *, eps, feature_axes=-1):
  """The BN paper's closed-form backward pass (section 3), float64."""
  x = np.asarray(x, np.float64)
  axes, feature_axes = _reduction_axes(x.ndim, feature_axes)
  m = np.prod([x.shape[a] for a in axes])
  g = _per_feature(np.asarray(gamma, np.float64), x.ndim, feature_axes)
  mu = x.mean(axes, keepdims=True)
  var = ((x - mu)**2).mean(axes, keepdims=True)
  x_hat = (x - mu) / np.sqrt(var + eps)
  dx_hat = dy * g
  dvar = np.sum(dx_hat * (x - mu), axes, keepdims=True) * -0.5 * (
      var + eps)**-1.5
  dmu = (np.sum(-dx_hat / np.sqrt(var + eps), axes, keepdims=True) +
         dvar * np.sum(-2.0 * (x - mu), axes, keepdims=True) / m)
  dx = dx_hat / np.sqrt(var + eps) + dvar * 2.0 * (x - mu) / m + dmu / m
  dgamma = np.sum(dy * x_hat, axes)
  dbeta = np.sum(dy, axes)
  return dx, dgamma, dbeta


def _data(shape, seed=0, loc=0.5, spread=2.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (loc + spread * rng.standard_normal(shape)).astype(dtype)


def _params(c, seed=1, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return ((1.0 + 0.3 * rng.standard_normal(c)).astype(dtype),
          (0.2 * rng.standard_normal(c)).astype(dtype))


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 5), (3, 4, 4, 2)],
                         ids=["dense_NC", "conv_NHWC"])
def test_grad_matches_closed_form_backward(shape):
  eps = 1e-3
  with jax.enable_x64(True):
    x = _data(shape, dtype=np.float64)
    gamma, beta = _params(shape[-1], dtype=np.float64)
    w = _data(shape, seed=7, loc=0.0, spread=1.0, dtype=np.float64)
    state = batch_norm_state(shape[-1], jnp.float64)

    def loss(x, scale, bias):
      y, _ = batch_norm(x, state, scale, bias, train=True, epsilon=eps)
      return jnp.sum(w * jnp.sin(y))  # nonlinear, so dL/dy varies

    grads = jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)
    assert all(g.dtype == jnp.float64 for g in grads)
  y_ref, _, _ = np_batch_norm(x, gamma, beta, eps=eps)
  dy = w * np.cos(y_ref)
  refs = np_batch_norm_backward(dy, x, gamma, eps=eps)
  for name, got, ref in zip(("dx", "dgamma", "dbeta"), grads, refs):
    err = np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref))
    assert err <= 1e-8, f"{name}: relative error {err:.2e}"


def test_check_grads_train_eval_ghost_mask():
  """Finite differences (fwd + rev, order 2) in float64, several variants."""
  with jax.enable_x64(True):
    x = jnp.asarray(_data((8, 3), dtype=np.float64))
    gamma, beta = (jnp.asarray(p) for p in _params(3, dtype=np.float64))
    running = bn_jax.BatchNormState(
        jnp.asarray([0.3, -0.2, 0.1]), jnp.asarray([1.5, 0.7, 2.0]))
    mask = jnp.asarray([1, 1, 0, 1, 1, 1, 1, 0], bool)[:, None]
    variants = {
        "train": dict(train=True),
        "ghost_and_mask": dict(train=True, ghost_batch_size=4, mask=mask),
    }
    for name, kwargs in variants.items():
      fn = jax.jit(lambda x, s, b, e, kw=kwargs: batch_norm(
          x, running, s, b, epsilon=e, **kw)[0])
      try:
        check_grads(fn, (x, gamma, beta, 1e-2), order=2, modes=("fwd", "rev"),
                    eps=1e-5)
      except AssertionError as e:
        raise AssertionError(f"variant {name}") from e
    # Eval mode is differentiable in the running statistics as well.
    eval_fn = jax.jit(lambda x, s, b, m, v: batch_norm(
        x, bn_jax.BatchNormState(m, v), s, b, train=False)[0])
    check_grads(eval_fn, (x, gamma, beta, running.mean, running.var),
                order=2, modes=("fwd", "rev"))


# ---------------------------------------------------------------------------
# Equivalence with flax and PyTorch
# ---------------------------------------------------------------------------

_FLAX_CASES = {
    "NHWC": dict(shape=(4, 3, 3, 5), axis=-1),
    "NCL_axis1": dict(shape=(6, 4, 3), axis=1),
    "tuple_axis": dict(shape=(5, 3, 2, 4), axis=(1, 3)),
    "mask": dict(shape=(7, 4), axis=-1,
                 mask=np.array([1, 1, 0, 1, 0, 1, 1], bool)[:, None]),
}


@pytest.mark.parametrize("case", list(_FLAX_CASES))
def test_matches_flax_batch_norm(case):
  shape, axis = _FLAX_CASES[case]["shape"], _FLAX_CASES[case]["axis"]
  mask = _FLAX_CASES[case].get("mask")
  momentum, eps = 0.9, 1e-3
  module = flax_nn.BatchNorm(axis=axis,
                             momentum=momentum, epsilon=eps,
                             use_fast_variance=False)
  variables = module.init(jax.random.key(0), jnp.zeros(shape),
                          use_running_average=False)
  feature_shape = variables["batch_stats"]["mean"].shape
  scale = jnp.asarray(_data(feature_shape, seed=3, loc=1.0, spread=0.3))
  bias = jnp.asarray(_data(feature_shape, seed=4, loc=0.0, spread=0.3))
  params = {"scale": scale, "bias": bias}
  stats = variables["batch_stats"]
  state = batch_norm_state(feature_shape)
  for step in range(3):
    x = jnp.asarray(_data(shape, seed=10 + step))
    y_flax, updates = module.apply({"params": params, "batch_stats": stats},
                                   x, use_running_average=False, mask=mask,
                                   mutable=["batch_stats"])
    stats = updates["batch_stats"]
    y, state = batch_norm(x, state, scale, bias, train=True, axis=axis,
                          momentum=momentum, epsilon=eps, mask=mask)
    # Two float32 algorithms (shifted one-pass vs flax's two-pass) over <= 45
    # values: a few ulps apart (measured <= 3) of the largest magnitude
    # involved (|y|, max |x| for means, max var); 32 ulps is >= 10x that.
    _assert_close_to_scale(y, y_flax, float(np.max(np.abs(y_flax))), 32, "y")
    _assert_close_to_scale(state.mean, stats["mean"],
                           float(np.max(np.abs(x))), 32, "mean")
    _assert_close_to_scale(state.var, stats["var"],
                           float(np.max(stats["var"])), 32, "var")
  y_flax = module.apply({"params": params, "batch_stats": stats}, x,
                        use_running_average=True)
  y, _ = batch_norm(x, state, scale, bias, train=False, axis=axis,
                    epsilon=eps)
  _assert_close_to_scale(y, y_flax, float(np.max(np.abs(y_flax))), 32,
                         "eval y")


@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 3, 5)],
                         ids=["BatchNorm1d", "BatchNorm2d"])
def test_running_stats_match_pytorch(shape):
  torch = pytest.importorskip(
      "torch", reason="PyTorch is an optional reference (pip install torch)")
  c = shape[-1]
  torch_momentum = 0.1
  layer = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
      c, eps=1e-3, momentum=torch_momentum)
  gamma, beta = _params(c)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(gamma))
    layer.bias.copy_(torch.from_numpy(beta))
  layer.train()
  state = batch_norm_state(c)
  to_torch = (lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)) if len(
      shape) == 4 else torch.from_numpy
  for step in range(4):
    x = _data(shape, seed=20 + step, loc=1.0 + step, spread=1.0 + step)
    y_torch = layer(to_torch(x)).detach()
    if len(shape) == 4:
      y_torch = y_torch.permute(0, 2, 3, 1)
    y, state = batch_norm(jnp.asarray(x), state, gamma, beta, train=True,
                          momentum=1.0 - torch_momentum, epsilon=1e-3,
                          unbiased_running_var=True)
    # PyTorch's CPU kernel reduces in another order (and with another
    # variance algorithm): a few tens of ulps of the largest magnitude at
    # m <= 36 values; 256 ulps (3e-5 relative) leaves the margin, while a
    # wrong Bessel factor or momentum convention is >= 1e-3 relative.
    y_torch = y_torch.numpy()
    _assert_close_to_scale(y, y_torch, float(np.max(np.abs(y_torch))), 256,
                           "y")
    _assert_close_to_scale(state.mean, layer.running_mean.numpy(),
                           float(np.max(np.abs(x))), 256, "mean")
    _assert_close_to_scale(state.var, layer.running_var.numpy(),
                           float(np.max(layer.running_var.numpy())), 256,
                           "var")


EPS_F32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def _assert_close_to_scale(got, ref, scale, ulps, what):
  """|got - ref| <= ulps * eps_f32 * scale, elementwise: a float32 result of
  a computation whose rounding error is a few ulps of ``scale`` (the largest
  magnitude it handles), against a float64 reference."""
  err = np.max(np.abs(np.asarray(got, np.float64) -
                      np.asarray(ref, np.float64)))
  assert err <= ulps * EPS_F32 * scale, (
      f"{what}: error {err:.2e} > {ulps} ulps of {scale:.3g}")


@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 3, 5)],
                         ids=["BatchNorm1d", "BatchNorm2d"])
def test_running_stats_match_numpy_pytorch_semantics(shape):
  """The NumPy float64 twin of the PyTorch check above (no torch needed):
  PyTorch's training-mode BatchNorm normalizes with the biased batch
  variance and feeds the unbiased one, ``m / (m - 1) * var_B`` (Bessel), to
  ``running_var = (1 - 0.1) * running_var + 0.1 * var_unbiased``."""
  c = shape[-1]
  m = int(np.prod(shape[:-1]))
  gamma, beta = _params(c)
  state = batch_norm_state(c)
  mean_ref, var_ref = np.zeros(c), np.ones(c)
  for step in range(4):
    x = _data(shape, seed=20 + step, loc=1.0 + step, spread=1.0 + step)
    y_ref, mu, var_b = np_batch_norm(x, gamma, beta, eps=1e-3)
    mean_ref = 0.9 * mean_ref + 0.1 * mu
    var_ref = 0.9 * var_ref + 0.1 * var_b * m / (m - 1)
    y, state = batch_norm(jnp.asarray(x), state, gamma, beta, train=True,
                          momentum=0.9, epsilon=1e-3,
                          unbiased_running_var=True)
    # Tolerances: every value is a float32 reduction over m <= 36 samples
    # (pairwise or sequential: <= log2(m) + m * eps_f32-relative terms in
    # practice ~6 ulps), a few elementwise ops and <= 4 EMA steps, so ~16
    # ulps of the largest magnitude involved; 256 ulps is >= 10x that. A
    # wrong Bessel factor ((m+1)/m instead of m/(m-1): 8% at m = 6, 5e4 ulps)
    # or momentum convention is far outside.
    x_scale = float(np.max(np.abs(x)))
    _assert_close_to_scale(y, y_ref, float(np.max(np.abs(y_ref))), 256, "y")
    _assert_close_to_scale(state.mean, mean_ref, x_scale, 256, "mean")
    _assert_close_to_scale(state.var, var_ref, float(np.max(var_ref)), 256,
                           "var")


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


def test_train_output_is_standardized_and_affine_invariant():
  x = jnp.asarray(_data((16, 3, 3, 4), loc=3.0, spread=5.0))
  state = batch_norm_state(4)
  eps = 1e-8  # tiny, so the standardization is exact to float32 rounding
  y, _ = batch_norm(x, state, train=True, epsilon=eps)
  np.testing.assert_allclose(jnp.mean(y, (0, 1, 2)), 0.0, atol=2e-6)
  np.testing.assert_allclose(jnp.var(y, (0, 1, 2)), 1.0, atol=2e-5)
  # Per-channel positive scale and shift of x leave the output unchanged.
  a = jnp.asarray([0.1, 3.0, 17.0, 0.5])
  b = jnp.asarray([-4.0, 2.0, 100.0, 0.0])
  y2, _ = batch_norm(x * a + b, state, train=True, epsilon=eps)
  # x * a + b is rounded in float32 before the normalization (at |.| ~ 100
  # that is ~4e-6 absolute, ~4e-7 after dividing by the std of ~10 ... 85);
  # measured 2.1e-6 at most (SSE4.2/AVX/AVX2), 4e-5 is >= 10x that.
  np.testing.assert_allclose(y2, y, atol=4e-5)


def test_eval_output_of_a_sample_ignores_the_rest_of_the_batch():
  state = bn_jax.BatchNormState(jnp.asarray([0.5, -1.0, 2.0]),
                                jnp.asarray([4.0, 0.25, 1.0]))
  gamma, beta = _params(3)
  x = jnp.asarray(_data((5, 3)))
  other = x.at[1:].set(jnp.asarray(_data((4, 3), seed=9, spread=50.0)))
  y, new_state = batch_norm(x, state, gamma, beta, train=False)
  y_other, _ = batch_norm(other, state, gamma, beta, train=False)
  y_alone, _ = batch_norm(x[:1], state, gamma, beta, train=False)
  np.testing.assert_array_equal(y[0], y_other[0])
  np.testing.assert_array_equal(y[0], y_alone[0])
  assert new_state is state
  ref = (np.asarray(x) - state.mean) / np.sqrt(state.var + 1e-5) * gamma + beta
  # 4 float32 ops per element, |y| <= ~5: measured <= 1.3e-7 + 1.3e-7|y|;
  # 2e-6 is >= 10x that.
  np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6)


def test_ghost_batch_norm():
  x = jnp.asarray(_data((12, 2, 3)))
  gamma, beta = _params(3)
  state = bn_jax.BatchNormState(jnp.full(3, 0.2), jnp.full(3, 1.5))
  kw = dict(train=True, momentum=0.8, epsilon=1e-3)
  # A ghost batch as large as the batch is plain BN.
  y_plain, s_plain = batch_norm(x, state, gamma, beta, **kw)
  y_ghost, s_ghost = batch_norm(x, state, gamma, beta, ghost_batch_size=12,
                                **kw)
  np.testing.assert_allclose(y_ghost, y_plain, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(s_ghost.mean, s_plain.mean, rtol=1e-6)
  np.testing.assert_allclose(s_ghost.var, s_plain.var, rtol=1e-6)
  # Groups of 4 are normalized separately; running stats get the group mean
  # of the per-group statistics.
  y, s = batch_norm(x, state, gamma, beta, ghost_batch_size=4, **kw)
  refs = [np_batch_norm(x[i:i + 4], gamma, beta, eps=1e-3)
          for i in range(0, 12, 4)]
  np.testing.assert_allclose(y, np.concatenate([r[0] for r in refs]),
                             rtol=1e-5, atol=1e-5)
  mean_ref = np.mean([r[1] for r in refs], axis=0)
  var_ref = np.mean([r[2] for r in refs], axis=0)
  np.testing.assert_allclose(s.mean, 0.8 * 0.2 + 0.2 * mean_ref, rtol=1e-6)
  np.testing.assert_allclose(s.var, 0.8 * 1.5 + 0.2 * var_ref, rtol=1e-6)
  # ... which differs from plain BN (so the comparison above can fail).
  assert np.max(np.abs(np.asarray(y) - np.asarray(y_plain))) > 1e-2


def test_bfloat16_input_keeps_float32_statistics():
  x = _data((16, 4, 4, 3), loc=2.0)
  gamma, beta = _params(3)
  state = batch_norm_state(3)
  y16, s16 = batch_norm(jnp.asarray(x, jnp.bfloat16), state, gamma, beta,
                        train=True, momentum=0.5)
  assert y16.dtype == jnp.bfloat16
  assert s16.mean.dtype == jnp.float32 and s16.var.dtype == jnp.float32
  x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  y32, s32 = batch_norm(jnp.asarray(x_rounded), state, gamma, beta,
                        train=True, momentum=0.5)
  # Statistics of the same (bf16-rounded) values are float32-accurate; the
  # output differs only by the final rounding to bf16 (8 mantissa bits).
  # (The same float32 computation on the same values, possibly fused
  # differently with the bf16 cast: 32 ulps of the largest.)
  _assert_close_to_scale(s16.mean, s32.mean, float(np.max(np.abs(x))), 32,
                         "mean")
  _assert_close_to_scale(s16.var, s32.var, float(np.max(s32.var)), 32, "var")
  # (bf16 keeps 8 significant bits: one rounding is <= 2^-9 = 2e-3
  # relative, a hard bound on any CPU; 8e-3 allows for ~2 roundings more in
  # the bf16 affine step; measured 28% of this tolerance.)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=8e-3,
                             atol=8e-3)
  # Eval mode also returns the input dtype.
  y_eval, _ = batch_norm(jnp.asarray(x, jnp.bfloat16), s16, gamma, beta,
                         train=False)
  assert y_eval.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Numerics: |mean| >> std
# ---------------------------------------------------------------------------


def _relative_errors(y, ref):
  err = np.abs(np.asarray(y, np.float64) - ref)
  return err.max() / np.abs(ref).max(), (err / np.maximum(1.0, np.abs(ref)))


def _naive_float32_batch_norm(x, eps):
  """The textbook one-pass variance E[x^2] - E[x]^2, in float32."""
  mean = jnp.mean(x, 0)
  var = jnp.maximum(jnp.mean(x * x, 0) - mean * mean, 0.0)
  return (x - mean) * jax.lax.rsqrt(var + eps)


# Bounds of test_large_mean_is_accurate, in ulps of float32 (EPS_F32) of the
# largest output. Each output is (x - K) (exact, Sterbenz) minus E[x - K]
# (a sum over n = 256 values of size ~std: <= log2(n) = 8 ulps of std for
# XLA's blocked/pairwise reductions), times rsqrt(var + eps), whose variance
# carries the same ~8 ulps: ~12 ulps in all, 3.4 measured (worst of
# XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 / AVX / AVX2). 40 ulps is >= 10x the
# measured error and still 12x below the error of centering with the rounded
# mean (x - mean: eps * |mean| = 1e4 * eps * std before normalization,
# 479 ulps relative to the largest output, 1847 per element).
_LARGE_MEAN_OUTPUT_ULPS = 40
# The variance: two sums of n values and one subtraction (~8 ulps), 5.5
# measured; the naive E[x^2] - E[x]^2 is off by ~1e8 ulps here.
_LARGE_MEAN_VAR_ULPS = 64


@pytest.mark.parametrize("use_mask", [False, True], ids=["plain", "mask"])
def test_large_mean_is_accurate(use_mask):
  """|mean| = 1e4 std: the output, variance and gradient keep float32
  accuracy (a few ulps), as the module docstring of bn_jax.core.moments
  promises for the shifted formula."""
  eps = 1e-5
  bound = _LARGE_MEAN_OUTPUT_ULPS * EPS_F32
  rng = np.random.default_rng(0)
  std = rng.uniform(0.5, 2.0, size=4)
  x = (1e4 * std * np.sign(rng.standard_normal(4)) +
       std * rng.standard_normal((256, 4))).astype(np.float32)
  mask = (rng.uniform(size=(256, 1)) < 0.7) if use_mask else None
  valid = x if mask is None else x[mask[:, 0]]
  x64 = x.astype(np.float64)  # the same float32 values, exactly
  mu, var = valid.astype(np.float64).mean(0), valid.astype(np.float64).var(0)
  ref = (x64 - mu) / np.sqrt(var + eps)
  y, state = batch_norm(jnp.asarray(x), batch_norm_state(4), train=True,
                        epsilon=eps, momentum=0.0, mask=mask)
  rel_max, rel_each = _relative_errors(y, ref)
  assert rel_max <= bound and rel_each.max() <= bound, (
      rel_max / EPS_F32, rel_each.max() / EPS_F32)
  np.testing.assert_allclose(state.var, var,
                             rtol=_LARGE_MEAN_VAR_ULPS * EPS_F32)
  # The naive formula fails the same bound (so this test can fail).
  naive = _naive_float32_batch_norm(jnp.asarray(valid), eps)
  naive_rel_max, _ = _relative_errors(naive, ref[mask[:, 0]] if use_mask
                                      else ref)
  assert not naive_rel_max <= bound, naive_rel_max
  if mask is None:  # the backward pass is accurate too (1.5 ulps measured)
    w = rng.standard_normal(x.shape)
    dx = jax.grad(lambda x: jnp.sum(w * batch_norm(
        x, batch_norm_state(4), train=True, epsilon=eps)[0]))(jnp.asarray(x))
    dx_ref, _, _ = np_batch_norm_backward(w, x64, np.ones(4), eps=eps)
    rel_max, rel_each = _relative_errors(dx, dx_ref)
    assert rel_max <= bound, rel_max / EPS_F32


# ---------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------


def test_jit_steps_equal_eager_without_retracing():
  traces = []

  def step(x, state, scale, bias):
    traces.append(1)  # runs once per trace, not per call
    return batch_norm(x, state, scale, bias, train=True, momentum=0.7)

  jitted = jax.jit(step)
  gamma, beta = _params(3)
  s_eager = s_jit = batch_norm_state(3)
  for i in range(4):
    x = jnp.asarray(_data((8, 2, 3), seed=30 + i, loc=float(i)))
    y_eager, s_eager = step(x, s_eager, gamma, beta)
    y_jit, s_jit = jitted(x, s_jit, gamma, beta)
    np.testing.assert_allclose(y_jit, y_eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s_jit.mean, s_eager.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s_jit.var, s_eager.var, rtol=1e-6, atol=1e-6)
  assert len(traces) == 4 + 1  # 4 eager calls + a single jit trace


class BatchNormVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_train_and_eval_match_reference(self):
    fn = self.variant(functools.partial(batch_norm, momentum=0.6,
                                        epsilon=1e-3),
                      static_argnames=("train",))
    x = _data((10, 4))
    gamma, beta = _params(4)
    state = batch_norm_state(4)
    y, new_state = fn(jnp.asarray(x), state, gamma, beta, train=True)
    y_ref, mu, var = np_batch_norm(x, gamma, beta, eps=1e-3)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state.mean, 0.4 * mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.var, 0.6 + 0.4 * var, rtol=1e-5)
    y_eval, _ = fn(jnp.asarray(x), new_state, gamma, beta, train=False)
    ref_eval = (x - 0.4 * mu) / np.sqrt(0.6 + 0.4 * var + 1e-3) * gamma + beta
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

_X = jnp.ones((4, 3))
_STATE = batch_norm_state(3)

# Each pattern (re.search) starts at the beginning of the message (^) with the
# argument's name followed by what is wrong with it, so a message that merely
# contains the letter 'x' or another argument's name does not pass.
_BAD_CALLS = {
    "integer_x": (TypeError, r"^x must be a floating-point array .*got dtype "
                  r"int32", lambda: batch_norm(
                      jnp.ones((4, 3), jnp.int32), _STATE, train=True)),
    "state_size": (ValueError, r"^state\.mean has shape \(4,\) but the "
                   r"input has feature shape \(3,\)", lambda: batch_norm(
                       _X, batch_norm_state(4), train=True)),
    "scale_size": (ValueError, r"^scale has shape \(2,\) but the input has "
                   r"feature shape \(3,\)", lambda: batch_norm(
                       _X, _STATE, jnp.ones(2), train=False)),
    "bias_size": (ValueError, r"^bias has shape \(4,\) but the input has "
                  r"feature shape \(3,\)", lambda: batch_norm(
                      _X, _STATE, None, jnp.ones(4), train=True)),
    "one_value_per_channel": (
        ValueError, r"^train-mode batch norm needs more than 1 value per "
        r"feature .*got x of shape \(1, 1, 1, 3\)", lambda: batch_norm(
            jnp.ones((1, 1, 1, 3)), _STATE, train=True)),
    "one_value_per_ghost": (
        ValueError, r"^train-mode batch norm needs more than 1 value per "
        r"feature .*ghost", lambda: batch_norm(
            _X, _STATE, train=True, ghost_batch_size=1)),
    "momentum_one": (ValueError, r"^momentum must be in \[0, 1\)",
                     lambda: batch_norm(_X, _STATE, train=True, momentum=1.0)),
    "momentum_negative": (ValueError, r"^momentum must be in \[0, 1\)",
                          lambda: batch_norm(_X, _STATE, train=True,
                                             momentum=-0.1)),
    "epsilon_zero": (ValueError, r"^epsilon must be > 0 .*got 0\.0",
                     lambda: batch_norm(_X, _STATE, train=True, epsilon=0.0)),
    "epsilon_negative": (ValueError, r"^epsilon must be > 0 .*got -1e-05",
                         lambda: batch_norm(_X, _STATE, train=False,
                                            epsilon=-1e-5)),
    "ghost_not_dividing": (ValueError, r"^ghost_batch_size=3 must divide the "
                           r"batch size", lambda: batch_norm(
                               _X, _STATE, train=True, ghost_batch_size=3)),
    "ghost_not_int": (TypeError, r"^ghost_batch_size must be an int",
                      lambda: batch_norm(_X, _STATE, train=True,
                                         ghost_batch_size=2.0)),
    "axis_out_of_range": (ValueError, r"^axis=2 is out of range",
                          lambda: batch_norm(_X, _STATE, train=True, axis=2)),
    "axis_repeated": (ValueError, r"^axis=\(1, -1\) repeats an axis",
                      lambda: batch_norm(_X, _STATE, train=True,
                                         axis=(1, -1))),
    "axis_not_int": (TypeError, r"^axis must be an int or a tuple of ints",
                     lambda: batch_norm(_X, _STATE, train=True, axis=1.0)),
    "mask_shape": (ValueError, r"^mask has shape \(4, 2\), which does not "
                   r"broadcast", lambda: batch_norm(
                       _X, _STATE, train=True, mask=jnp.ones((4, 2), bool))),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_bad_input_raises_naming_the_argument(case):
  error, pattern, call = _BAD_CALLS[case]
  with pytest.raises(error, match=pattern):
    call()


def test_bad_input_raises_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="momentum"):
    jax.jit(lambda x: batch_norm(x, _STATE, train=True, momentum=1.5))(_X)
  with pytest.raises(ValueError, match="ghost_batch_size"):
    jax.jit(lambda x: batch_norm(x, _STATE, train=True,
                                 ghost_batch_size=3))(_X)
