"""Cross-Iteration BN (functional core) against independent references.

The reference for the algorithm is a NumPy float64 implementation written
here from the paper's formulas (raw ``nu = E[z^2]``, the ``max`` / ``count``
guards, ``var = nu_bar - mu_bar^2``) with the layer's statistics and their
weight Jacobians computed by im2col, independently of JAX autodiff.
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from bn_jax.core.cross_iteration_batch_norm import (aggregate_window,
                                                    compensate_window)

EPS = 1e-5
MOMENTUM = 0.9


# --------------------------------------------------------------------------
# Layers: JAX versions (what CBN is given) and NumPy im2col versions (the
# independent reference).


def jax_conv(stride=1, padding="SAME", dilation=1, groups=1):
  def layer_fn(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)
  return layer_fn


def jax_dense(x, w):
  return x @ w


def np_patches(x, kh, kw, stride, padding, dilation):
  """im2col: (N, Ho, Wo, kh, kw, C) windows of an NHWC array."""
  n, h, w, c = x.shape
  ekh, ekw = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
  if padding == "SAME":
    ho, wo = -(-h // stride), -(-w // stride)
    ph = max((ho - 1) * stride + ekh - h, 0)
    pw = max((wo - 1) * stride + ekw - w, 0)
    x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2),
                   (0, 0)))
  else:
    ho, wo = (h - ekh) // stride + 1, (w - ekw) // stride + 1
  out = np.zeros((n, ho, wo, kh, kw, c))
  for i in range(ho):
    for j in range(wo):
      for a in range(kh):
        for b in range(kw):
          out[:, i, j, a, b, :] = x[:, i * stride + a * dilation,
                                    j * stride + b * dilation, :]
  return out


def np_stats(x, w, conv=None):
  """z, mu, nu (per channel) and d mu/d w, d nu/d w (weight-shaped)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  cout = w.shape[-1]
  if conv is None:  # Dense: patches are the inputs themselves
    groups, p = 1, x.reshape(-1, 1, x.shape[-1])
  else:
    groups = conv["groups"]
    kh, kw, cin_g, _ = w.shape
    pt = np_patches(x, kh, kw, conv["stride"], conv["padding"],
                    conv["dilation"])
    pt = pt.reshape(pt.shape[:5] + (groups, cin_g))
    # (M, G, kh*kw*cin_g) with the kernel's (kh, kw, cin) order
    p = np.moveaxis(pt, 5, 3).reshape(-1, groups, kh * kw * cin_g)
  wf = w.reshape(-1, cout)
  per_group = cout // groups
  z = np.stack([p[:, c // per_group] @ wf[:, c] for c in range(cout)], -1)
  mu, nu = z.mean(0), (z**2).mean(0)
  dmu = np.stack([p[:, c // per_group].mean(0) for c in range(cout)], -1)
  dnu = np.stack([2 * (z[:, c:c + 1] * p[:, c // per_group]).mean(0)
                  for c in range(cout)], -1)
  return z, mu, nu, dmu.reshape(w.shape), dnu.reshape(w.shape)


def np_cbn_sequence(xs, ws, conv, *, window, burn_in, rho, aggregation,
                    gamma, beta):
  """The algorithm in float64, step by step; returns outputs and running."""
  past = collections.deque(maxlen=window - 1)  # newest first
  cout = ws[0].shape[-1]
  run_mean, run_var = np.zeros(cout), np.ones(cout)
  ys = []
  for t, (x, w) in enumerate(zip(xs, ws)):
    z, mu, nu, dmu, dnu = np_stats(x, w, conv)
    batch_var = z.var(0)
    if t < burn_in or not past:
      mean, var = mu, batch_var
    else:
      mus, nus = [mu], [nu]
      for (w_old, mu_o, nu_o, dmu_o, dnu_o) in past:
        d = np.asarray(w, np.float64) - w_old
        mus.append(mu_o + rho * (dmu_o * d).reshape(-1, cout).sum(0))
        nus.append(nu_o + rho * (dnu_o * d).reshape(-1, cout).sum(0))
      mus, nus = np.array(mus), np.array(nus)
      if aggregation == "max":
        mean = mus.mean(0)
        var = np.maximum(nus, mus**2).mean(0) - mean**2
      else:
        ok = (nus - mus**2) >= 0
        ok[0] = True
        mean = (mus * ok).sum(0) / ok.sum(0)
        var = (nus * ok).sum(0) / ok.sum(0) - mean**2
    ys.append((z - mean) / np.sqrt(var + EPS) * gamma + beta)
    run_mean = MOMENTUM * run_mean + (1 - MOMENTUM) * mu
    run_var = MOMENTUM * run_var + (1 - MOMENTUM) * batch_var
    if t >= burn_in - (window - 1):
      past.appendleft((np.asarray(w, np.float64), mu, nu, dmu, dnu))
  return ys, run_mean, run_var


def random_walk(seed, w0, steps, step_size):
  """Weights of ``steps`` SGD-like steps: w0 plus a Gaussian random walk."""
  noise = np.random.default_rng(seed).normal(size=(steps,) + w0.shape)
  walk = np.cumsum(noise * step_size, axis=0) - noise[0] * step_size
  return [(np.asarray(w0) + walk[t]).astype(np.float32) for t in range(steps)]


def normal(seed, shape, loc=0.0, scale=1.0):
  return np.random.default_rng(seed).normal(loc, scale, shape).astype(
      np.float32)


def run_cbn(layer_fn, xs, ws, *, window, burn_in, rho, aggregation, gamma,
            beta):
  state = bn_jax.cbn_state(ws[0], ws[0].shape[-1], window)
  step = jax.jit(lambda w, x, s: bn_jax.cross_iteration_batch_norm(
      layer_fn, w, x, s, gamma, beta, train=True, window=window,
      burn_in=burn_in, rho=rho, momentum=MOMENTUM, epsilon=EPS,
      aggregation=aggregation))
  ys = []
  for x, w in zip(xs, ws):
    y, state = step(w, x, state)
    ys.append(np.asarray(y))
  return ys, state


CASES = {
    # name: (layer conv spec or None, x shape, w shape, window, burn_in, agg)
    "dense": (None, (6, 5), (5, 4), 4, 3, "max"),
    "conv_stride2": (dict(stride=2, padding="SAME", dilation=1, groups=1),
                     (2, 7, 7, 3), (3, 3, 3, 4), 3, 0, "count"),
    "conv_grouped_dilated": (dict(stride=1, padding="SAME", dilation=2,
                                  groups=2),
                             (2, 6, 6, 4), (3, 3, 2, 6), 4, 2, "max"),
    # burn_in > window - 1: the Jacobians go through _compute_if (selected
    # on CPU) and recording starts mid-burn-in, at step 6 - 2 = 4.
    "dense_late_recording": (None, (6, 5), (5, 4), 3, 6, "count"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sequence_matches_numpy_float64_reference(name):
  conv, xshape, wshape, window, burn_in, aggregation = CASES[name]
  layer_fn = jax_dense if conv is None else jax_conv(**conv)
  steps = 22
  seed = len(name)
  w0 = normal(seed, wshape, scale=1 / np.sqrt(np.prod(wshape[:-1])))
  ws = random_walk(seed + 1, w0, steps, 0.03 * float(np.std(w0)))
  # Input distribution drifts too, with a non-zero mean (so mu matters).
  xs = [normal(100 * seed + t, xshape, loc=0.5 + 0.1 * t / steps)
        for t in range(steps)]
  gamma = 1.0 + normal(seed + 2, (wshape[-1],), scale=0.1)
  beta = np.linspace(-0.2, 0.2, wshape[-1]).astype(np.float32)
  kw = dict(window=window, burn_in=burn_in, aggregation=aggregation,
            gamma=np.asarray(gamma, np.float64),
            beta=np.asarray(beta, np.float64))
  ref_ys, ref_mean, ref_var = np_cbn_sequence(xs, ws, conv, rho=1.0, **kw)
  naive_ys, _, _ = np_cbn_sequence(xs, ws, conv, rho=0.0, **kw)
  ys, state = run_cbn(layer_fn, xs, ws, rho=1.0, **dict(
      kw, gamma=gamma, beta=beta))
  for t, (y, ref) in enumerate(zip(ys, ref_ys)):
    np.testing.assert_allclose(y, ref.reshape(y.shape), rtol=2e-4, atol=2e-4,
                               err_msg=f"step {t}")
  np.testing.assert_allclose(state.mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, ref_var, rtol=1e-5, atol=1e-6)
  assert int(state.step) == steps
  # The comparison can fail: the compensation changes the outputs by far
  # more than the tolerance.
  gap = max(np.abs(a - b).max() for a, b in zip(ref_ys, naive_ys))
  assert gap > 50 * 2e-4, gap


def _filled_state(layer_fn, xs, ws, window):
  state = bn_jax.cbn_state(ws[0], ws[0].shape[-1], window)
  step = jax.jit(lambda w, x, s: bn_jax.cross_iteration_batch_norm(
      layer_fn, w, x, s, train=True, window=window)[1])
  for x, w in zip(xs, ws):
    state = step(w, x, state)
  return state


def test_mean_compensation_is_exact_and_nu_error_is_second_order():
  layer_fn = jax_conv(stride=1)
  window = 4  # slots 0, 1, 2 hold steps 0, 1, 2 (no burn-in)
  w0 = normal(1, (3, 3, 3, 5), scale=0.2)
  ws = random_walk(2, w0, 3, 0.05)
  xs = [normal(3 + j, (2, 6, 6, 3), loc=0.3) for j in range(3)]
  state = _filled_state(layer_fn, xs, ws, window)
  assert int(state.window_count) == 3
  # mu is linear in theta: moving it to a far-away weight is exact.
  w_far = w0 + normal(8, w0.shape, scale=0.3)
  mean_past, _ = compensate_window(state, w_far)
  for j in range(3):
    direct = jnp.mean(layer_fn(xs[j], w_far), axis=(0, 1, 2))
    np.testing.assert_allclose(mean_past[j], direct, atol=1e-5, rtol=0)
  # nu = E[z^2] is quadratic in theta: the first-order error is exactly
  # second order, so halving the step quarters it.
  direction = normal(7, w0.shape, scale=0.1)

  @jax.jit
  def nu_errors(scale):
    errors = []
    for j in range(3):
      w_new = ws[j] + scale * direction
      mean_c, var_c = compensate_window(state, w_new)
      nu_c = var_c[j] + mean_c[j]**2
      direct = jnp.mean(layer_fn(xs[j], w_new)**2, axis=(0, 1, 2))
      errors.append(jnp.linalg.norm(nu_c - direct))
    return jnp.stack(errors)

  e1, e2 = nu_errors(1.0), nu_errors(0.5)
  assert float(e1.min()) > 1e-3, e1  # the step is large enough to matter
  np.testing.assert_allclose(e2 / e1, 0.25, atol=0.02)


def test_guards_keep_the_variance_nonnegative_under_weight_jumps():
  layer_fn = jax_dense
  window = 4
  w0 = normal(20, (6, 5), scale=0.3)
  xs = [normal(21 + j, (8, 6), loc=2.0) for j in range(4)]
  state = _filled_state(layer_fn, xs[:3], [w0] * 3, window)
  # Adversarial jump: the linearisation is far off and the compensated
  # variance goes negative for some past entries.
  w_jump = -4.0 * w0 + 1.0
  z = layer_fn(xs[3], w_jump)
  mean_past, var_past = compensate_window(state, w_jump)
  assert float(jnp.min(var_past)) < -1.0, var_past
  unguarded = (jnp.var(z, 0) + jnp.sum(var_past, 0)) / 4 + (
      jnp.var(jnp.concatenate([jnp.mean(z, 0)[None], mean_past]), 0))
  assert float(jnp.min(unguarded)) < 0.0  # without a guard: NaN below
  valid = jnp.ones(3, bool)
  for aggregation in ("max", "count"):
    _, var_bar = aggregate_window(jnp.mean(z, 0), jnp.var(z, 0), mean_past,
                                  var_past, valid, aggregation=aggregation)
    assert float(jnp.min(var_bar)) >= 0.0, (aggregation, var_bar)
    y, _ = jax.jit(lambda w, x, s, a=aggregation:
                   bn_jax.cross_iteration_batch_norm(
                       layer_fn, w, x, s, train=True, window=window,
                       aggregation=a, epsilon=1e-12))(w_jump, xs[3], state)
    assert bool(jnp.all(jnp.isfinite(y))), aggregation
  # 'count' drops exactly the entries with negative variance.
  m_count, v_count = aggregate_window(
      jnp.mean(z, 0), jnp.var(z, 0), mean_past, var_past, valid,
      aggregation="count")
  keep = np.asarray(var_past >= 0)
  means = np.concatenate([np.asarray(jnp.mean(z, 0))[None],
                          np.asarray(mean_past)])
  nus = np.concatenate([np.asarray(jnp.var(z, 0) + jnp.mean(z, 0)**2)[None],
                        np.asarray(var_past + mean_past**2)])
  ok = np.concatenate([np.ones((1, 5), bool), keep])
  ref_mean = (means * ok).sum(0) / ok.sum(0)
  np.testing.assert_allclose(m_count, ref_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v_count, (nus * ok).sum(0) / ok.sum(0)
                             - ref_mean**2, rtol=1e-3, atol=1e-3)


def test_window_rolls_fills_and_burn_in_switches_under_jit_without_retracing():
  layer_fn = jax_conv(stride=1)
  window, burn_in = 3, 3  # 2 slots; recording starts at step 3 - 2 = 1
  traces = []

  @jax.jit
  def step(w, x, state):
    traces.append(1)
    return bn_jax.cross_iteration_batch_norm(
        layer_fn, w, x, state, train=True, window=window, burn_in=burn_in,
        momentum=MOMENTUM)

  w0 = normal(30, (3, 3, 2, 3), scale=0.3)
  ws = random_walk(31, w0, 8, 0.05)
  xs = [normal(40 + t, (2, 5, 5, 2), loc=0.2 * t) for t in range(8)]
  @jax.jit
  def bn_step(w, x, bn_state):
    z = layer_fn(x, w)
    y_bn, bn_state = bn_jax.batch_norm(z, bn_state, train=True,
                                       momentum=MOMENTUM)
    return y_bn, bn_state, jnp.mean(z, axis=(0, 1, 2))

  state = bn_jax.cbn_state(w0, 3, window)
  bn_state = bn_jax.batch_norm_state(3)
  means = []
  for t in range(8):
    y, state = step(ws[t], xs[t], state)
    y_bn, bn_state, mean = bn_step(ws[t], xs[t], bn_state)
    means.append(np.asarray(mean))
    if t < burn_in:
      np.testing.assert_allclose(y, y_bn, rtol=1e-6, atol=1e-6)
    else:
      assert float(jnp.max(jnp.abs(y - y_bn))) > 1e-2, t
    assert int(state.window_count) == min(max(t, 0), 2), t
    # The two slots hold exactly the last two recorded steps (oldest gone).
    recorded = [s for s in range(1, t + 1)][-2:]
    stored = sorted(map(tuple, np.round(np.asarray(
        state.window_mean[:int(state.window_count)]), 5)))
    expected = sorted(tuple(np.round(means[s], 5)) for s in recorded)
    np.testing.assert_allclose(stored, expected, atol=2e-5)
  np.testing.assert_allclose(state.mean, bn_state.mean, rtol=1e-6)
  np.testing.assert_allclose(state.var, bn_state.var, rtol=1e-6)
  assert len(traces) == 1



def test_compiled_train_step_has_no_branch_on_cpu_and_updates_window_in_place():
  """Guards two performance bugs of a jitted, donated CBN train step.

  1. XLA:CPU only canonicalizes convolutions of the entry computation, so
     the Jacobians' weight-gradient convolutions inside a ``lax.cond`` ran
     ~25x slower (a CBN step with a long burn-in was ~11x a BN step): the
     CPU program must contain no conditional, while a GPU lowering keeps the
     branch that skips the Jacobians early in burn-in.
  2. Without a data dependency of the in-place slot writes on the
     compensation's reads, XLA copied every window buffer (temp memory ~4x a
     window buffer here, vs ~1x now: the compensation's ``theta - theta_tau``).
  """
  window, features = 8, 64
  w = jnp.full((features, features), 0.1)
  x = normal(90, (4, features), loc=0.5)
  state = bn_jax.cbn_state(w, features, window)

  def make_step(burn_in, compensation_grad=False):
    def step(w, state, x):
      def loss(w):
        y, new = bn_jax.cross_iteration_batch_norm(
            jax_dense, w, x, state, train=True, window=window,
            burn_in=burn_in, compensation_grad=compensation_grad)
        return jnp.sum(y**2 * jnp.arange(features)), new
      grads, new = jax.grad(loss, has_aux=True)(w)
      return w - 0.1 * grads, new
    return jax.jit(step, donate_argnums=(0, 1))

  buffer_bytes = state.window_weight.nbytes
  for burn_in in (0, 100):  # 100: recording starts at step 93 (branch)
    step = make_step(burn_in)
    compiled = step.lower(w, state, x).compile()
    assert "conditional" not in compiled.as_text(), burn_in
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 2 * buffer_bytes, (burn_in, temp, buffer_bytes)
  # With the gradient through the compensation the backward pass reads the
  # old d mu / d sigma^2 buffers after the forward wrote this step's slot, so
  # XLA keeps one copy of those two (2 buffers) on top of the above: < 4x.
  compiled = make_step(0, True).lower(w, state, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 4 * buffer_bytes, (temp, buffer_bytes)
  gpu_text = make_step(100).trace(w, state, x).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.case" in gpu_text or "stablehlo.if" in gpu_text

def test_window_one_is_batch_norm_outputs_gradients_running_stats():
  layer_fn = jax_conv(stride=2)
  w = normal(50, (3, 3, 3, 4), scale=0.3)
  x = normal(51, (2, 6, 6, 3), loc=1.0)
  target = normal(52, (2, 3, 3, 4))
  scale, bias = jnp.array([1.0, 2.0, 0.5, 1.5]), jnp.array([0., .1, .2, .3])

  def cbn_loss(params, state):
    y, new = bn_jax.cross_iteration_batch_norm(
        layer_fn, params[0], params[1], state, params[2], params[3],
        train=True, window=1, momentum=MOMENTUM)
    return jnp.sum((y - target)**3), (y, new)

  def bn_loss(params, state):
    y, new = bn_jax.batch_norm(layer_fn(params[1], params[0]), state,
                               params[2], params[3], train=True,
                               momentum=MOMENTUM)
    return jnp.sum((y - target)**3), (y, new)

  params = (w, x, scale, bias)
  cstate, bstate = bn_jax.cbn_state(w, 4, 1), bn_jax.batch_norm_state(4)
  assert cstate.window_weight.shape == (0, 3, 3, 3, 4)
  cgrad = jax.jit(jax.grad(cbn_loss, has_aux=True))
  bgrad = jax.jit(jax.grad(bn_loss, has_aux=True))
  for t in range(3):
    params_t = (w + 0.1 * t, x, scale, bias)
    gc, (yc, cstate) = cgrad(params_t, cstate)
    gb, (yb, bstate) = bgrad(params_t, bstate)
    np.testing.assert_array_equal(yc, yb)
    for a, b in zip(gc, gb):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(cstate.mean, bstate.mean)
  np.testing.assert_array_equal(cstate.var, bstate.var)
  assert int(cstate.step) == 3


def test_gradient_flows_only_through_current_batch_statistics():
  window = 3
  w0 = normal(60, (4, 3), scale=0.5)
  ws = random_walk(61, w0, 3, 0.1)
  xs = [normal(62 + j, (5, 4), loc=0.5) for j in range(3)]
  state = _filled_state(jax_dense, xs[:2], ws[:2], window)
  x, w = xs[2], ws[2]
  gamma, beta = jnp.array([1.0, 0.7, 1.3]), jnp.array([0.0, 0.1, -0.1])
  r = normal(66, (5, 3))
  # Past entries in the paper's form (nu, d nu), compensated with the
  # current weight and held constant.
  d = np.asarray(w)[None] - np.asarray(state.window_weight)
  past_mu = np.asarray(state.window_mean) + (
      np.asarray(state.window_dmean) * d).sum(1)
  past_nu = np.asarray(state.window_nu) + (
      np.asarray(state.window_dnu) * d).sum(1)
  past_nu = np.maximum(past_nu, past_mu**2)

  def ref_loss(w, x, gamma, beta, past_depends_on_w=False):
    z = x @ w
    mu0, nu0 = jnp.mean(z, 0), jnp.mean(z**2, 0)
    pm, pn = jnp.asarray(past_mu), jnp.asarray(past_nu)
    if past_depends_on_w:  # what the official semantics exclude
      dw = w[None] - state.window_weight
      pm = state.window_mean + jnp.sum(state.window_dmean * dw, 1)
      pn = state.window_nu + jnp.sum(state.window_dnu * dw, 1)
    mean = (mu0 + pm.sum(0)) / 3
    var = (nu0 + pn.sum(0)) / 3 - mean**2
    y = (z - mean) / jnp.sqrt(var + EPS) * gamma + beta
    return jnp.sum(y * r) + jnp.sum(y**2)

  def cbn_loss(w, x, gamma, beta):
    y, _ = bn_jax.cross_iteration_batch_norm(
        jax_dense, w, x, state, gamma, beta, train=True, window=window,
        compensation_grad=False)  # the official semantics
    return jnp.sum(y * r) + jnp.sum(y**2)

  args = (w, x, gamma, beta)
  g_cbn = jax.jit(jax.grad(cbn_loss, argnums=(0, 1, 2, 3)))(*args)
  g_ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3)))(*args)
  for a, b in zip(g_cbn, g_ref):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  g_other = jax.jit(jax.grad(lambda w: ref_loss(w, x, gamma, beta, True)))(w)
  assert float(jnp.max(jnp.abs(g_other - g_cbn[0]))) > 1e-3


def test_rho_zero_is_plain_averaging_of_stale_statistics():
  window = 3
  w0 = normal(70, (4, 3), scale=0.5)
  ws = random_walk(71, w0, 3, 0.2)
  xs = [normal(72 + j, (6, 4), loc=0.5) for j in range(3)]
  state = _filled_state(jax_dense, xs[:2], ws[:2], window)
  y, _ = jax.jit(lambda w, x, s: bn_jax.cross_iteration_batch_norm(
      jax_dense, w, x, s, train=True, window=window, rho=0.0))(
          ws[2], xs[2], state)
  zs = [np.asarray(xs[j], np.float64) @ np.asarray(ws[j], np.float64)
        for j in range(3)]
  mean = np.mean([z.mean(0) for z in zs], 0)
  var = np.mean([(z**2).mean(0) for z in zs], 0) - mean**2
  np.testing.assert_allclose(y, (zs[2] - mean) / np.sqrt(var + EPS),
                             rtol=1e-4, atol=1e-4)


def test_eval_uses_running_statistics():
  w = jnp.ones((3, 2)) * 0.5
  x = jnp.arange(12.0).reshape(4, 3)
  state = bn_jax.cbn_state(w, 2, 3)._replace(mean=jnp.array([1.0, 2.0]),
                                             var=jnp.array([4.0, 9.0]))
  y, new = bn_jax.cross_iteration_batch_norm(
      jax_dense, w, x, state, jnp.array([2.0, 1.0]), jnp.array([0.0, 1.0]),
      train=False, window=3)
  z = np.asarray(x) @ np.asarray(w)
  ref = (z - [1.0, 2.0]) / np.sqrt(np.array([4.0, 9.0]) + EPS) * [2, 1] + [0, 1]
  np.testing.assert_allclose(y, ref, rtol=1e-6)
  assert new is state


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=0), "window"),
    (dict(burn_in=-1), "burn_in"),
    (dict(rho=-0.5), "rho"),
    (dict(aggregation="mean"), "aggregation"),
    (dict(momentum=1.0), "momentum"),
    (dict(window=2), "window"),  # state was built for window=3
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
  w = jnp.ones((3, 2))
  state = bn_jax.cbn_state(w, 2, 3)
  args = dict(train=True, window=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    bn_jax.cross_iteration_batch_norm(jax_dense, w, jnp.ones((4, 3)), state,
                                      **args)


def test_weight_features_must_match_the_state():
  state = bn_jax.cbn_state(jnp.ones((3, 2)), 2, 3)
  with pytest.raises(ValueError, match="weight"):
    bn_jax.cross_iteration_batch_norm(jax_dense, jnp.ones((3, 4)),
                                      jnp.ones((4, 3)), state, train=True,
                                      window=3)
  with pytest.raises(ValueError, match="num_features"):
    bn_jax.cbn_state(jnp.ones((3, 2)), 5, 3)
  with pytest.raises(ValueError, match="window"):
    bn_jax.cbn_state(jnp.ones((3, 2)), 2, 0)


def test_off_cpu_conditional_branch_equals_the_cpu_branch():
  """The GPU/TPU program (``lax.cond`` skips the Jacobians before recording
  starts), executed on this CPU via ``platform.force_conditional``, gives the
  CPU program's numbers through burn-in, the start of recording, the switch
  and a full, rolling window."""
  from bn_jax.core import platform
  window, burn_in = 3, 6  # recording starts at step 4; window active at 6
  w0 = normal(80, (3, 3, 2, 4), scale=0.3)
  ws = random_walk(81, w0, 10, 0.05)
  xs = [normal(82 + t, (2, 5, 5, 2), loc=0.3) for t in range(10)]
  layer_fn = jax_conv(stride=1)

  def make_step():
    def step(w, x, s):
      def loss(w):
        y, new = bn_jax.cross_iteration_batch_norm(
            layer_fn, w, x, s, train=True, burn_in=burn_in)
        return jnp.sum(y * jnp.arange(4.0)), (y, new)
      (_, (y, new)), g = jax.value_and_grad(loss, has_aux=True)(w)
      return y, new, g
    return jax.jit(step)

  with jax.enable_x64(True):
    cpu_step = make_step()
    with platform.force_conditional():
      cond_step = make_step()
      args = (jnp.asarray(ws[0], jnp.float64), jnp.asarray(xs[0], jnp.float64),
              bn_jax.cbn_state(jnp.asarray(ws[0], jnp.float64), 4, window,
                               jnp.float64))
      cond_text = cond_step.lower(*args).compile().as_text()
    # The HLO op (not the word, which this test's name contains):
    assert " conditional(" in cond_text  # the branch is really taken here
    assert " conditional(" not in cpu_step.lower(*args).compile().as_text()
    s_cpu = s_cond = args[2]
    for t in range(10):
      w = jnp.asarray(ws[t], jnp.float64)
      x = jnp.asarray(xs[t], jnp.float64)
      y_cpu, s_cpu, g_cpu = cpu_step(w, x, s_cpu)
      y_cond, s_cond, g_cond = cond_step(w, x, s_cond)
      # Same float64 operations, possibly fused differently: a few ulps of
      # O(1) values; 1e-12 is > 10^3 eps_f64 and far below any real
      # difference (a skipped or missing entry changes outputs by ~1e-2).
      for a, b in zip((y_cpu, g_cpu) + tuple(s_cpu),
                      (y_cond, g_cond) + tuple(s_cond)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12,
                                   err_msg=f"step {t}")
    assert int(s_cpu.window_count) == 2 and int(s_cpu.step) == 10


def test_window_variance_is_accurate_when_the_mean_dwarfs_the_spread():
  """|mean| / std ~ 200: the window's variance against float64.

  CBN's variance is ``nu_bar - mu_bar^2`` by definition; in float32 the
  naive evaluation loses ``(|mu| / sigma)^2 eps_f32 ~ 4e4 * 1.2e-7 ~ 5e-3``
  relative per rounding of a ``mu^2``-sized term (~1e-2 in all). The
  cancellation-free form only rounds terms of the size of the spread, plus
  the means' own rounding ``~ (|mu| / sigma) eps_f32`` entering squared
  differences linearly: ``2 (|mu| / sigma) eps_f32 * ~20 ops ~ 1e-3``, the
  bound used (measured ~7e-5). The running variance with
  ``compensated_running_stats=True`` and ``momentum=0`` *is* the window's
  variance.
  """
  window = 8
  rng = np.random.default_rng(90)
  w0 = (0.5 + 0.1 * rng.normal(size=(5, 4))).astype(np.float32)
  ws = random_walk(91, w0, window, 1e-4)  # small: no guard needed
  xs = [(90.0 + rng.normal(size=(16, 5))).astype(np.float32)
        for _ in range(window)]
  state = bn_jax.cbn_state(w0, 4, window)
  step = jax.jit(lambda w, x, s: bn_jax.cross_iteration_batch_norm(
      jax_dense, w, x, s, train=True, momentum=0.0,
      compensated_running_stats=True)[1])
  for x, w in zip(xs, ws):
    state = step(w, x, state)
  # float64 reference: the paper's formula on the same float32 inputs.
  mus, nus = [], []
  w_now = np.asarray(ws[-1], np.float64)
  for t, (x, w) in enumerate(zip(xs, ws)):
    _, mu, nu, dmu, dnu = np_stats(x, w)
    d = w_now - np.asarray(w, np.float64)
    mus.append(mu + (dmu * d).sum(0))
    nus.append(nu + (dnu * d).sum(0))
  mus, nus = np.array(mus), np.array(nus)
  assert np.all(nus >= mus**2)  # no guard active
  ref_var = nus.mean(0) - mus.mean(0)**2
  ratio = np.abs(mus.mean(0)) / np.sqrt(ref_var)
  assert np.all((ratio > 150) & (ratio < 300)), ratio
  np.testing.assert_allclose(state.var, ref_var, rtol=1e-3)
