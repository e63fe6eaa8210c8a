"""Batch norm of complex inputs, against an independent NumPy complex128
reference, finite differences and flax.linen.BatchNorm.

flax's definition (``flax.linen.normalization._compute_stats``): per feature,
the mean ``mu = E[x]`` is complex, the variance ``var = E[|x - mu|^2]`` is
real, ``y = gamma (x - mu) / sqrt(var + eps) + beta``; the running mean
becomes complex, the running variance stays real.

Tolerances (float32 results of O(1) magnitude, eps_f32 = 1.19e-7): the
statistics are a few dozen roundings of O(1) quantities, so the forward error
is ~1e-6 at most; we use 2e-5 (>= 10x margin) relative to the largest
magnitude. Gradient checks run in complex128 (jax.enable_x64).
"""
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import bn_jax
import bn_jax.nn
import bn_jax.nnx
from bn_jax import batch_norm, batch_norm_state

EPS = 1e-5
# float32 forward tolerance relative to the largest |y| (see the docstring).
F32_RTOL = 2e-5


def np_complex_batch_norm(x, gamma, beta, *, eps, mask=None):
  """flax's complex BN in complex128 over axes (0, 1): y, mean, var."""
  x = np.asarray(x, np.complex128)
  if mask is None:
    mask = np.ones(x.shape, bool)
  mask = np.broadcast_to(mask, x.shape)
  count = mask.sum((0, 1))
  xz = np.where(mask, x, 0)
  mean = xz.sum((0, 1)) / count
  dev = np.where(mask, x - mean, 0)
  var = (dev.real ** 2 + dev.imag ** 2).sum((0, 1)) / count  # real
  y = gamma * (x - mean) / np.sqrt(var + eps) + beta
  return y, mean, var


def _complex_normal(rng, shape, dtype=np.complex64):
  """Standard complex normal (E|z|^2 = 1) from NumPy (jax.random compiles a
  sampler per shape: ~0.2-1 s each on a CPU)."""
  z = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
  return jnp.asarray((z / np.sqrt(2.0)).astype(dtype))


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.complex128) -
                             np.asarray(b, np.complex128))))


@pytest.mark.parametrize("use_mask", [False, True])
def test_train_forward_and_running_stats_match_numpy(use_mask):
  rng = np.random.default_rng(0)
  x = _complex_normal(rng, (6, 5, 3)) * 2.0 + (0.5 - 1.5j)
  gamma = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
  beta = jnp.asarray(rng.standard_normal(3), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(6, 5, 1)) < 0.6) if use_mask else None
  state = batch_norm_state(3)
  y, new_state = batch_norm(x, state, gamma, beta, train=True, momentum=0.9,
                            epsilon=EPS, mask=mask)
  ref_y, ref_mean, ref_var = np_complex_batch_norm(
      x, np.asarray(gamma), np.asarray(beta), eps=EPS,
      mask=None if mask is None else np.asarray(mask))
  assert y.dtype == jnp.complex64
  scale = np.max(np.abs(ref_y))
  if use_mask:  # only entries that entered the statistics are compared
    keep = np.broadcast_to(np.asarray(mask), x.shape)
    assert _max_err(np.where(keep, y, 0), np.where(keep, ref_y, 0)) <= (
        F32_RTOL * scale)
  else:
    assert _max_err(y, ref_y) <= F32_RTOL * scale
  # Running mean: complex, 0.9 * 0 + 0.1 * mean; running var real.
  assert jnp.iscomplexobj(new_state.mean)
  assert not jnp.iscomplexobj(new_state.var)
  assert new_state.var.dtype == jnp.float32
  assert _max_err(new_state.mean, 0.1 * ref_mean) <= F32_RTOL * np.max(
      np.abs(ref_mean))
  np.testing.assert_allclose(new_state.var, 0.9 + 0.1 * ref_var,
                             rtol=F32_RTOL)


def test_eval_uses_complex_running_mean():
  rng = np.random.default_rng(1)
  x = _complex_normal(rng, (4, 3))
  running_mean = _complex_normal(rng, (3,))
  running_var = jnp.array([0.5, 1.0, 2.0], jnp.float32)
  state = bn_jax.BatchNormState(running_mean, running_var)
  y, out_state = batch_norm(x, state, train=False, epsilon=EPS)
  ref = ((np.asarray(x, np.complex128) - np.asarray(running_mean)) /
         np.sqrt(np.asarray(running_var, np.float64) + EPS))
  assert y.dtype == jnp.complex64
  assert out_state is state
  assert _max_err(y, ref) <= F32_RTOL * np.max(np.abs(ref))


def test_large_mean_keeps_float32_accuracy():
  """|mean| = 1e4 std: the shifted sums keep the variance accurate.

  The textbook one-pass E|x|^2 - |E x|^2 (flax's use_fast_variance) has
  terms ~2e8 std^2 whose float32 rounding (~2e8 * 6e-8 = 12 std^2) swamps
  the variance; the reference is the same float32 values in complex128.
  """
  x = (_complex_normal(np.random.default_rng(2), (64, 4)) +
       (1e4 - 1e4j)).astype(jnp.complex64)
  y, new_state = batch_norm(x, batch_norm_state(4), train=True, momentum=0.0,
                            epsilon=EPS)
  ref_y, _, ref_var = np_complex_batch_norm(
      x.reshape(64, 1, 4), 1.0, 0.0, eps=EPS)
  # Centering x - mean costs ~eps_f32 * |mean| = 1.2e-3 std in the pivot-free
  # two-pass form; the shifted form's error is O(eps_f32 * std). 1e-4 leaves
  # >= 10x margin over the latter and fails for the former.
  assert _max_err(y, ref_y.reshape(64, 4)) <= 1e-4
  np.testing.assert_allclose(new_state.var, ref_var, rtol=1e-4)


def test_gradients_match_finite_differences_complex128():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = _complex_normal(rng, (5, 2, 3), np.complex128) + (1.0 + 2.0j)
    gamma = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float64)
    beta = jnp.asarray(rng.standard_normal(3), jnp.float64)
    weights = _complex_normal(rng, (5, 2, 3), np.complex128)

    # Real-valued, reads real and imaginary parts of y. (The running
    # statistics carry stop_gradient by design, so they are not in it.)
    # Jitted: check_grads evaluates it dozens of times, and op by op each
    # evaluation dispatched (and first compiled) every complex128 op.
    @jax.jit
    def loss(x, gamma, beta):
      y, _ = batch_norm(x, batch_norm_state(3, jnp.float64), gamma, beta,
                        train=True, epsilon=EPS)
      return jnp.sum(jnp.real(jnp.conj(weights) * y))

    # Order 1 both modes (the custom JVP and its transpose); order 2 in
    # reverse mode differentiates the JVP rule itself.
    check_grads(loss, (x, gamma, beta), order=1, modes=("fwd", "rev"),
                atol=1e-6, rtol=1e-6)
    check_grads(lambda x: loss(x, gamma, beta), (x,), order=2,
                modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_mask", [False, True])
def test_linen_and_nnx_match_flax_linen(use_mask):
  """flax.linen.BatchNorm's complex results (outputs, running statistics)."""
  rng = np.random.default_rng(4)
  k3 = jax.random.key(4)
  x = _complex_normal(rng, (4, 3, 2))
  mask = None
  if use_mask:
    mask = jnp.asarray(rng.integers(0, 2, (4, 3, 1)).astype(bool))
    assert 0 < int(mask.sum()) < mask.size
  kwargs = dict(momentum=0.9, epsilon=EPS, dtype=jnp.complex64)
  outputs = {}
  for name, cls in (("flax", flax_nn.BatchNorm), ("bn_jax", bn_jax.nn.BatchNorm)):
    module = cls(**kwargs)
    variables = module.init(k3, x, use_running_average=True)
    y, updates = module.apply(variables, x, use_running_average=False,
                              mask=mask, mutable=["batch_stats"])
    y_eval = module.apply({**variables, **updates}, x,
                          use_running_average=True)
    outputs[name] = (y, updates["batch_stats"]["mean"],
                     updates["batch_stats"]["var"], y_eval)
  layer = bn_jax.nnx.BatchNorm(2, rngs=nnx.Rngs(0), **kwargs)
  y = layer(x, mask=mask)
  stats = (layer.mean[...], layer.var[...])
  layer.eval()
  outputs["nnx"] = (y, *stats, layer(x))
  keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(
      np.asarray(mask), x.shape)
  flax_out = outputs["flax"]
  for name in ("bn_jax", "nnx"):
    y, mean, var, y_eval = outputs[name]
    assert y.dtype == jnp.complex64 and y_eval.dtype == jnp.complex64
    assert mean.dtype == flax_out[1].dtype == jnp.complex64
    assert var.dtype == flax_out[2].dtype == jnp.float32
    bound = F32_RTOL * np.max(np.abs(np.where(keep, flax_out[0], 0)))
    assert _max_err(np.where(keep, y, 0),
                    np.where(keep, flax_out[0], 0)) <= bound
    assert _max_err(mean, flax_out[1]) <= F32_RTOL
    np.testing.assert_allclose(var, flax_out[2], rtol=F32_RTOL)
    assert _max_err(y_eval, flax_out[3]) <= F32_RTOL * np.max(
        np.abs(flax_out[3]))
  # Linen and NNX share the core call: bit for bit the same.
  for a, b in zip(outputs["bn_jax"], outputs["nnx"]):
    np.testing.assert_array_equal(np.where(keep, a, 0) if a.shape == x.shape
                                  else a,
                                  np.where(keep, b, 0) if b.shape == x.shape
                                  else b)


def test_zero_imaginary_part_equals_real_batch_norm():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 3)),
                  jnp.float32)
  y_real, s_real = batch_norm(x, batch_norm_state(3), train=True)
  y_cplx, s_cplx = batch_norm(x.astype(jnp.complex64), batch_norm_state(3),
                              train=True)
  # The same float32 operations on the real parts (|d|^2 = Re(d)^2 + 0).
  np.testing.assert_allclose(jnp.real(y_cplx), y_real, atol=F32_RTOL)
  np.testing.assert_array_equal(jnp.imag(y_cplx), 0.0)
  np.testing.assert_allclose(jnp.real(s_cplx.mean), s_real.mean,
                             atol=F32_RTOL)
  np.testing.assert_allclose(s_cplx.var, s_real.var, rtol=F32_RTOL)


def test_bad_dtypes_name_the_argument():
  with pytest.raises(TypeError, match=r"x must be a floating-point array.*"
                     "complex64"):
    batch_norm(jnp.ones((4, 3), jnp.int32), batch_norm_state(3), train=True)
  # Complex inputs are batch norm's only (flax's tests define them for it).
  with pytest.raises(TypeError, match="x must be a floating-point array"):
    bn_jax.layer_norm(jnp.ones((4, 3), jnp.complex64))
