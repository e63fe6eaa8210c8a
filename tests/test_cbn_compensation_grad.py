"""``compensation_grad=True``: the gradient through CBN's compensated past
statistics, against central finite differences and a hand-derived NumPy
float64 backward pass (the paper's raw ``nu = E[z^2]`` form).

With the option the output is an ordinary differentiable function of the
current weight (the current batch's statistics *and* the compensated past
ones depend on it), so its gradient must match finite differences of the
forward pass. Without it (the official semantics) the past terms are
constants and the gradient differs: the tests check that difference too.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax

EPS = 1e-5
WINDOW = 3


def _dense(x, w):
  return x @ w


def _conv(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.cache
def _window_step(layer_fn):
  """One jitted CBN training step per layer (compiled once for the tests)."""
  return jax.jit(lambda w, x, s: bn_jax.cross_iteration_batch_norm(
      layer_fn, w, x, s, train=True)[1])


def _filled(layer_fn, wshape, xshape, seed):
  """A float64 state whose window holds WINDOW - 1 entries of earlier
  weights/batches, plus the current weight, batch, gamma, beta and a
  random cotangent ``r``."""
  rng = np.random.default_rng(seed)
  w0 = rng.normal(0.0, 1.0 / np.sqrt(np.prod(wshape[:-1])), wshape)
  ws = [w0 + 0.1 * np.std(w0) * rng.normal(size=wshape)
        for _ in range(WINDOW)]
  xs = [rng.normal(0.5, 1.0, xshape) for _ in range(WINDOW)]
  state = bn_jax.cbn_state(jnp.asarray(w0), wshape[-1], WINDOW, jnp.float64)
  step = _window_step(layer_fn)
  for w, x in zip(ws[:-1], xs[:-1]):
    state = step(jnp.asarray(w), jnp.asarray(x), state)
  c = wshape[-1]
  gamma = 1.0 + 0.2 * rng.normal(size=c)
  beta = 0.1 * rng.normal(size=c)
  r = rng.normal(size=np.shape(layer_fn(jnp.asarray(xs[-1]),
                                        jnp.asarray(ws[-1]))))
  return state, ws[-1], xs[-1], gamma, beta, r


def _loss_fn(layer_fn, state, x, gamma, beta, r, compensation_grad):
  def loss(w):
    y, _ = bn_jax.cross_iteration_batch_norm(
        layer_fn, w, x, state, gamma, beta, train=True, epsilon=EPS,
        compensation_grad=compensation_grad)
    return jnp.sum(y * r) + jnp.sum(y**2)
  return loss


def _numpy_loss_and_grad(state, w, x, gamma, beta, r, rho=1.0):
  """Forward and hand-derived backward of a Dense CBN step in float64.

  ``mu_tau(w) = m_tau + rho <dm_tau, w - w_tau>``, ``nu_tau(w)`` alike (the
  paper's form, from ``CBNState.window_nu``/``window_dnu``);
  ``var = mean(nu) - mean(mu)^2``. Returns ``(loss, dL/dw, max guard
  margin)``; the margin ``min(nu - mu^2)`` must be > 0 (no clamping).
  """
  past_w = np.asarray(state.window_weight)
  dm, dn = np.asarray(state.window_dmean), np.asarray(state.window_dnu)
  m, n = np.asarray(state.window_mean), np.asarray(state.window_nu)
  z = x @ w
  count = z.shape[0]
  k = 1 + past_w.shape[0]
  delta = w[None] - past_w
  mus = np.concatenate([z.mean(0)[None], m + rho * (dm * delta).sum(1)])
  nus = np.concatenate([(z**2).mean(0)[None], n + rho * (dn * delta).sum(1)])
  margin = (nus - mus**2).min()
  mean, nubar = mus.mean(0), nus.mean(0)
  var = nubar - mean**2
  inv = (var + EPS)**-0.5
  y = (z - mean) * inv * gamma + beta
  loss = np.sum(y * r) + np.sum(y**2)
  # Backward, step by step.
  g_y = r + 2.0 * y
  g_xhat = g_y * gamma
  g_inv = np.sum(g_xhat * (z - mean), 0)
  g_var = g_inv * -0.5 * inv**3
  g_mean = -inv * np.sum(g_xhat, 0) - 2.0 * mean * g_var
  g_mu, g_nu = g_mean / k, g_var / k  # each entry's share of mean / nu_bar
  g_z = g_xhat * inv + g_mu / count + g_nu * 2.0 * z / count
  g_w = x.T @ g_z
  g_w_past = rho * (g_mu * dm + g_nu * dn).sum(0)
  return loss, g_w + g_w_past, g_w, margin


def test_gradient_matches_numpy_float64_backward():
  with jax.enable_x64(True):
    state, w, x, gamma, beta, r = _filled(_dense, (5, 4), (7, 5), seed=1)
    loss_ref, g_ref, g_ref_official, margin = _numpy_loss_and_grad(
        jax.tree.map(np.asarray, state), w, x, gamma, beta, r)
    assert margin > 0.0  # the max guard does not clamp: smooth here
    loss = _loss_fn(_dense, state, jnp.asarray(x), gamma, beta, r, True)
    # jit: one compilation instead of op-by-op dispatch (most of the time).
    value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(w))
    # float64 both sides, O(10^2) operations: 1e-10 is > 10^3 x the rounding.
    np.testing.assert_allclose(value, loss_ref, rtol=1e-10)
    np.testing.assert_allclose(grad, g_ref, rtol=1e-9, atol=1e-10)
    # Without the option: the official gradient (current batch only).
    official = jax.jit(jax.grad(_loss_fn(_dense, state, jnp.asarray(x),
                                         gamma, beta, r, False)))(
                                             jnp.asarray(w))
    np.testing.assert_allclose(official, g_ref_official, rtol=1e-9,
                               atol=1e-10)
    # The past terms are not negligible: the two gradients differ.
    assert np.abs(g_ref - g_ref_official).max() > 1e-2 * np.abs(g_ref).max()


# Slow (~10-20 s each, float64 CBN compilations): the only check of the
# compensated gradient that does not rely on a hand derivation; all the
# perturbed forward passes run as one vmapped, compiled call.
@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_gradient_matches_central_finite_differences(layer):
  layer_fn, wshape, xshape = {
      "dense": (_dense, (5, 4), (7, 5)),
      "conv": (_conv, (3, 3, 2, 3), (2, 5, 5, 2)),
  }[layer]
  with jax.enable_x64(True):
    state, w, x, gamma, beta, r = _filled(layer_fn, wshape, xshape, seed=2)
    assert int(state.window_count) == WINDOW - 1
    loss = _loss_fn(layer_fn, state, jnp.asarray(x), gamma, beta, r, True)
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(w)))
    official = np.asarray(jax.jit(jax.grad(_loss_fn(
        layer_fn, state, jnp.asarray(x), gamma, beta, r, False)))(
            jnp.asarray(w)))
    h = 1e-5
    # Every w +- h e_i at once: one compiled (vmapped) forward pass.
    steps = h * np.eye(w.size).reshape((w.size,) + w.shape)
    losses = np.asarray(jax.jit(jax.vmap(loss))(
        jnp.asarray(np.concatenate([w + steps, w - steps]))))
    fd = ((losses[:w.size] - losses[w.size:]) / (2 * h)).reshape(w.shape)
  # Central differences: truncation ~ h^2 |L'''| ~ 1e-10 and rounding
  # ~ eps_f64 |L| / h ~ 1e-10 (|L| ~ 10); 1e-6 relative to the largest
  # entry leaves > 10^3 margin.
  scale = np.abs(fd).max()
  np.testing.assert_allclose(grad, fd, atol=1e-6 * scale, rtol=0)
  assert np.abs(official - fd).max() > 1e-3 * scale  # the option matters


def test_compensation_grad_leaves_the_forward_and_other_gradients_alone():
  with jax.enable_x64(True):
    state, w, x, gamma, beta, r = _filled(_dense, (5, 4), (7, 5), seed=3)

    def loss(params, compensation_grad):
      y, new = bn_jax.cross_iteration_batch_norm(
          _dense, params[0], params[1], state, params[2], params[3],
          train=True, compensation_grad=compensation_grad)
      return jnp.sum(y * r) + jnp.sum(y**2), new

    params = tuple(map(jnp.asarray, (w, x, gamma, beta)))
    (l1, s1), g1 = jax.value_and_grad(loss, has_aux=True)(params, True)
    (l0, s0), g0 = jax.value_and_grad(loss, has_aux=True)(params, False)
    assert float(l1) == float(l0)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(g1[1:], g0[1:]):  # x, gamma, beta: same gradients
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
