"""group_norm / layer_norm against flax.linen.GroupNorm / LayerNorm, NumPy
float64 references, finite-difference gradients and argument checks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bn_jax
from bn_jax import group_norm, group_norm_state, layer_norm, layer_norm_state


def _data(shape, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * 2.0 + 0.7).astype(dtype)


def _affine(channels, seed=1, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return ((1.0 + 0.3 * rng.normal(size=channels)).astype(dtype),
          (0.5 * rng.normal(size=channels)).astype(dtype))


def _np_group_norm(x, gamma, beta, groups, eps):
  """NumPy float64 GroupNorm of an NHWC (channels last) array."""
  x = np.asarray(x, np.float64)
  n, c = x.shape[0], x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (groups, c // groups))
  axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
  mu = xg.mean(axes, keepdims=True)
  var = ((xg - mu) ** 2).mean(axes, keepdims=True)
  y = ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape)
  return y * gamma + beta


@pytest.mark.parametrize("groups_kw", [{"num_groups": 4},
                                       {"num_groups": None, "group_size": 2}])
def test_group_norm_matches_flax_and_numpy(groups_kw):
  x32 = _data((3, 4, 4, 8))
  gamma32, beta32 = _affine(8)
  ours32, state = group_norm(x32, group_norm_state(), gamma32, beta32,
                             **groups_kw)
  assert state == group_norm_state()
  assert ours32.dtype == jnp.float32 and ours32.shape == x32.shape
  # float32: both round differently at the 1e-7 relative level.
  np.testing.assert_allclose(
      ours32, _np_group_norm(x32, gamma32, beta32, 4, 1e-6), atol=1e-5)
  module = nn.GroupNorm(**groups_kw, use_fast_variance=False)
  with jax.enable_x64(True):
    # float64 so that the comparison with flax is tight (<= 1e-6).
    x, gamma, beta = (jnp.asarray(a, jnp.float64)
                      for a in (x32, gamma32, beta32))
    ours, _ = group_norm(x, group_norm_state(), gamma, beta, **groups_kw)
    assert ours.dtype == jnp.float64
    ref = module.apply({"params": {"scale": gamma, "bias": beta}}, x)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        ours, _np_group_norm(x32, gamma32, beta32, 4, 1e-6), atol=1e-10)
    _compare_grads_with_flax(group_norm, group_norm_state(), module, x,
                             gamma, beta, dict(groups_kw))


def _compare_grads_with_flax(fn, state, module, x, gamma, beta, kwargs):
  """Gradients w.r.t. x, scale and bias of a random linear functional."""
  w = jnp.asarray(_data(x.shape, seed=5), x.dtype)

  def ours_loss(x, g, b):
    return jnp.sum(w * fn(x, state, g, b, **kwargs)[0])

  def flax_loss(x, g, b):
    return jnp.sum(w * module.apply({"params": {"scale": g, "bias": b}}, x))

  g_ours = jax.jit(jax.grad(ours_loss, argnums=(0, 1, 2)))(x, gamma, beta)
  g_flax = jax.jit(jax.grad(flax_loss, argnums=(0, 1, 2)))(x, gamma, beta)
  for a, b in zip(g_ours, g_flax):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_group_norm_channel_axis_1_equals_channels_last():
  x = _data((2, 6, 3, 3))  # NCHW
  gamma, beta = _affine(6)
  y_nchw, _ = group_norm(x, group_norm_state(), gamma, beta, num_groups=3,
                         axis=1)
  ref = _np_group_norm(np.moveaxis(x, 1, -1), gamma, beta, 3, 1e-6)
  np.testing.assert_allclose(np.moveaxis(np.asarray(y_nchw), 1, -1), ref,
                             atol=1e-5)


def test_group_norm_is_per_sample_and_ignores_train():
  x = _data((4, 2, 2, 4))
  y_all, _ = group_norm(x, group_norm_state(), num_groups=2, train=True)
  y_one, _ = group_norm(x[2:3], group_norm_state(), num_groups=2,
                        train=False)
  np.testing.assert_allclose(y_all[2:3], y_one, atol=1e-6)


@pytest.mark.parametrize("axis", [-1, (1, 2, 3)])
def test_layer_norm_matches_flax(axis):
  x32 = _data((3, 2, 3, 5))
  feat_shape = (5,) if axis == -1 else (2, 3, 5)
  rng = np.random.default_rng(3)
  gamma32 = (1 + 0.3 * rng.normal(size=feat_shape)).astype(np.float32)
  beta32 = (0.5 * rng.normal(size=feat_shape)).astype(np.float32)
  # NumPy float64 reference.
  axes = (3,) if axis == -1 else axis
  xd = x32.astype(np.float64)
  mu = xd.mean(axes, keepdims=True)
  var = ((xd - mu) ** 2).mean(axes, keepdims=True)
  ref_np = (xd - mu) / np.sqrt(var + 1e-6) * gamma32 + beta32
  ours32, state = layer_norm(x32, layer_norm_state(), gamma32, beta32,
                             axis=axis)
  assert state == layer_norm_state() and ours32.dtype == jnp.float32
  # float32 vs float64 reference, |y| <= ~4: measured 1.5e-6, 2e-5 (~40
  # ulps of the largest output) is >= 10x that.
  np.testing.assert_allclose(ours32, ref_np, atol=2e-5)

  module = nn.LayerNorm(reduction_axes=axis, feature_axes=axis,
                        use_fast_variance=False)
  with jax.enable_x64(True):
    x, gamma, beta = (jnp.asarray(a, jnp.float64)
                      for a in (x32, gamma32, beta32))
    ours, _ = layer_norm(x, layer_norm_state(), gamma, beta, axis=axis)
    ref = module.apply({"params": {"scale": gamma, "bias": beta}}, x)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours, ref_np, atol=1e-10)
    _compare_grads_with_flax(layer_norm, layer_norm_state(), module, x, gamma,
                             beta, {"axis": axis})


def test_flax_default_layer_norm_large_mean():
  # flax's default fast variance loses precision at |mean| >> std; ours is
  # the accurate shifted formula, so compare with a float64 NumPy reference.
  x = (_data((4, 16)) * 1e-3 + 1e3).astype(np.float32)
  y, _ = layer_norm(x, layer_norm_state(), epsilon=1e-12)
  xd = x.astype(np.float64)
  ref = (xd - xd.mean(-1, keepdims=True)) / xd.std(-1, keepdims=True)
  np.testing.assert_allclose(y, ref, atol=2e-3)


def _xla_cpu_compiles_float16() -> bool:
  """Whether this backend can run float16 arithmetic at all.

  XLA:CPU without the F16C instructions (``XLA_FLAGS=--xla_cpu_max_isa=
  SSE4_2``, or a virtual machine that hides F16C) has LLVM lower every
  float16 <-> float32 conversion to the compiler-rt calls ``__extendhfsf2`` /
  ``__truncsfhf2``, which XLA's JIT registers only on macOS
  (openxla/xla#6787, openxla/xla#21903): then even ``x.astype(float32)``
  fails with "Failed to materialize symbols: ... wrapped_convert", for any
  JAX program, independently of bn_jax. bfloat16 converts are plain bit
  shifts and work under every ISA.
  """
  try:
    jax.jit(lambda x: x.astype(jnp.float32))(jnp.ones(2, jnp.float16))
  except jax.errors.JaxRuntimeError as e:
    if "materialize symbols" in str(e):  # the XLA bug above, nothing else
      return False
    raise
  return True


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
def test_half_precision_inputs(dtype):
  """Half-precision inputs give outputs of the same dtype whose values are the
  float64 norm of the (rounded) inputs, up to the output's own rounding."""
  x = _data((2, 3, 3, 8))
  xh = jnp.asarray(x, dtype)
  # The output dtype follows the input (abstractly, so under every ISA).
  shapes = jax.eval_shape(lambda x: (
      group_norm(x, group_norm_state(), num_groups=4)[0],
      layer_norm(x, layer_norm_state())[0]), xh)
  assert [s.dtype for s in shapes] == [jnp.dtype(dtype)] * 2
  if dtype == jnp.float16 and not _xla_cpu_compiles_float16():
    pytest.skip("XLA:CPU cannot compile float16 converts without F16C "
                "(openxla/xla#6787; see _xla_cpu_compiles_float16)")
  y_gn, _ = group_norm(xh, group_norm_state(), num_groups=4)
  y_ln, _ = layer_norm(xh, layer_norm_state())
  assert y_gn.dtype == dtype and y_ln.dtype == dtype
  # The reference sees the rounded inputs, so only the computation's own
  # error remains: the statistics are accumulated in float32 (~1e-6), then
  # y (|y| <= 3.5 here) is rounded once to the half format, an error of
  # |y| * u with u = 2^-8 (bfloat16) or 2^-11 (float16): <= 0.014. 0.05 is
  # > 3x that; normalizing over the wrong axes is off by O(1).
  x_rounded = np.asarray(xh.astype(jnp.float32), np.float64)
  ref_gn = _np_group_norm(x_rounded, 1.0, 0.0, 4, 1e-6)
  ref_ln = _np_group_norm(x_rounded.reshape(-1, 8), 1.0, 0.0, 1, 1e-6)
  assert np.abs(ref_gn).max() <= 3.5 and np.abs(ref_ln).max() <= 3.5
  np.testing.assert_allclose(np.asarray(y_gn, np.float64), ref_gn, atol=0.05)
  np.testing.assert_allclose(np.asarray(y_ln, np.float64).reshape(-1, 8),
                             ref_ln, atol=0.05)


def test_check_grads_second_order():
  with jax.enable_x64(True):
    x = jnp.asarray(_data((2, 2, 2, 4), dtype=np.float64))
    g, b = (jnp.asarray(a, jnp.float64) for a in _affine(4))
    # jit: one compilation per derivative instead of op-by-op dispatch.
    check_grads(jax.jit(lambda x, g, b: group_norm(
        x, group_norm_state(), g, b, num_groups=2)[0]),
                (x, g, b), order=2, modes=("fwd", "rev"))
    check_grads(jax.jit(lambda x, g, b: layer_norm(
        x, layer_norm_state(), g, b)[0]),
                (x, g, b), order=2, modes=("fwd", "rev"))


def test_bad_arguments():
  x = jnp.ones((2, 3, 3, 8))
  state = group_norm_state()
  with pytest.raises(TypeError, match="x must be a floating"):
    group_norm(jnp.ones((2, 8), jnp.int32), state, num_groups=2)
  with pytest.raises(TypeError, match="x must be a floating"):
    layer_norm(jnp.ones((2, 8), jnp.int32), layer_norm_state())
  with pytest.raises(ValueError, match="num_groups=3 must divide"):
    group_norm(x, state, num_groups=3)
  with pytest.raises(ValueError, match="group_size=3 must divide"):
    group_norm(x, state, num_groups=None, group_size=3)
  with pytest.raises(ValueError, match="exactly one of num_groups"):
    group_norm(x, state, num_groups=2, group_size=4)
  with pytest.raises(ValueError, match="exactly one of num_groups"):
    group_norm(x, state, num_groups=None)
  with pytest.raises(ValueError, match="num_groups must be >= 1"):
    group_norm(x, state, num_groups=0)
  with pytest.raises(ValueError, match="scale has shape"):
    group_norm(x, state, jnp.ones((4,)), num_groups=2)
  with pytest.raises(ValueError, match="bias has shape"):
    layer_norm(x, layer_norm_state(), None, jnp.ones((3,)))
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    group_norm(x, state, num_groups=2, epsilon=0.0)
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    layer_norm(x, layer_norm_state(), epsilon=-1e-5)
  with pytest.raises(ValueError, match="axis must not be 0"):
    group_norm(x, state, num_groups=1, axis=0)
  with pytest.raises(ValueError, match="axis"):
    layer_norm(x, layer_norm_state(), axis=4)
  # Errors are raised at trace time under jit, too.
  with pytest.raises(ValueError, match="num_groups=3 must divide"):
    jax.jit(lambda x: group_norm(x, state, num_groups=3)[0])(x)


def test_exported_from_top_level():
  for name in ("group_norm", "group_norm_state", "GroupNormState",
               "layer_norm", "layer_norm_state", "LayerNormState"):
    assert name in bn_jax.__all__ and hasattr(bn_jax, name)
