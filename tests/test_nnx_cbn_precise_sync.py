"""bn_jax.nnx: CBN layers, PreciseBN and SyncBN.

* ConvCBN/LinearCBN over a 20-step training sequence (kernel moving every
  step, so the window's compensation matters) equal the functional
  :func:`bn_jax.cross_iteration_batch_norm` threading its own state.
* ``bn_jax.nnx.precise_batch_stats`` over batches of unequal sizes equals
  NumPy float64 population statistics of every layer's input.
* SyncBN: a jitted NNX train step over a batch sharded across 8 simulated
  CPU devices (tests/conftest.py sets them), with unequal valid counts per
  device through a mask, equals single-device BN on the whole batch.

Float32 tolerances: see each test (relative to the largest magnitude).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax.sharding import Mesh, PartitionSpec as P

import bn_jax
import bn_jax.nnx as bx


def _close(got, want, what, tol, scale=None):
  """|got - want| <= tol * scale, scale defaulting to max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  if scale is None:
    scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want)))
  assert err <= tol * scale, f"{what}: max error {err} > {tol} * {scale}"


def _data(shape, seed, loc=0.5, spread=1.5):
  rng = np.random.default_rng(seed)
  return jnp.asarray(loc + spread * rng.standard_normal(shape), jnp.float32)


# CBN: both sides run the same core function on the same inputs; XLA may
# fuse the two programs differently. Per step <= ~60 roundings (a window of
# 3 compensated moments, each a sum of <= 50 terms, and the affine map), so
# ~60 eps_f32 ~ 7e-6 relative to the largest magnitude; 20 steps of EMA
# carry at most that error each (momentum < 1 contracts it): TOL 1e-4
# (>= 10x). A wrong window, step counter or compensation is off by >= 1e-2.
CBN_TOL = 1e-4


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cbn_layers_equal_functional_cbn_over_20_steps(kind):
  steps, window, burn_in = 20, 3, 2
  options = dict(burn_in=burn_in, momentum=0.8)
  if kind == "linear":
    layer = bx.LinearCBN(3, 4, window=window, rngs=nnx.Rngs(0), **options)
    xs = _data((steps, 6, 3), 1)
    flax_layer = linen.Dense(4, use_bias=False, parent=None)
  else:
    layer = bx.ConvCBN(2, 4, (3, 3), window=window, rngs=nnx.Rngs(0),
                       **options)
    xs = _data((steps, 2, 5, 5, 2), 1)
    flax_layer = linen.Conv(4, (3, 3), use_bias=False, parent=None)
  rng = np.random.default_rng(2)
  layer.scale[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(4),
                                 jnp.float32)
  layer.bias[...] = jnp.asarray(0.2 * rng.standard_normal(4), jnp.float32)
  kernel0 = layer.kernel[...]
  # The kernel moves every step as an optimizer would move it.
  deltas = 0.05 * _data((steps,) + kernel0.shape, 3, 0.0, 1.0)

  def layer_fn(x, w):
    return flax_layer.apply({"params": {"kernel": w}}, x)

  @jax.jit
  def core_step(x, w, state, scale, bias):
    return bn_jax.cross_iteration_batch_norm(
        layer_fn, w, x, state, scale, bias, train=True, **options)

  @nnx.jit
  def nnx_step(layer, x, delta):
    layer.kernel[...] = layer.kernel[...] + delta
    return layer(x)

  state = bn_jax.cbn_state(kernel0, 4, window)
  w = kernel0
  for t in range(steps):
    w = w + deltas[t]
    y_ref, state = core_step(xs[t], w, state, layer.scale[...],
                             layer.bias[...])
    y = nnx_step(layer, xs[t], deltas[t])
    _close(y, y_ref, f"{kind} y at step {t}", CBN_TOL)
  for field, want in zip(bn_jax.CBNState._fields, state):
    _close(getattr(layer, field)[...], want, f"{kind} state.{field}",
           CBN_TOL)
  assert int(layer.step[...]) == steps
  # Eval mode: the running statistics' affine map.
  layer.eval()
  z = np.asarray(layer_fn(xs[0], w), np.float64)
  mean, var = np.asarray(state.mean), np.asarray(state.var)
  want = (z - mean) / np.sqrt(var + 1e-5) * np.asarray(
      layer.scale[...]) + np.asarray(layer.bias[...])
  _close(layer(xs[0]), want, f"{kind} eval", CBN_TOL)
  # The whole running state is BatchStat-typed.
  stats = nnx.to_flat_state(nnx.state(layer, nnx.BatchStat))
  assert {str(path[-1]) for path, _ in stats} == set(bn_jax.CBNState._fields)


class _Net(nnx.Module):
  """Linear -> BatchNorm -> relu -> Linear -> BatchRenorm (PreciseBN)."""

  def __init__(self, rngs):
    self.linear1 = nnx.Linear(3, 4, rngs=rngs)
    self.bn1 = bx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.linear2 = nnx.Linear(4, 2, rngs=rngs)
    self.bn2 = bx.BatchRenorm(2, r_max=1.0, d_max=0.0, rngs=rngs)

  def __call__(self, x):
    return self.bn2(self.linear2(jax.nn.relu(self.bn1(self.linear1(x)))))


def test_precise_batch_stats_equals_numpy_population_statistics():
  """Batches of 5 and 11 samples (unequal): every layer's mean/var become
  the mean and biased variance of its inputs over the 16 samples, in
  float64. The float32 forward (a 3- or 4-term matmul and BN over <= 11
  samples, ~20 roundings) and the shifted population sums (~20 more) are
  within ~40 eps_f32 ~ 5e-6 of float64 relative to the largest magnitude;
  TOL 5e-5 (10x). Weights and other state stay as they were."""
  net = _Net(nnx.Rngs(0))
  batches = [_data((n, 3), 10 + i, 2.0, 3.0) for i, n in enumerate((5, 11))]
  params_before = jax.tree.map(np.asarray, nnx.state(net, nnx.Param))
  step_before = int(net.bn2.step[...])

  w1 = np.asarray(net.linear1.kernel[...], np.float64)
  b1 = np.asarray(net.linear1.bias[...], np.float64)
  w2 = np.asarray(net.linear2.kernel[...], np.float64)
  b2 = np.asarray(net.linear2.bias[...], np.float64)
  z1 = [np.asarray(b, np.float64) @ w1 + b1 for b in batches]
  # bn1 in training mode (its own batch's statistics; scale 1, bias 0);
  # bn2 with r_max=1, d_max=0 is BN too.
  h = [np.maximum((z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5), 0.0)
       for z in z1]
  z2 = [a @ w2 + b2 for a in h]
  bx.precise_batch_stats(net, batches)
  for layer, inputs in ((net.bn1, z1), (net.bn2, z2)):
    union = np.concatenate(inputs)
    _close(layer.mean[...], union.mean(0), "population mean", 5e-5)
    _close(layer.var[...], union.var(0), "population var", 5e-5)
  after = jax.tree.map(np.asarray, nnx.state(net, nnx.Param))
  assert jax.tree.all(jax.tree.map(np.array_equal, params_before, after))
  assert int(net.bn2.step[...]) == step_before
  # num_batches and its errors, as the Linen version.
  with pytest.raises(ValueError, match="num_batches=3 but batches yielded"):
    bx.precise_batch_stats(net, batches, num_batches=3)
  with pytest.raises(ValueError, match="num_batches must be"):
    bx.precise_batch_stats(net, batches, num_batches=0)
  with pytest.raises(ValueError, match="no bn_jax.nnx batch-statistics"):
    bx.precise_batch_stats(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), batches)
  with pytest.raises(TypeError, match="model must be an nnx.Module"):
    bx.precise_batch_stats(lambda x: x, batches)


NUM_DEVICES = 8
AXIS = "batch"


class _SyncNet(nnx.Module):

  def __init__(self, axis_name, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.bn = bx.BatchNorm(4, momentum=0.7, axis_name=axis_name, rngs=rngs)

  def __call__(self, x, mask):
    return self.bn(self.linear(x), mask=mask)


def test_sync_batch_norm_nnx_train_step_on_8_devices_equals_whole_batch():
  """Per-device valid counts 4, 3, 2, 1, 0, 4, 3, 2 (of 4 each): the
  sharded jitted step's outputs, gradients and new running statistics
  equal one device's BN on the whole masked batch. Float32: the same sums
  in a different order (8 partial sums, then a psum), < ~40 roundings:
  ~5e-6 relative; TOL 5e-5 (10x)."""
  if jax.device_count() < NUM_DEVICES:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS="
                "--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), (AXIS,))
  per_device = 4
  n = NUM_DEVICES * per_device
  x = _data((n, 3), 20, 1.0, 2.0)
  w = _data((n, 4), 21, 0.0, 1.0)
  valid = [4, 3, 2, 1, 0, 4, 3, 2]
  mask = np.zeros((n, 1), bool)
  for d, v in enumerate(valid):
    mask[d * per_device:d * per_device + v] = True
  mask = jnp.asarray(mask)

  def loss_fn(model, x, w, mask):
    y = model(x, mask)
    return jnp.sum(jnp.where(mask, w * jnp.sin(y), 0.0)), y

  synced = _SyncNet(AXIS, nnx.Rngs(0))
  graphdef, state = nnx.split(synced)

  def device_step(state, x, w, mask):
    model = nnx.merge(graphdef, state)
    (_, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        model, x, w, mask)
    # Each device's share of the gradient; the total is their sum.
    grads = jax.lax.psum(grads, AXIS)
    return y, grads, nnx.state(model, nnx.BatchStat)

  train_step = jax.jit(jax.shard_map(
      device_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
      out_specs=(P(AXIS), P(), P()), check_vma=False))
  y, grads, stats = train_step(state, x, w, mask)

  single = _SyncNet(None, nnx.Rngs(0))

  @nnx.jit
  def single_step(model, x, w, mask):
    (_, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        model, x, w, mask)
    return y, grads

  y_ref, grads_ref = single_step(single, x, w, mask)
  _close(y, y_ref, "y", 5e-5)
  flat = dict(nnx.to_flat_state(grads))
  # Relative to the largest gradient entry: the linear bias's gradient is 0
  # in exact arithmetic (BN removes a per-feature shift), rounding noise here.
  grad_scale = max(float(np.max(np.abs(np.asarray(v[...]))))
                   for _, v in nnx.to_flat_state(grads_ref))
  for path, value in nnx.to_flat_state(grads_ref):
    _close(flat[path][...], value[...], f"grad {path}", 5e-5, grad_scale)
  _close(stats["bn"]["mean"][...], single.bn.mean[...], "running mean", 5e-5)
  _close(stats["bn"]["var"][...], single.bn.var[...], "running var", 5e-5)
  # The statistics are those of the 19 valid samples (not of all 32).
  z = np.asarray(single.linear(x), np.float64)[np.asarray(mask[:, 0])]
  _close(single.bn.mean[...], 0.3 * z.mean(0), "mean of valid samples", 5e-5)
