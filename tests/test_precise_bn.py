"""PreciseBN (Wu & Johnson 2021, section 4): population statistics checked
against NumPy float64 references over the whole data set."""
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
import bn_jax.nn as bnn
from bn_jax.core.precise_batch_norm import (aggregate_batch_moments,
                                            pool_moments)

EPS = 1e-5
BATCH_SIZES = (7, 13, 20, 10)  # unequal on purpose: weights must be counts


class _MLP(fnn.Module):
  """Dense -> BN -> relu -> Dense -> BN, BN in train mode when train."""

  @fnn.compact
  def __call__(self, x, train: bool):
    x = fnn.Dense(6, name="Dense_0")(x)
    x = bnn.BatchNorm(use_running_average=not train, momentum=0.9,
                      name="BatchNorm_0")(x)
    x = fnn.relu(x)
    x = fnn.Dense(3, name="Dense_1")(x)
    return bnn.BatchNorm(use_running_average=not train, momentum=0.9,
                         name="BatchNorm_1")(x)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  data = rng.normal(2.0, 3.0, (sum(BATCH_SIZES), 4)).astype(np.float32)
  splits = np.cumsum(BATCH_SIZES)[:-1]
  batches = np.split(data, splits)
  model = _MLP()
  variables = model.init(jax.random.key(1), jnp.asarray(data[:2]),
                         train=False)
  # Non-trivial affine parameters of the first BN, so that the second layer's
  # input depends on them.
  params = jax.tree.map(np.asarray, variables["params"])
  params["BatchNorm_0"]["scale"] = rng.uniform(0.5, 2.0, 6).astype(np.float32)
  params["BatchNorm_0"]["bias"] = rng.normal(0.0, 1.0, 6).astype(np.float32)
  variables = {"params": params, "batch_stats": variables["batch_stats"]}
  apply_fn = lambda v, b, **kw: model.apply(v, b, train=True, **kw)  # noqa
  precise = bn_jax.precise_batch_stats(apply_fn, variables, batches)
  return model, variables, batches, data, precise


def _reference_second_layer_inputs(params, batches):
  """Per-batch inputs of BatchNorm_1 in train mode, in NumPy float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  out = []
  for b in batches:
    z1 = b.astype(np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    n1 = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + EPS)
    h = np.maximum(n1 * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"],
                   0.0)
    out.append(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
  return out


def test_first_layer_equals_dataset_population_statistics(setup):
  _, variables, _, data, precise = setup
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  z1 = data.astype(np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  np.testing.assert_allclose(precise["BatchNorm_0"]["mean"], z1.mean(0),
                             rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(precise["BatchNorm_0"]["var"], z1.var(0),
                             rtol=2e-6)
  assert precise["BatchNorm_0"]["mean"].dtype == jnp.float32


def test_second_layer_equals_count_weighted_formula(setup):
  _, variables, batches, _, precise = setup
  zs = _reference_second_layer_inputs(variables["params"], batches)
  n = np.array([len(z) for z in zs], np.float64)[:, None]
  mu_b = np.stack([z.mean(0) for z in zs])
  var_b = np.stack([z.var(0) for z in zs])
  mu_pop = (n * mu_b).sum(0) / n.sum()
  var_pop = (n * (mu_b ** 2 + var_b)).sum(0) / n.sum() - mu_pop ** 2
  np.testing.assert_allclose(precise["BatchNorm_1"]["mean"], mu_pop,
                             rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(precise["BatchNorm_1"]["var"], var_pop,
                             rtol=2e-6)
  # Not the same as the unweighted average of the batch statistics.
  assert np.max(np.abs(mu_b.mean(0) - mu_pop)) > 1e-3


def test_ema_running_statistics_differ_from_precise(setup):
  model, variables, batches, _, precise = setup
  batch_stats = variables["batch_stats"]
  for b in batches:  # frozen weights, EMA updates only
    _, upd = model.apply({**variables, "batch_stats": batch_stats}, b,
                         train=True, mutable=["batch_stats"])
    batch_stats = upd["batch_stats"]
  for layer in ("BatchNorm_0", "BatchNorm_1"):
    for k in ("mean", "var"):
      gap = np.max(np.abs(np.asarray(batch_stats[layer][k]) -
                          np.asarray(precise[layer][k])))
      assert gap > 1e-2, (layer, k, gap)


def test_frozen_weights_and_other_entries_untouched():
  x = np.random.default_rng(3).normal(-4.0, 0.5, (30, 2)).astype(np.float32)
  mod = bnn.BatchRenorm(momentum=0.5)
  variables = mod.init(jax.random.key(0), x[:4], use_running_average=True)
  variables = {"params": variables["params"],
               "batch_stats": {**variables["batch_stats"],
                               "step": jnp.asarray(7, jnp.int32)}}
  apply_fn = lambda v, b, **kw: mod.apply(v, b, **kw)  # noqa: E731
  new = bn_jax.precise_batch_stats(apply_fn, variables, [x[:12], x[12:]],
                                   use_running_average=False)
  assert int(new["step"]) == 7 and new["step"].dtype == jnp.int32
  np.testing.assert_allclose(new["mean"], x.astype(np.float64).mean(0),
                             rtol=1e-6)
  np.testing.assert_allclose(new["var"], x.astype(np.float64).var(0),
                             rtol=1e-5)


def test_num_batches_takes_a_prefix_of_an_iterator():
  x = np.random.default_rng(4).normal(1.0, 2.0, (40, 3)).astype(np.float32)
  mod = bnn.BatchNorm()
  variables = mod.init(jax.random.key(0), x[:4], use_running_average=True)
  apply_fn = lambda v, b, **kw: mod.apply(v, b, **kw)  # noqa: E731
  gen = (x[i:i + 8] for i in range(0, 40, 8))
  new = bn_jax.precise_batch_stats(apply_fn, variables, gen, num_batches=3,
                                   use_running_average=False)
  np.testing.assert_allclose(new["mean"], x[:24].astype(np.float64).mean(0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], x[:24].astype(np.float64).var(0),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="num_batches=9"):
    bn_jax.precise_batch_stats(apply_fn, variables, [x[:8]] * 2,
                               num_batches=9, use_running_average=False)
  with pytest.raises(ValueError, match="batches is empty"):
    bn_jax.precise_batch_stats(apply_fn, variables, [],
                               use_running_average=False)
  with pytest.raises(ValueError, match="training mode"):
    bn_jax.precise_batch_stats(apply_fn, variables, [x[:8]],
                               use_running_average=True)
  with pytest.raises(ValueError, match="batch_stats"):
    bn_jax.precise_batch_stats(apply_fn, {"params": variables["params"]},
                               [x[:8]], use_running_average=False)
  with pytest.raises(ValueError, match="num_batches"):
    bn_jax.precise_batch_stats(apply_fn, variables, [x[:8]], num_batches=0,
                               use_running_average=False)


def test_aggregate_batch_moments_is_accurate_far_from_zero():
  # |mean| = 1e4 * std: E[mu_B^2 + var_B] - mu^2 in float32 would be
  # rounding noise of order 1e8 * 6e-8 = 6; the pivot keeps it accurate.
  rng = np.random.default_rng(5)
  data = rng.normal(1e4, 1.0, (400, 2))
  pieces = np.split(data, [50, 170, 300])
  moments = [{"mean": jnp.asarray(p.mean(0), jnp.float32),
              "var": jnp.asarray(p.var(0), jnp.float32),
              "count": jnp.asarray(len(p), jnp.float32)} for p in pieces]
  out = aggregate_batch_moments(moments)
  # float32 at 1e4: the inputs and the result carry 0.5 ulp (6e-8) each;
  # measured 1.9e-8 relative, 4 ulps (4.8e-7) is >= 10x that and still
  # 20x below an unweighted mean of the pieces (~1e-5 relative).
  np.testing.assert_allclose(out["mean"], data.mean(0), rtol=4 * 1.2e-7)
  np.testing.assert_allclose(out["var"], data.var(0), rtol=2e-3)
  # A nested tree and per-feature counts work the same way.
  nested = aggregate_batch_moments([{"a": {"b": m}} for m in moments])
  np.testing.assert_array_equal(nested["a"]["b"]["var"], out["var"])
  per_feature = [dict(m, count=jnp.full(2, m["count"])) for m in moments]
  np.testing.assert_allclose(aggregate_batch_moments(per_feature)["var"],
                             out["var"], rtol=1e-6)
  with pytest.raises(ValueError, match="at least one batch"):
    aggregate_batch_moments([])
  with pytest.raises(ValueError, match="count"):
    aggregate_batch_moments([dict(moments[0], count=jnp.ones(3))])


def test_pool_moments_is_the_union():
  rng = np.random.default_rng(6)
  groups = [rng.normal(k, 1.0 + k, (n, 3)) for k, n in enumerate((3, 5, 9))]
  mean = jnp.asarray(np.stack([g.mean(0) for g in groups]))
  var = jnp.asarray(np.stack([g.var(0) for g in groups]))
  count = jnp.asarray([[3.0], [5.0], [9.0]])
  m, v, n = pool_moments(mean, var, count, axis=0)
  union = np.concatenate(groups)
  # float32 inputs rounded once (0.5 ulp) and pooled in a few ops: measured
  # 1.1e-7 relative; 32 ulps (3.8e-6) is >= 10x that, while pooling without
  # the between-group term or with unweighted counts is off by > 1e-2.
  np.testing.assert_allclose(m, union.mean(0), rtol=32 * 1.2e-7)
  np.testing.assert_allclose(v, union.var(0), rtol=32 * 1.2e-7)
  np.testing.assert_array_equal(n, np.full(3, 17.0))
