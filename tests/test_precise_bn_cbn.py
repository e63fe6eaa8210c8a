"""PreciseBN of a network of Cross-Iteration BN layers.

At evaluation every layer is normalized by population statistics, so while
PreciseBN measures a layer's population statistics, the layers below it must
normalize their input with the current batch's own statistics -- not with a
CBN window still holding the training run's small, stale batches. The
reference is a NumPy float64 forward of the same two-layer network in which
each layer is normalized by the batch's own (biased) statistics.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bn_jax

EPS = 1e-5


class TwoCBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = bn_jax.nn.DenseCBN(6, window=4, burn_in=0, epsilon=EPS,
                           use_running_average=not train)(x)
    h = nn.relu(h)
    return bn_jax.nn.DenseCBN(3, window=4, burn_in=0, epsilon=EPS,
                              use_running_average=not train)(h)


def _numpy_population_second_layer(x, w1, w2):
  z1 = x @ w1
  y1 = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + EPS)
  z2 = np.maximum(y1, 0.0) @ w2
  return z2.mean(0), z2.var(0)


def test_precise_bn_of_stacked_cbn_layers_ignores_the_training_windows():
  model = TwoCBN()
  rng = np.random.default_rng(0)
  # Jitted, as in training (op by op, CBN's Jacobians alone made ~200 small
  # compilations).
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.PRNGKey(0), jnp.zeros((2, 5)), train=False)
  params, stats = variables["params"], variables["batch_stats"]
  train_apply = jax.jit(functools.partial(model.apply, train=True,
                                          mutable=["batch_stats"]))
  # Training steps at batch 2 with shifted inputs fill both windows with
  # entries far from the population's statistics.
  for _ in range(3):
    small = jnp.asarray(rng.normal(3.0, 0.3, (2, 5)), jnp.float32)
    _, upd = train_apply({"params": params, "batch_stats": stats}, small)
    stats = upd["batch_stats"]
  assert int(stats["DenseCBN_1"]["window_count"]) == 3

  x = rng.normal(0.0, 1.0, (64, 5))
  new = bn_jax.precise_batch_stats(
      lambda v, b, **kw: model.apply(v, b, **kw),
      {"params": params, "batch_stats": stats},
      [jnp.asarray(x, jnp.float32)], train=True)

  w1 = np.asarray(params["DenseCBN_0"]["kernel"], np.float64)
  w2 = np.asarray(params["DenseCBN_1"]["kernel"], np.float64)
  mean2, var2 = _numpy_population_second_layer(x, w1, w2)
  # float32 forward of a 64x5 and a 64x6 product plus a normalization:
  # relative errors ~1e-6; 1e-4 of the largest magnitude is a 100x margin.
  scale = max(np.abs(mean2).max(), var2.max())
  np.testing.assert_allclose(new["DenseCBN_1"]["mean"], mean2,
                             atol=1e-4 * scale)
  np.testing.assert_allclose(new["DenseCBN_1"]["var"], var2,
                             atol=1e-4 * scale)
  # The windows themselves are kept for training to go on.
  np.testing.assert_array_equal(new["DenseCBN_1"]["window_count"],
                                stats["DenseCBN_1"]["window_count"])
