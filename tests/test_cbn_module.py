"""ConvCBN / DenseCBN (Flax) and SyncBN of the functional CBN."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bn_jax
from bn_jax.nn import ConvCBN, DenseCBN

EPS = 1e-5


def _normal(seed, shape, loc=0.0):
  return np.random.default_rng(seed).normal(loc, 1.0, shape).astype(np.float32)


def _lax_conv(strides, groups):
  def layer_fn(x, w):
    return jax.lax.conv_general_dilated(
        x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)
  return layer_fn


def test_conv_cbn_train_step_under_jit_window_in_batch_stats_eval_running():
  module = ConvCBN(6, (3, 3), strides=2, feature_group_count=2, window=3,
                   momentum=0.9)
  x = _normal(0, (4, 8, 8, 4), loc=0.5)
  variables = module.init(jax.random.PRNGKey(0), x, use_running_average=True)
  params, stats = variables["params"], variables["batch_stats"]
  # Same kernel shape and initializer as flax.linen.Conv.
  flax_conv = nn.Conv(6, (3, 3), strides=2, feature_group_count=2,
                      use_bias=False).init(jax.random.PRNGKey(0), x)
  assert params["kernel"].shape == flax_conv["params"]["kernel"].shape
  assert stats["window_weight"].shape == (2, 3, 3, 2, 6)
  assert stats["window_dvar"].shape == (2, 3, 3, 2, 6)
  traces = []

  @jax.jit
  def train_step(params, stats, x):
    traces.append(1)

    def loss_fn(params):
      y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                use_running_average=False,
                                mutable=["batch_stats"])
      return jnp.mean((y - 1.0)**2), (y, updates["batch_stats"])

    grads, (y, new_stats) = jax.grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, new_stats, y

  layer_fn = _lax_conv((2, 2), 2)
  # The reference: the core function with lax's conv (jitted: one compile
  # instead of op-by-op execution of CBN's per-layer derivatives).
  core = jax.jit(lambda kernel, x, state, scale, bias:
                 bn_jax.cross_iteration_batch_norm(
                     layer_fn, kernel, x, state, scale, bias, train=True,
                     window=3, momentum=0.9))
  for t in range(4):
    state = bn_jax.CBNState(**stats)
    # The module is the core function with flax's conv: same output.
    y_core, _ = core(params["kernel"], x + t, state, params["scale"],
                     params["bias"])
    params, stats, y = train_step(params, stats, x + t)
    np.testing.assert_allclose(y, y_core, rtol=1e-5, atol=1e-5)
  assert len(traces) == 1
  assert int(stats["window_count"]) == 2 and int(stats["step"]) == 4
  # Eval: the running statistics, with flax's conv; state untouched.
  y_eval = module.apply({"params": params, "batch_stats": stats}, x,
                        use_running_average=True)
  z = np.asarray(layer_fn(x, params["kernel"]), np.float64)
  ref = ((z - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) +
                                                   EPS)
         * np.asarray(params["scale"]) + np.asarray(params["bias"]))
  np.testing.assert_allclose(y_eval, ref, rtol=1e-5, atol=1e-5)


def test_dense_cbn_precise_bn_hook_and_call_time_mode():
  module = DenseCBN(3, window=2)  # use_running_average given at call time
  x = _normal(1, (5, 4), loc=1.0)
  variables = module.init(jax.random.PRNGKey(1), x, use_running_average=False)
  assert variables["params"]["kernel"].shape == (4, 3)
  assert int(variables["batch_stats"]["step"]) == 0  # init does not update
  y, updates = jax.jit(functools.partial(
      module.apply, use_running_average=False,
      mutable=["batch_stats", "batch_moments"]))(variables, x)
  z = x.astype(np.float64) @ np.asarray(variables["params"]["kernel"])
  np.testing.assert_allclose(updates["batch_moments"]["mean"], z.mean(0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["batch_moments"]["var"], z.var(0),
                             rtol=1e-4, atol=1e-6)
  assert float(updates["batch_moments"]["count"]) == 5
  np.testing.assert_allclose(y, (z - z.mean(0)) / np.sqrt(z.var(0) + EPS),
                             rtol=1e-4, atol=1e-4)
  assert int(updates["batch_stats"]["window_count"]) == 1
  with pytest.raises(Exception, match="use_running_average"):
    module.apply(variables, x)


def test_bfloat16_compute_keeps_float32_statistics():
  module = ConvCBN(4, (3, 3), window=2, dtype=jnp.bfloat16)
  x = _normal(2, (2, 6, 6, 3), loc=0.5)
  variables = module.init(jax.random.PRNGKey(2), x, use_running_average=True)
  step = jax.jit(functools.partial(module.apply, use_running_average=False,
                                   mutable=["batch_stats"]))
  for _ in range(2):
    y, upd = step(variables, x)
    variables = {"params": variables["params"], **upd}
  assert y.dtype == jnp.bfloat16
  stats = variables["batch_stats"]
  assert stats["mean"].dtype == jnp.float32
  assert stats["window_mean"].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  np.testing.assert_allclose(jnp.std(y.astype(jnp.float32), axis=(0, 1, 2)),
                             1.0, atol=0.1)


def test_sync_cbn_over_devices_equals_one_device_on_the_whole_batch():
  devices = np.array(jax.devices()[:4])
  if devices.size < 4:
    pytest.skip("needs 4 (simulated) devices; conftest sets 8")
  mesh = jax.sharding.Mesh(devices, ("d",))
  layer_fn = _lax_conv((1, 1), 1)
  w0 = _normal(3, (3, 3, 2, 3)) * 0.3
  xs = [_normal(10 + t, (8, 4, 4, 2), loc=0.3 * t) for t in range(3)]
  kw = dict(train=True, window=3, momentum=0.9)

  def one(w, x, s):
    return bn_jax.cross_iteration_batch_norm(layer_fn, w, x, s, **kw)

  def per_device(w, x, s):
    return bn_jax.cross_iteration_batch_norm(layer_fn, w, x, s,
                                             axis_name="d", **kw)

  state_spec = jax.tree.map(lambda _: P(), bn_jax.cbn_state(w0, 3, 3))
  sharded = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P("d"), state_spec),
      out_specs=(P("d"), state_spec)))
  single = jax.jit(one)
  s1 = s2 = bn_jax.cbn_state(w0, 3, 3)
  for t in range(3):
    w = w0 + 0.05 * t
    y1, s1 = single(w, xs[t], s1)
    y2, s2 = sharded(w, xs[t], s2)
    np.testing.assert_allclose(y2, y1, rtol=1e-4, atol=1e-4)
  for a, b in zip(s2, s1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
