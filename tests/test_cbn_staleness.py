"""bn_jax.analysis.cbn_staleness against NumPy and the training record."""
import jax
import jax.numpy as jnp
import numpy as np

from bn_jax.analysis.cbn_staleness import cbn_staleness
from bn_jax.models import create_model

WINDOW = 4
STEPS = 6


def test_staleness_against_numpy_and_the_recorded_statistics():
  model = create_model("mlp", num_classes=3, norm="cbn",
                       norm_kwargs=dict(window=WINDOW), hidden=(6, 5),
                       activation="sigmoid")
  rng = np.random.default_rng(0)
  batches = [rng.normal(0.3, 1.0, (8, 7)).astype(np.float32)
             for _ in range(STEPS)]
  labels = rng.integers(0, 3, 8)
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(batches[0]),
                         train=False)

  @jax.jit
  def train_step(variables, x):
    def loss_fn(params):
      logits, upd = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, x,
          train=True, mutable=["batch_stats", "batch_moments"])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(logp[jnp.arange(8), labels]), upd
    grads, upd = jax.grad(loss_fn, has_aux=True)(variables["params"])
    # A large step, so the weights move visibly between entries.
    params = jax.tree.map(lambda p, g: p - 2.0 * g, variables["params"],
                          grads)
    return {"params": params, "batch_stats": upd["batch_stats"]}, upd[
        "batch_moments"]

  recorded, kernels = [], []
  for x in batches:
    kernels.append(np.asarray(variables["params"]["hidden_0"]["cbn"]
                              ["kernel"], np.float64))
    variables, moments = train_step(variables, jnp.asarray(x))
    recorded.append(moments)

  past = [jnp.asarray(b) for b in batches[::-1]]  # newest first
  report = cbn_staleness(
      lambda v, b, **kw: model.apply(v, b, **kw), variables, past,
      train=True)
  assert sorted(report) == ["hidden_0/cbn", "hidden_1/cbn"]
  for name in report:
    layer = report[name]
    # window k = 4 holds the last 3 steps (ages 1..3).
    np.testing.assert_array_equal(layer.ages, [1, 2, 3])
    for row, age in enumerate(layer.ages):
      # stale: what the training step stored (its batch_moments), age back.
      top, sub = name.split("/")
      stored = recorded[STEPS - age][top][sub]
      np.testing.assert_allclose(layer.stale_mean[row], stored["mean"],
                                 rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(layer.stale_var[row], stored["var"],
                                 rtol=1e-6, atol=1e-7)
  # First layer: its input is the data itself, so NumPy can recompute it.
  layer = report["hidden_0/cbn"]
  w_now = np.asarray(variables["params"]["hidden_0"]["cbn"]["kernel"],
                     np.float64)
  for row, age in enumerate(layer.ages):
    x = batches[STEPS - age].astype(np.float64)
    z = x @ w_now
    # float32 model vs float64 NumPy; O(10) operations on O(1) values:
    # 1e-5 is > 10x the rounding.
    np.testing.assert_allclose(layer.fresh_mean[row], z.mean(0), atol=1e-5)
    np.testing.assert_allclose(layer.fresh_var[row], z.var(0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(layer.mean_noise[row],
                               np.sqrt(z.var(0) / 8), rtol=1e-5)
    # The mean is linear in the layer's weight and the layer's input does
    # not change: the compensated mean is exact here, the stale one is not.
    np.testing.assert_allclose(layer.compensated_mean[row], z.mean(0),
                               atol=1e-5)
    z_old = x @ kernels[STEPS - age]
    np.testing.assert_allclose(layer.stale_mean[row], z_old.mean(0),
                               atol=1e-5)
    assert np.abs(layer.stale_mean[row] - z.mean(0)).max() > 1e-2
    # nu = E[z^2] is quadratic in theta: the first-order nu misses
    # E[dz^2], and nu - mu^2 with the exact mean misses the same.
    dz = x @ (w_now - kernels[STEPS - age])
    np.testing.assert_allclose(layer.compensated_var[row],
                               z.var(0) - (dz**2).mean(0), rtol=1e-4,
                               atol=1e-5)
  summary = layer.summary()
  assert summary["mean_gain"] > 10.0, summary
  assert summary["compensated_mean"] < 1e-2, summary
