"""Tests of bn_jax.analysis against independent references.

ICS: G' is rebuilt by hand (mixed parameter dict + jax.grad) and compared in
float64 NumPy. Landscape: closed forms of a quadratic. Percentiles:
np.percentile.
Statistics consistency: a BN layer + linear head evaluated by hand in NumPy.
"""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax.analysis import (ActivationTracker, activation_percentiles,
                             capture_preactivations, geometric_step_sizes,
                             internal_covariate_shift, landscape_probe,
                             make_loss_fn, optax_update_fn, preactivations,
                             sgd_update_fn, statistics_consistency, to_python)
from bn_jax.core.batch_norm import BatchNormState, batch_norm

# ---------------------------------------------------------------- helpers ---


def _mlp_params(seed, sizes=(5, 7, 6, 3)):
  # NumPy draws: no per-shape compilation of jax.random ops in the tests.
  rng = np.random.default_rng(seed)
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"layer{i}"] = {
        "w": jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in),
                         jnp.float32),
        "b": jnp.asarray(0.1 * rng.normal(size=n_out), jnp.float32),
    }
  return params


def _mlp_loss(params, batch_stats, batch):
  del batch_stats
  h = batch["x"]
  names = list(params)
  for name in names[:-1]:
    h = jnp.tanh(h @ params[name]["w"] + params[name]["b"])
  logits = h @ params[names[-1]]["w"] + params[names[-1]]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]).mean()


def _mlp_batch(seed, n=16, d=5, classes=3):
  rng = np.random.default_rng(1000 + seed)
  return {"x": jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, classes, size=n), jnp.int32)}


def _flat64(tree):
  return np.concatenate([np.asarray(l, np.float64).ravel()
                         for l in jax.tree.leaves(tree)])


_mlp_grad = jax.jit(jax.grad(_mlp_loss))


def _reference_ics(params, batch, new_params, order, grad_fn=_mlp_grad):
  """Definition 2.1 built by hand: one mixed dict per layer, jax.grad each."""
  grads = grad_fn(params, None, batch)
  out = {}
  for i, name in enumerate(order):
    mixed = {k: (new_params[k] if k in order[:i] else params[k])
             for k in params}
    shifted = grad_fn(mixed, None, batch)
    g, gp = _flat64(grads[name]), _flat64(shifted[name])
    out[name] = (np.linalg.norm(g - gp),
                 g @ gp / (np.linalg.norm(g) * np.linalg.norm(gp)),
                 np.linalg.norm(g))
  return out


# -------------------------------------------------------------------- ICS ---


def test_ics_matches_hand_built_mixed_gradients():
  params = _mlp_params(0)
  batch = _mlp_batch(1)
  lr = 0.5
  update_fn = sgd_update_fn(lr)
  grads = _mlp_grad(params, None, batch)
  new_params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  order = list(params)

  out = jax.jit(functools.partial(internal_covariate_shift, _mlp_loss,
                                  update_fn=update_fn, layers=order))(
                                      params, None, batch)
  ref = _reference_ics(params, batch, new_params, order)
  for name, (l2, cos, gnorm) in ref.items():
    np.testing.assert_allclose(out[f"ics/{name}/l2_diff"], l2,
                               rtol=1e-4, atol=1e-6 * gnorm)
    np.testing.assert_allclose(out[f"ics/{name}/cosine"], cos, atol=1e-5)
    np.testing.assert_allclose(out[f"ics/{name}/grad_norm"], gnorm, rtol=1e-5)
  # A real step moves the earlier layers, so the later layers see a shift.
  for name in order[1:]:
    assert ref[name][0] > 1e-3 * ref[name][2]
    assert out[f"ics/{name}/l2_diff"] > 1e-3 * ref[name][2]
  assert float(out[f"ics/{order[0]}/l2_diff"]) == 0.0
  np.testing.assert_allclose(out["ics/loss"],
                             _mlp_loss(params, None, batch), rtol=1e-6)

  # Explicit (reversed) layer order, the batched method and jit agree with the
  # hand-built reference for that order.
  reverse = order[::-1]
  measure = jax.jit(functools.partial(
      internal_covariate_shift, _mlp_loss, update_fn=update_fn,
      layers=reverse, method="vmap"))
  out_rev = measure(params, None, batch)
  ref_rev = _reference_ics(params, batch, new_params, reverse)
  for name, (l2, cos, gnorm) in ref_rev.items():
    np.testing.assert_allclose(out_rev[f"ics/{name}/l2_diff"], l2,
                               rtol=1e-4, atol=1e-6 * gnorm)
    np.testing.assert_allclose(out_rev[f"ics/{name}/cosine"], cos, atol=1e-5)
  json.dumps(to_python(out_rev))  # loggable as JSON


def test_ics_is_zero_when_earlier_layers_do_not_move():
  params = _mlp_params(2)
  batch = _mlp_batch(3)
  last = list(params)[-1]

  def last_layer_only(params, grads):
    # Only the last layer takes a (large) step; every earlier layer stays.
    return {k: (jax.tree.map(lambda p, g: p - 10.0 * g, v, grads[k])
                if k == last else v) for k, v in params.items()}

  out = jax.jit(functools.partial(internal_covariate_shift, _mlp_loss,
                                  update_fn=last_layer_only,
                                  layers=list(params)))(params, None, batch)
  for name in params:
    gnorm = float(out[f"ics/{name}/grad_norm"])
    assert gnorm > 0
    assert float(out[f"ics/{name}/l2_diff"]) <= 1e-6 * gnorm
    np.testing.assert_allclose(out[f"ics/{name}/cosine"], 1.0, atol=1e-6)


def test_ics_layer_positions_follow_the_given_order():
  # Key order (alphabetical, as after any jax.tree.map) is the reverse of the
  # forward order; the measure follows the order it is given. Without one it
  # refuses (a params dict cannot tell the forward order).
  rng = np.random.default_rng(9)
  params = {name: jnp.asarray(rng.normal(size=shape) / 3, jnp.float32)
            for name, shape in (("a_out", (6, 3)), ("m_hidden", (6, 6)),
                                ("z_in", (5, 6)))}
  flow = ["z_in", "m_hidden", "a_out"]

  @jax.jit
  def forward(params, x):
    h = jax.nn.relu(x @ params["z_in"])
    h = jnp.tanh(h @ params["m_hidden"])
    return h @ params["a_out"]

  def loss_fn(params, batch_stats, batch):
    del batch_stats
    return optax.softmax_cross_entropy_with_integer_labels(
        forward(params, batch["x"]), batch["y"]).mean()

  batch = _mlp_batch(10)
  out = jax.jit(functools.partial(internal_covariate_shift, loss_fn,
                                  update_fn=sgd_update_fn(1.0),
                                  layers=flow))(params, None, batch)
  assert [int(out[f"ics/{k}/position"]) for k in flow] == [0, 1, 2]
  grad_fn = jax.jit(jax.grad(loss_fn))
  grads = grad_fn(params, None, batch)
  new_params = jax.tree.map(lambda p, g: p - g, params, grads)
  ref = _reference_ics(params, batch, new_params, flow, grad_fn=grad_fn)
  for name, (l2, cos, gnorm) in ref.items():
    np.testing.assert_allclose(out[f"ics/{name}/l2_diff"], l2,
                               rtol=1e-4, atol=1e-6 * gnorm)
    np.testing.assert_allclose(out[f"ics/{name}/cosine"], cos, atol=1e-5)
  assert ref["a_out"][0] > 1e-3 * ref["a_out"][2]
  with pytest.raises(TypeError, match="layers"):
    internal_covariate_shift(loss_fn, params, None, batch,
                             update_fn=sgd_update_fn(1.0))


def test_ics_optax_update_matches_manual_momentum_step():
  params = _mlp_params(4)
  batch = _mlp_batch(5)
  tx = optax.sgd(0.3, momentum=0.9)
  opt_state = tx.init(params)
  # Take one step so the momentum buffer is non-zero.
  g0 = _mlp_grad(params, None, _mlp_batch(6))
  updates, opt_state = tx.update(g0, opt_state, params)
  params = optax.apply_updates(params, updates)

  @jax.jit
  def measure(params, batch, opt_state):
    return internal_covariate_shift(
        _mlp_loss, params, None, batch,
        update_fn=optax_update_fn(tx, opt_state), layers=list(params))

  out = measure(params, batch, opt_state)
  # Independent: heavy-ball momentum written out, v = 0.9 v + g; W -= lr v.
  grads = _mlp_grad(params, None, batch)
  velocity = jax.tree.map(lambda v, g: 0.9 * v + g, g0, grads)
  new_params = jax.tree.map(lambda p, v: p - 0.3 * v, params, velocity)
  ref = _reference_ics(params, batch, new_params, list(params))
  for name, (l2, cos, gnorm) in ref.items():
    np.testing.assert_allclose(out[f"ics/{name}/l2_diff"], l2,
                               rtol=1e-4, atol=1e-6 * gnorm)
    np.testing.assert_allclose(out[f"ics/{name}/cosine"], cos, atol=1e-5)


def test_ics_rejects_bad_arguments():
  params = _mlp_params(7)
  batch = _mlp_batch(8)
  sgd = sgd_update_fn(0.1)
  with pytest.raises(ValueError, match="layer 'nope' not found"):
    internal_covariate_shift(_mlp_loss, params, None, batch, update_fn=sgd,
                             layers=["layer0", "nope"])
  with pytest.raises(ValueError, match="overlap"):
    internal_covariate_shift(_mlp_loss, params, None, batch, update_fn=sgd,
                             layers=["layer0", "layer0/w"])
  with pytest.raises(TypeError, match="single string"):
    internal_covariate_shift(_mlp_loss, params, None, batch, update_fn=sgd,
                             layers="layer0")
  layers = list(params)
  with pytest.raises(ValueError, match="update_fn"):
    internal_covariate_shift(_mlp_loss, params, None, batch,
                             update_fn=lambda p, g: {"layer0": p["layer0"]},
                             layers=layers)
  with pytest.raises(ValueError, match="floating scalar"):
    internal_covariate_shift(lambda p, s, b: b["x"].sum(0), params, None,
                             batch, update_fn=sgd, layers=layers)
  with pytest.raises(ValueError, match="method"):
    internal_covariate_shift(_mlp_loss, params, None, batch, update_fn=sgd,
                             method="scan", layers=layers)


# -------------------------------------------------------------- landscape ---


def test_landscape_probe_recovers_quadratic_constants():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  eigenvalues = np.array([0.3, 1.0, 2.5, 6.0])
  a = (q * eigenvalues) @ q.T
  w0 = rng.normal(size=4)
  # All below 2/lambda_max, so every step lowers the loss and eta = 0 is the
  # maximum: the loss range must include it.
  etas = np.array([0.02, 0.05, 0.1, 0.3])

  def loss_fn(params, batch_stats, batch):
    del batch_stats, batch
    w = params["w"]
    return 0.5 * w @ jnp.asarray(a, jnp.float32) @ w

  params = {"w": jnp.asarray(w0, jnp.float32)}
  out = landscape_probe(loss_fn, params, None, None, step_sizes=etas)
  out_vmap = jax.jit(functools.partial(
      landscape_probe, loss_fn, step_sizes=etas, method="vmap"))(
          params, None, None)

  # Closed forms in float64: g = A w, grad(w - eta g) = g - eta A g.
  g = a @ w0
  ag = a @ g
  loss_at = lambda w: 0.5 * w @ a @ w
  losses = np.array([loss_at(w0 - eta * g) for eta in etas])
  all_losses = np.concatenate([[loss_at(w0)], losses])
  grad_diff = etas * np.linalg.norm(ag)
  beta = np.linalg.norm(ag) / np.linalg.norm(g)
  assert beta <= eigenvalues.max() + 1e-12
  assert all_losses.argmax() == 0

  for res in (out, out_vmap):
    np.testing.assert_allclose(res["landscape/loss"], losses, rtol=1e-5)
    np.testing.assert_allclose(res["landscape/loss_range"],
                               all_losses.max() - all_losses.min(), rtol=1e-5)
    np.testing.assert_allclose(res["landscape/grad_diff"], grad_diff,
                               rtol=1e-4)
    np.testing.assert_allclose(res["landscape/grad_diff_range"],
                               grad_diff.max() - grad_diff.min(), rtol=1e-4)
    np.testing.assert_allclose(res["landscape/beta_smoothness"], beta,
                               rtol=1e-4)
    np.testing.assert_allclose(res["landscape/grad_norm"], np.linalg.norm(g),
                               rtol=1e-5)
  json.dumps(to_python(out))


def test_landscape_probe_rejects_bad_step_sizes():
  loss_fn = lambda p, s, b: jnp.sum(p["w"] ** 2)
  params = {"w": jnp.ones(3)}
  for bad in ([], [0.0, 0.1], [-0.1], [[0.1, 0.2]], [np.inf]):
    with pytest.raises(ValueError, match="step_sizes"):
      landscape_probe(loss_fn, params, None, None, step_sizes=bad)
  with pytest.raises(ValueError, match="smallest"):
    geometric_step_sizes(0.0, 1.0, 4)
  np.testing.assert_allclose(geometric_step_sizes(0.1, 10.0, 3),
                             [0.1, 1.0, 10.0])


# ------------------------------------------------------------ percentiles ---


def test_activation_percentiles_match_numpy():
  rng = np.random.default_rng(1)
  dense = rng.normal(size=(37, 5)).astype(np.float32)
  conv = rng.normal(size=(6, 3, 4, 8)).astype(np.float32)
  q = (15, 50, 85)
  np.testing.assert_allclose(activation_percentiles(dense, 3, q),
                             np.percentile(dense[:, 3].astype(np.float64), q),
                             rtol=1e-6)
  np.testing.assert_allclose(
      activation_percentiles(conv, 6, (0, 33.3, 100)),
      np.percentile(conv[..., 6].ravel().astype(np.float64), (0, 33.3, 100)),
      rtol=1e-6)
  # Unit axis first (NCHW-like).
  np.testing.assert_allclose(
      activation_percentiles(conv, 1, q, feature_axis=1),
      np.percentile(conv[:, 1].ravel().astype(np.float64), q), rtol=1e-6)

  # From intermediates: a module that sows twice keeps a tuple.
  inter = {"Block_0": {"preact": (dense[:, :4],)},
           "preact": (dense, dense + 1.0)}
  assert list(preactivations({"intermediates": inter})) == [
      "Block_0/preact", "preact/0", "preact/1"]
  np.testing.assert_allclose(
      activation_percentiles(inter, 2, q),  # default: the last sown layer
      np.percentile(dense[:, 2].astype(np.float64) + 1.0, q), rtol=1e-6)
  np.testing.assert_allclose(
      activation_percentiles(inter, 2, q, layer="Block_0/preact"),
      np.percentile(dense[:, 2].astype(np.float64), q), rtol=1e-6)

  with pytest.raises(ValueError, match="unit=5"):
    activation_percentiles(dense, 5)
  with pytest.raises(ValueError, match="percentiles"):
    activation_percentiles(dense, 0, (50, 101))
  with pytest.raises(ValueError, match="layer='x'"):
    activation_percentiles(inter, 0, layer="x")
  with pytest.raises(TypeError, match="floating"):
    activation_percentiles(dense.astype(np.int32), 0)


def test_activation_tracker_percentiles_and_drift():
  rng = np.random.default_rng(2)
  tracker = ActivationTracker(unit=1)
  steps = [0, 10, 25]
  first = second = None
  for t, step in enumerate(steps):
    # Layer 'a' drifts: each unit's mean moves by a unit-specific amount.
    a = rng.normal(size=(50, 4)) * (1 + 0.5 * t) + t * np.arange(4) - t
    b = rng.normal(size=(50, 2))
    inter = {"a": {"preact": (a.astype(np.float32),)},
             "b": {"preact": (b.astype(np.float32),)}}
    if t == 0:
      first = (a, b)
    second = (a, b)
    logged = tracker.record(step, inter)
  json.dumps(logged)
  hist = tracker.history()
  np.testing.assert_array_equal(hist["steps"], steps)
  assert hist["percentile_values"].shape == (3, 3)
  # Last row: percentiles of the last layer ('b'), unit 1.
  np.testing.assert_allclose(hist["percentile_values"][-1],
                             np.percentile(second[1][:, 1], (15, 50, 85)),
                             rtol=1e-5, atol=1e-6)
  # Drift of layer 'a' at the last step, from the definition.
  a0, a2 = first[0].astype(np.float32).astype(np.float64), second[0].astype(
      np.float32).astype(np.float64)
  mean_drift = np.abs(a2.mean(0) - a0.mean(0)).mean()
  std_drift = np.abs(a2.std(0) - a0.std(0)).mean()
  layer = "a/preact/"
  np.testing.assert_allclose(hist[layer + "mean_drift"][-1], mean_drift,
                             rtol=1e-5)
  np.testing.assert_allclose(hist[layer + "std_drift"][-1], std_drift,
                             rtol=1e-5)
  np.testing.assert_allclose(hist[layer + "mean"][-1], a2.mean(0).mean(),
                             atol=1e-5)
  np.testing.assert_allclose(hist[layer + "std"][-1], a2.std(0).mean(),
                             rtol=1e-5)
  assert hist[layer + "mean_drift"][0] == 0.0
  assert hist[layer + "std_drift"][0] == 0.0
  np.testing.assert_allclose(logged["preact/a/preact/mean_drift"], mean_drift,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="step must increase"):
    tracker.record(25, inter)


# ------------------------------------------- flax models: loss, consistency ---


class _TinyBN(nn.Module):
  """BN over the last axis (bn_jax core) with the PreciseBN moments hook."""
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    f = x.shape[-1]
    mean = self.variable("batch_stats", "mean", jnp.zeros, (f,))
    var = self.variable("batch_stats", "var", jnp.ones, (f,))
    scale = self.param("scale", nn.initializers.ones, (f,))
    bias = self.param("bias", nn.initializers.zeros, (f,))
    y, new_state = batch_norm(x, BatchNormState(mean.value, var.value), scale,
                              bias, train=train, momentum=self.momentum,
                              epsilon=self.epsilon)
    if train and self.is_mutable_collection("batch_moments"):
      self.put_variable("batch_moments", "mean", x.mean(0))
      self.put_variable("batch_moments", "var", x.var(0))
      self.put_variable("batch_moments", "count", jnp.asarray(x.shape[0],
                                                             jnp.float32))
    if train and not self.is_initializing():
      mean.value, var.value = new_state.mean, new_state.var
    return y


class _BNHead(nn.Module):
  """Dense -> BN -> sown preact -> tanh -> Dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    h = nn.Dense(4, use_bias=False)(x)
    h = _TinyBN(name="bn")(h, train)
    self.sow("intermediates", "preact", h)
    return nn.Dense(3)(jnp.tanh(h))


def _head_numpy(params, x, mean, var, eps=1e-5):
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  h = x.reshape(len(x), -1) @ p["Dense_0"]["kernel"]
  if mean is None:  # batch statistics (biased variance)
    mean, var = h.mean(0), h.var(0)
  h = (h - mean) / np.sqrt(var + eps) * p["bn"]["scale"] + p["bn"]["bias"]
  return h, np.tanh(h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _cross_entropy(logits, labels):
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def _head_setup():
  model = _BNHead()
  rng = np.random.default_rng(3)
  images = rng.normal(size=(24, 2, 2, 1)).astype(np.float32) * 2 + 1
  labels = rng.integers(0, 3, size=24).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:8]))
  params = jax.tree.map(
      lambda v: v + 0.3 * rng.normal(size=v.shape).astype(np.float32),
      variables["params"])
  ema = {"bn": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32),
                "var": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)}}
  batches = [{"image": images[i:i + 8], "label": labels[i:i + 8]}
             for i in range(0, 24, 8)]
  return model, {"params": params, "batch_stats": ema}, batches


def test_make_loss_fn_and_capture_use_batch_statistics():
  model, variables, batches = _head_setup()
  batch = batches[0]
  loss_fn = make_loss_fn(model)
  loss = loss_fn(variables["params"], variables["batch_stats"], batch)
  x64 = batch["image"].astype(np.float64)
  preact, logits = _head_numpy(variables["params"], x64, None, None)
  np.testing.assert_allclose(loss, _cross_entropy(logits,
                                                  batch["label"]).mean(),
                             rtol=1e-5)
  # Masked mean over the kept examples (statistics still over the batch).
  mask = np.arange(8) < 5
  masked = loss_fn(variables["params"], variables["batch_stats"],
                   {**batch, "mask": mask})
  np.testing.assert_allclose(
      masked, _cross_entropy(logits, batch["label"])[:5].mean(), rtol=1e-5)
  inter = capture_preactivations(model, variables, batch["image"], train=True)
  np.testing.assert_allclose(preactivations(inter)["preact"], preact,
                             rtol=1e-5, atol=1e-5)

  # ICS through a flax model: layers are the modules, in forward order
  # (the params dict here is alphabetical: Dense_0, Dense_1, bn).
  out = jax.jit(functools.partial(internal_covariate_shift, loss_fn,
                                  update_fn=sgd_update_fn(0.5),
                                  layers=("Dense_0", "bn", "Dense_1")))(
                                      variables["params"],
                                      variables["batch_stats"], batch)
  assert list(variables["params"]) == ["Dense_0", "Dense_1", "bn"]
  assert [int(out[f"ics/{k}/position"]) for k in ("Dense_0", "bn", "Dense_1")
          ] == [0, 1, 2]
  assert float(out["ics/Dense_1/l2_diff"]) > 0


def test_statistics_consistency_matches_numpy():
  model, variables, batches = _head_setup()
  rng = np.random.default_rng(4)
  population = {"bn": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32),
                       "var": jnp.asarray(rng.uniform(0.5, 2, 4),
                                          jnp.float32)}}
  out = statistics_consistency(model, variables, batches[:2],
                               population_stats=population)

  def expected(stats):
    losses, correct = [], []
    for b in batches[:2]:
      x = b["image"].astype(np.float64)
      mean, var = (None, None) if stats is None else (
          np.asarray(stats["bn"]["mean"], np.float64),
          np.asarray(stats["bn"]["var"], np.float64))
      _, logits = _head_numpy(variables["params"], x, mean, var)
      losses.append(_cross_entropy(logits, b["label"]))
      correct.append(logits.argmax(1) == b["label"])
    return np.concatenate(losses).mean(), np.concatenate(correct).mean()

  for mode, stats in (("ema", variables["batch_stats"]),
                      ("precise", population), ("batch", None)):
    loss, acc = expected(stats)
    np.testing.assert_allclose(out[f"{mode}/loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(out[f"{mode}/accuracy"], acc, atol=1e-9)
  assert out["num_examples"] == 16
  # The three modes really differ on this model (the test can tell them apart).
  assert len({round(out[f"{m}/loss"], 6) for m in ("ema", "precise",
                                                   "batch")}) == 3

  # PreciseBN path: population statistics of the Dense output over the union
  # of the precise batches (mean, biased variance), computed in NumPy.
  out_precise = statistics_consistency(model, variables, batches[:2],
                                       precise_batches=batches)
  k = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
  h = np.concatenate([b["image"].reshape(8, -1).astype(np.float64) @ k
                      for b in batches])
  loss, acc = expected({"bn": {"mean": h.mean(0), "var": h.var(0)}})
  np.testing.assert_allclose(out_precise["precise/loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(out_precise["precise/accuracy"], acc, atol=1e-9)

  with pytest.raises(ValueError, match="padded batch"):
    statistics_consistency(model, variables,
                           {**batches[0], "mask": np.arange(8) < 7})
  with pytest.raises(ValueError, match="structure"):
    statistics_consistency(model, variables, batches[0],
                           population_stats={"other": {}})


# --------------------------------------------------------------- plotting ---


def test_plots_draw_the_given_values(tmp_path):
  from bn_jax.analysis import plotting
  hist = {"steps": np.array([0, 5, 9]), "percentiles": np.array([15., 85.]),
          "percentile_values": np.array([[0., 1.], [0.5, 1.5], [1., 2.]])}
  fig = plotting.plot_percentiles({"no BN": hist, "BN": hist})
  np.testing.assert_array_equal(fig.axes[0].lines[1].get_ydata(),
                                [1., 1.5, 2.])
  path = plotting.save_figure(fig, str(tmp_path / "sub" / "p.png"))
  assert (tmp_path / "sub" / "p.png").stat().st_size > 1000, path

  # Layer 'b' comes first in the network (position 0) though not in the keys.
  ics = {"BN": {"ics/a/l2_diff": 1.0, "ics/a/cosine": 0.5,
                "ics/b/l2_diff": 3.0, "ics/b/cosine": 0.25,
                "ics/a/position": 1, "ics/b/position": 0},
         "no BN": {"ics/a/l2_diff": 2.0, "ics/a/cosine": 1.0,
                   "ics/b/l2_diff": 4.0, "ics/b/cosine": 0.75}}
  fig = plotting.plot_ics(ics)
  heights = [p.get_height() for p in fig.axes[0].patches]
  assert heights == [3.0, 1.0, 4.0, 2.0]

  runs = {"BN": {"steps": np.arange(3),
                 "landscape/loss_min": np.zeros(3),
                 "landscape/loss_max": np.ones(3),
                 "landscape/grad_diff_min": np.zeros(3),
                 "landscape/grad_diff_max": np.full(3, 2.0),
                 "landscape/beta_smoothness": np.array([1., 2., 3.])}}
  fig = plotting.plot_landscape(runs)
  np.testing.assert_array_equal(fig.axes[2].lines[0].get_ydata(), [1, 2, 3])
  with pytest.raises(ValueError, match="panels"):
    plotting.plot_landscape(runs, panels=("nope",))


def test_statistics_consistency_with_bn_jax_model_and_precise_bn():
  # Real bn_jax modules (PreciseBN hook in bn_jax.nn.BatchNorm): PreciseBN
  # over the evaluation batch itself must reproduce batch-statistics
  # evaluation, and differ from the (initial) EMA statistics.
  from bn_jax.models import create_model
  model = create_model("mlp", num_classes=3, norm="bn", hidden=(6, 5))
  rng = np.random.default_rng(5)
  batch = {"image": jnp.asarray(rng.normal(size=(12, 2, 2, 1)) * 3 + 2,
                                jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, 12), jnp.int32)}
  variables = model.init(jax.random.PRNGKey(0), batch["image"], train=False)
  out = statistics_consistency(model, variables, batch,
                               precise_batches=[batch, batch])
  np.testing.assert_allclose(out["precise/loss"], out["batch/loss"],
                             rtol=1e-5)
  assert abs(out["ema/loss"] - out["batch/loss"]) > 1e-3
