"""SyncBN: batch_norm with ``axis_name`` over 8 simulated CPU devices.

The reference is single-device batch_norm on the whole (or, with masks, the
concatenated valid) batch, itself checked against NumPy in
test_batch_norm.py. ``tests/conftest.py`` sets 8 host devices.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import bn_jax
from bn_jax import batch_norm, batch_norm_state

NUM_DEVICES = 8
AXIS = "batch"
C = 3
MOMENTUM = 0.7
EPS = 1e-3


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (conftest sets XLA_FLAGS="
                "--xla_force_host_platform_device_count=8 before jax starts)")
  return Mesh(np.array(jax.devices()[:NUM_DEVICES]), (AXIS,))


def _data(shape, seed):
  rng = np.random.default_rng(seed)
  return (1.5 + 2.0 * rng.standard_normal(shape)).astype(np.float32)


def _params():
  rng = np.random.default_rng(1)
  return (jnp.asarray(1.0 + 0.3 * rng.standard_normal(C), jnp.float32),
          jnp.asarray(0.2 * rng.standard_normal(C), jnp.float32))


def _sharded_loss(mesh, **bn_kwargs):
  """loss(x, w, scale, bias, mask) with BN synchronised over the mesh."""

  def per_device(x, w, scale, bias, mask, state):
    y, new_state = batch_norm(x, state, scale, bias, train=True,
                              axis_name=AXIS, momentum=MOMENTUM, epsilon=EPS,
                              mask=mask, **bn_kwargs)
    # Each device's share of the loss; the total is summed across devices.
    return jax.lax.psum(jnp.sum(w * jnp.sin(y)), AXIS), (y, new_state)

  sharded = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(AXIS), P(AXIS), P(), P(), P(AXIS), P()),
      out_specs=(P(), (P(AXIS), P())))
  return jax.jit(jax.value_and_grad(sharded, argnums=(0, 2, 3), has_aux=True))


def _single_device_loss(**bn_kwargs):

  def loss(x, w, scale, bias, state):
    y, new_state = batch_norm(x, state, scale, bias, train=True,
                              momentum=MOMENTUM, epsilon=EPS, **bn_kwargs)
    return jnp.sum(w * jnp.sin(y)), (y, new_state)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3), has_aux=True))


def _assert_close(got, want, what, tol=2e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol,
                             atol=tol, err_msg=what)


def test_sync_bn_equals_single_device_bn_on_the_whole_batch(mesh):
  per_device = 4
  x = jnp.asarray(_data((NUM_DEVICES * per_device, 2, C), seed=0))
  w = jnp.asarray(_data(x.shape, seed=5))
  scale, bias = _params()
  state = bn_jax.BatchNormState(jnp.full(C, 0.1), jnp.full(C, 2.0))
  ones = jnp.ones(x.shape[:1] + (1, 1), bool)
  (loss, (y, new_state)), grads = _sharded_loss(
      mesh, unbiased_running_var=True)(x, w, scale, bias, ones, state)
  (loss_ref, (y_ref, state_ref)), grads_ref = _single_device_loss(
      unbiased_running_var=True)(x, w, scale, bias, state)
  _assert_close(loss, loss_ref, "loss")
  _assert_close(y, y_ref, "y")
  _assert_close(new_state.mean, state_ref.mean, "running mean")
  _assert_close(new_state.var, state_ref.var, "running var")
  for name, g, g_ref in zip(("dx", "dscale", "dbias"), grads, grads_ref):
    _assert_close(g, g_ref, name)
  # Per-device BN (no axis_name) would differ: the comparison can fail.
  y_local, _ = jax.vmap(lambda xs: batch_norm(xs, state, scale, bias,
                                              train=True, epsilon=EPS))(
                                                  x.reshape(NUM_DEVICES, -1,
                                                            2, C))
  assert np.max(np.abs(np.asarray(y_local).reshape(y.shape) - y)) > 1e-2


def test_sync_bn_with_unequal_valid_counts_per_device(mesh):
  """Device 0 holds 1 valid sample, device 1 holds 7, one device holds none.

  Averaging per-device statistics would weight the lone sample like seven;
  SyncBN must weight by counts and equal BN on the valid samples only.
  """
  slots = 7
  valid_counts = np.array([1, 7, 3, 0, 5, 2, 6, 4])
  mask = np.zeros((NUM_DEVICES, slots), bool)
  for d, n in enumerate(valid_counts):
    mask[d, :n] = True
  mask = mask.reshape(-1)
  x = jnp.asarray(_data((NUM_DEVICES * slots, C), seed=2))
  w = jnp.asarray(_data(x.shape, seed=6)) * mask[:, None]  # loss on valid only
  scale, bias = _params()
  state = batch_norm_state(C)
  (_, (y, new_state)), (dx, dscale, dbias) = _sharded_loss(
      mesh, unbiased_running_var=True)(x, w, scale, bias,
                                       jnp.asarray(mask[:, None]), state)
  (_, (y_ref, state_ref)), (dx_ref, dscale_ref, dbias_ref) = (
      _single_device_loss(unbiased_running_var=True)(
          x[mask], w[mask], scale, bias, state))
  _assert_close(y[mask], y_ref, "y on valid samples")
  _assert_close(new_state.mean, state_ref.mean, "running mean")
  _assert_close(new_state.var, state_ref.var, "running var (Bessel, n=28)")
  _assert_close(dx[mask], dx_ref, "dx on valid samples")
  _assert_close(dx[~mask], 0.0, "dx on padding")
  _assert_close(dscale, dscale_ref, "dscale")
  _assert_close(dbias, dbias_ref, "dbias")
  assert np.all(np.isfinite(np.asarray(y)))
  # The count-blind average of per-device means is measurably different.
  xs = np.asarray(x).reshape(NUM_DEVICES, slots, C)
  ms = mask.reshape(NUM_DEVICES, slots)
  per_device_means = [xs[d][ms[d]].mean(0) for d in range(NUM_DEVICES)
                      if ms[d].any()]
  naive_mean = (1 - MOMENTUM) * np.mean(per_device_means, 0)
  assert np.max(np.abs(naive_mean - np.asarray(new_state.mean))) > 1e-2


def test_pmap_axis_name_matches_single_device():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices")
  x = jnp.asarray(_data((NUM_DEVICES, 3, C), seed=4))
  scale, bias = _params()
  state = batch_norm_state(C)
  fn = jax.pmap(functools.partial(batch_norm, train=True, axis_name=AXIS,
                                  momentum=MOMENTUM, epsilon=EPS),
                axis_name=AXIS, in_axes=(0, None, None, None))
  y, new_state = fn(x, state, scale, bias)
  y_ref, state_ref = batch_norm(x.reshape(-1, C), state, scale, bias,
                                train=True, momentum=MOMENTUM, epsilon=EPS)
  _assert_close(y.reshape(-1, C), y_ref, "y")
  _assert_close(new_state.mean[0], state_ref.mean, "running mean")
  _assert_close(new_state.var[3], state_ref.var, "running var")


def test_ghost_with_axis_name_is_rejected():
  with pytest.raises(ValueError, match="ghost_batch_size"):
    batch_norm(jnp.ones((4, C)), batch_norm_state(C), train=True,
               axis_name=AXIS, ghost_batch_size=2)
