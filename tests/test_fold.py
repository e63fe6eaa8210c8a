"""fold_batch_norm: layer with folded weights == layer followed by eval BN."""
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
import bn_jax.nn as bnn
from bn_jax.core.batch_norm import BatchNormState

EPS = 1e-3


def _bn_eval_reference(z, mean, var, scale, bn_bias):
  """BN inference in NumPy float64 (None = identity scale / zero bias)."""
  z = np.asarray(z, np.float64)
  y = (z - np.asarray(mean, np.float64)) / np.sqrt(
      np.asarray(var, np.float64) + EPS)
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if bn_bias is not None:
    y = y + np.asarray(bn_bias, np.float64)
  return y


def _stats(rng, n):
  """Non-trivial running statistics: mean far from 0, var far from 1."""
  return BatchNormState(
      jnp.asarray(rng.normal(3.0, 2.0, n), jnp.float32),
      jnp.asarray(rng.uniform(0.05, 4.0, n), jnp.float32))


@pytest.mark.parametrize("with_bias,with_affine", [(True, True),
                                                   (False, False)])
def test_fold_dense(with_bias, with_affine):
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 2.0, (16, 5)).astype(np.float32)
  kernel = jnp.asarray(rng.normal(0, 1, (5, 4)), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 1, 4), jnp.float32) if with_bias else None
  state = _stats(rng, 4)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32) if (
      with_affine) else None
  bn_bias = jnp.asarray(rng.normal(0, 1, 4), jnp.float32) if (
      with_affine) else None
  z = x.astype(np.float64) @ np.asarray(kernel, np.float64)
  if with_bias:
    z = z + np.asarray(bias, np.float64)
  expected = _bn_eval_reference(z, state.mean, state.var, scale, bn_bias)
  fk, fb = bn_jax.fold_batch_norm(kernel, bias, state, scale, bn_bias,
                                  epsilon=EPS)
  assert fk.shape == kernel.shape and fb.shape == (4,)
  assert fk.dtype == fb.dtype == jnp.float32
  got = np.asarray(x @ fk + fb, np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_conv_including_grouped(groups):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(0.5, 1.5, (2, 6, 6, 4)), jnp.float32)
  conv = fnn.Conv(6, (3, 3), feature_group_count=groups, use_bias=True)
  # flax's kernel layout (shapes only: values from NumPy, no compilation of
  # a random initializer).
  shapes = jax.eval_shape(conv.init, jax.random.key(0), x)["params"]
  assert shapes["kernel"].shape == (3, 3, 4 // groups, 6)
  params = {"kernel": jnp.asarray(rng.normal(0, 0.3, shapes["kernel"].shape),
                                  jnp.float32),
            "bias": jnp.asarray(rng.normal(0, 1, 6), jnp.float32)}
  state = _stats(rng, 6)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
  bn_bias = jnp.asarray(rng.normal(0, 1, 6), jnp.float32)
  z = conv.apply({"params": params}, x)
  expected = _bn_eval_reference(z, state.mean, state.var, scale, bn_bias)
  # The state may also be a batch_stats layer dict.
  fk, fb = bn_jax.fold_batch_norm(params["kernel"], params["bias"],
                                  state._asdict(), scale, bn_bias,
                                  epsilon=EPS)
  got = conv.apply({"params": {"kernel": fk, "bias": fb}}, x)
  np.testing.assert_allclose(np.asarray(got, np.float64), expected,
                             rtol=1e-5, atol=1e-5)


def test_fold_trained_module_model():
  """Dense(no bias) -> bn_jax.nn.BatchNorm after a few training updates."""

  class Net(fnn.Module):
    @fnn.compact
    def __call__(self, x, train):
      x = fnn.Dense(3, use_bias=False)(x)
      return bnn.BatchNorm(use_running_average=not train, momentum=0.5,
                           epsilon=EPS)(x)

  rng = np.random.default_rng(2)
  net = Net()
  x = jnp.asarray(rng.normal(2.0, 3.0, (32, 4)), jnp.float32)
  variables = net.init(jax.random.key(0), x, train=False)
  for i in range(3):
    _, upd = net.apply(variables, x[8 * i:8 * i + 8], train=True,
                       mutable=["batch_stats"])
    variables = {**variables, **upd}
  p, s = variables["params"], variables["batch_stats"]["BatchNorm_0"]
  assert float(jnp.max(jnp.abs(s["mean"]))) > 0.1  # non-trivial statistics
  fk, fb = bn_jax.fold_batch_norm(p["Dense_0"]["kernel"], None, s,
                                  p["BatchNorm_0"]["scale"],
                                  p["BatchNorm_0"]["bias"], epsilon=EPS)
  np.testing.assert_allclose(x @ fk + fb, net.apply(variables, x, train=False),
                             rtol=1e-5, atol=1e-5)


def test_fold_bad_shapes_name_the_argument():
  k = jnp.ones((5, 4))
  state = BatchNormState(jnp.zeros(4), jnp.ones(4))
  fold = bn_jax.fold_batch_norm
  with pytest.raises(ValueError, match="kernel"):
    fold(jnp.ones(4), None, state)
  with pytest.raises(ValueError, match="state.mean"):
    fold(k, None, BatchNormState(jnp.zeros(3), jnp.ones(4)))
  with pytest.raises(ValueError, match="state.var"):
    fold(k, None, {"mean": jnp.zeros(4), "var": jnp.ones(5)})
  with pytest.raises(ValueError, match="'var'"):
    fold(k, None, {"mean": jnp.zeros(4)})
  with pytest.raises(ValueError, match="bias"):
    fold(k, jnp.zeros(5), state)
  with pytest.raises(ValueError, match="scale"):
    fold(k, None, state, jnp.ones((4, 1)))
  with pytest.raises(ValueError, match="bn_bias"):
    fold(k, None, state, None, jnp.ones(3))
  with pytest.raises(ValueError, match="epsilon"):
    fold(k, None, state, epsilon=0.0)
  with pytest.raises(TypeError, match="kernel"):
    fold(jnp.ones((5, 4), jnp.int32), None, state)
  with pytest.raises(TypeError, match="state"):
    fold(k, None, (jnp.zeros(4), jnp.ones(4)))
