"""CBN with the official code's semantics against a NumPy port of its forward.

The reference is an independent float64 port of ``CBatchNorm2d.forward`` of
the official implementation (Howal/Cross-iterationBatchNorm,
``mmdet/models/utils/CBN.py``), statement by statement, for a Dense layer
(``z = x @ w``; the official code takes the preceding conv's weight and
differentiates its statistics with ``torch.autograd.grad``; for a Dense layer
those Jacobians are the closed forms below). It keeps the official lists of
past entries (newest first, truncated to ``buffer_num``), its ``iter_count``
and ``_update_buffer_num``, torch's unbiased ``var``, the raw
``meanx2 - mu^2`` variance, the ``count`` rule and ``sqrt(var) + eps``.

bn_jax reproduces it with ``momentum=0.9`` (PyTorch 0.1),
``epsilon_on_std=True``, ``unbiased_running_var=True``,
``unbiased_burn_in_var=True``, ``aggregation='count'`` and
``window_schedule='empty'`` (``two_stage=True``) or ``'linear'``
(``two_stage=False``). Each option is also shown to matter: reverting any
one of them breaks the match.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax

EPS = 1e-5
STEPS = 20


class OfficialCBN:
  """NumPy float64 port of the official ``CBatchNorm2d`` (Dense layer)."""

  def __init__(self, num_features, *, buffer_num, rho, burnin, two_stage,
               eps=EPS, momentum=0.1):
    self.eps, self.momentum = eps, momentum
    self.buffer_num = self.max_buffer_num = buffer_num
    self.rho, self.burnin, self.two_stage = rho, burnin, two_stage
    self.iter_count = 0
    self.pre_mu, self.pre_meanx2 = [], []
    self.pre_dmudw, self.pre_dmeanx2dw, self.pre_weight = [], [], []
    self.running_mean = np.zeros(num_features)
    self.running_var = np.ones(num_features)
    self.dropped = 0  # past entries dropped by the count rule (diagnostic)

  def _update_buffer_num(self):
    if self.two_stage:
      self.buffer_num = (self.max_buffer_num if self.iter_count > self.burnin
                         else 0)
    else:
      self.buffer_num = int(self.max_buffer_num *
                            min(self.iter_count / self.burnin, 1.0))

  def forward(self, x, weight, gamma, beta, training=True):
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    y = (x @ weight).T  # (C, M): the official input.transpose(0, 1) view
    if training and self.burnin > 0:
      self.iter_count += 1
      self._update_buffer_num()
    if self.buffer_num > 0 and training:
      cur_mu = y.mean(1)
      cur_meanx2 = (y**2).mean(1)
      cur_sigma2 = y.var(1, ddof=1)  # torch's var: unbiased
      # autograd.grad(cur_mu, weight, ones), autograd.grad(cur_meanx2, ...)
      dmudw = np.repeat(x.mean(0)[:, None], weight.shape[1], 1)
      dmeanx2dw = 2.0 * x.T @ y.T / x.shape[0]
      mu_all = np.stack([cur_mu] + [
          m + (self.rho * d * (weight - w)).sum(0)
          for m, d, w in zip(self.pre_mu, self.pre_dmudw, self.pre_weight)])
      meanx2_all = np.stack([cur_meanx2] + [
          m + (self.rho * d * (weight - w)).sum(0) for m, d, w in zip(
              self.pre_meanx2, self.pre_dmeanx2dw, self.pre_weight)])
      sigma2_all = meanx2_all - mu_all**2
      re_mu_all, re_meanx2_all = mu_all.copy(), meanx2_all.copy()
      re_mu_all[sigma2_all < 0] = 0
      re_meanx2_all[sigma2_all < 0] = 0
      self.dropped += int((sigma2_all < 0).sum())
      count = (sigma2_all >= 0).sum(0).astype(np.float64)
      mu = re_mu_all.sum(0) / count
      sigma2 = re_meanx2_all.sum(0) / count - mu**2
      keep = self.buffer_num - 1
      self.pre_mu = [cur_mu] + self.pre_mu[:keep]
      self.pre_meanx2 = [cur_meanx2] + self.pre_meanx2[:keep]
      self.pre_dmudw = [dmudw] + self.pre_dmudw[:keep]
      self.pre_dmeanx2dw = [dmeanx2dw] + self.pre_dmeanx2dw[:keep]
      self.pre_weight = [weight.copy()] + self.pre_weight[:keep]
    else:
      mu = y.mean(1)
      cur_mu = mu
      sigma2 = y.var(1, ddof=1)
      cur_sigma2 = sigma2
    if not training:
      y = (y - self.running_mean[:, None]) / (
          self.running_var[:, None]**0.5 + self.eps)
    else:
      self.running_mean = ((1 - self.momentum) * self.running_mean +
                           self.momentum * cur_mu)
      self.running_var = ((1 - self.momentum) * self.running_var +
                          self.momentum * cur_sigma2)
      y = (y - mu[:, None]) / (sigma2[:, None]**0.5 + self.eps)
    return (gamma[:, None] * y + beta[:, None]).T


OFFICIAL_OPTIONS = dict(momentum=0.9, epsilon_on_std=True,
                        unbiased_running_var=True, unbiased_burn_in_var=True,
                        aggregation="count")


def _dense(x, w):
  return x @ w


def _sequence(seed, steps, wshape=(5, 4), batch=6, step_size=0.25):
  """Inputs with a drifting non-zero mean and weights on a random walk large
  enough that some compensated past variances go negative (count rule)."""
  rng = np.random.default_rng(seed)
  w0 = rng.normal(0.0, 1.0 / np.sqrt(wshape[0]), wshape)
  walk = np.cumsum(rng.normal(0.0, step_size * np.std(w0),
                              (steps,) + wshape), 0)
  ws = [w0 + walk[t] for t in range(steps)]
  xs = [rng.normal(0.5 + 0.05 * t, 1.0, (batch, wshape[0]))
        for t in range(steps)]
  gamma = 1.0 + 0.1 * rng.normal(size=wshape[1])
  beta = np.linspace(-0.2, 0.2, wshape[1])
  return xs, ws, gamma, beta


def _run_bn_jax(xs, ws, gamma, beta, *, window, burn_in, rho, options):
  """bn_jax in float64 over the sequence; outputs, final eval, state."""
  with jax.enable_x64(True):
    w0 = jnp.asarray(ws[0], jnp.float64)
    state = bn_jax.cbn_state(w0, w0.shape[-1], window, jnp.float64)
    kw = dict(burn_in=burn_in, rho=rho, epsilon=EPS, **options)
    step = jax.jit(lambda w, x, s: bn_jax.cross_iteration_batch_norm(
        _dense, w, x, s, gamma, beta, train=True, **kw))
    ys = []
    for x, w in zip(xs, ws):
      y, state = step(jnp.asarray(w), jnp.asarray(x), state)
      ys.append(np.asarray(y))
    y_eval, _ = bn_jax.cross_iteration_batch_norm(
        _dense, jnp.asarray(ws[-1]), jnp.asarray(xs[0]), state, gamma, beta,
        train=False, **kw)
    return ys, np.asarray(y_eval), jax.tree.map(np.asarray, state)


def _run_official(xs, ws, gamma, beta, *, buffer_num, burnin, rho,
                  two_stage):
  ref = OfficialCBN(ws[0].shape[-1], buffer_num=buffer_num, rho=rho,
                    burnin=burnin, two_stage=two_stage)
  ys = [ref.forward(x, w, gamma, beta) for x, w in zip(xs, ws)]
  y_eval = ref.forward(xs[0], ws[-1], gamma, beta, training=False)
  return ys, y_eval, ref


# Both are float64 computations of the same formulas; they differ by the
# cancellation-free vs raw (meanx2 - mu^2) variance, whose difference is
# ~ eps_f64 * mu^2 / var * (few ops) ~ 1e-14 here: 1e-9 leaves > 1e4 margin
# and is far below any semantic difference (epsilon placement alone changes
# the outputs by ~eps / std ~ 1e-5).
TOL = 1e-9

CASES = {
    # name: (window k = buffer_num + 1, burn_in, two_stage)
    "two_stage": (4, 5, True),
    "two_stage_no_burn_in": (3, 0, True),
    "linear_growth": (8, 9, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_official_semantics_match_numpy_port_of_the_official_forward(name):
  window, burn_in, two_stage = CASES[name]
  xs, ws, gamma, beta = _sequence(len(name), STEPS)
  schedule = "empty" if two_stage else "linear"
  options = dict(OFFICIAL_OPTIONS, window_schedule=schedule)
  ref_ys, ref_eval, ref = _run_official(
      xs, ws, gamma, beta, buffer_num=window - 1, burnin=burn_in, rho=1.0,
      two_stage=two_stage)
  ys, y_eval, state = _run_bn_jax(xs, ws, gamma, beta, window=window,
                                  burn_in=burn_in, rho=1.0, options=options)
  for t, (y, r) in enumerate(zip(ys, ref_ys)):
    np.testing.assert_allclose(y, r, rtol=TOL, atol=TOL, err_msg=f"step {t}")
  np.testing.assert_allclose(state.mean, ref.running_mean, rtol=TOL)
  np.testing.assert_allclose(state.var, ref.running_var, rtol=TOL)
  np.testing.assert_allclose(y_eval, ref_eval, rtol=TOL, atol=TOL)
  # The sequence exercises what it should: the count rule dropped entries,
  # and the window was used (outputs differ from plain BN's).
  assert ref.dropped > 0, ref.dropped
  assert int(state.window_count) == len(ref.pre_mu) == window - 1


@pytest.mark.parametrize("option", sorted(OFFICIAL_OPTIONS) + [
    "window_schedule"])
def test_each_official_option_matters(option):
  """Reverting any one option to bn_jax's default breaks the match, so the
  comparison above pins every one of them."""
  window, burn_in = 4, 5
  xs, ws, gamma, beta = _sequence(7, STEPS)
  ref_ys, ref_eval, ref = _run_official(
      xs, ws, gamma, beta, buffer_num=window - 1, burnin=burn_in, rho=1.0,
      two_stage=True)
  defaults = dict(momentum=0.9, epsilon_on_std=False,
                  unbiased_running_var=False, unbiased_burn_in_var=False,
                  aggregation="max", window_schedule="prefill")
  options = dict(OFFICIAL_OPTIONS, window_schedule="empty")
  if option == "momentum":
    options["momentum"] = 0.99  # bn_jax's former default
  else:
    options[option] = defaults[option]
  ys, y_eval, state = _run_bn_jax(xs, ws, gamma, beta, window=window,
                                  burn_in=burn_in, rho=1.0, options=options)
  gaps = [np.abs(np.asarray(y) - r).max() for y, r in zip(ys, ref_ys)]
  gaps += [np.abs(y_eval - ref_eval).max(),
           np.abs(state.var - ref.running_var).max(),
           np.abs(state.mean - ref.running_mean).max()]
  assert max(gaps) > 1e3 * TOL, (option, max(gaps))


def test_linear_schedule_window_sizes_follow_the_official_ramp():
  """``two_stage=False``: at step t the official code uses every stored
  entry and then keeps min(stored + 1, int((k-1) min((t+1)/burn_in, 1)))."""
  window, burn_in = 8, 9
  xs, ws, gamma, beta = _sequence(3, STEPS)
  ref = OfficialCBN(4, buffer_num=window - 1, rho=1.0, burnin=burn_in,
                    two_stage=False)
  with jax.enable_x64(True):
    state = bn_jax.cbn_state(jnp.asarray(ws[0]), 4, window, jnp.float64)
    step = jax.jit(lambda w, x, s: bn_jax.cross_iteration_batch_norm(
        _dense, w, x, s, train=True, burn_in=burn_in,
        window_schedule="linear", **OFFICIAL_OPTIONS)[1])
    sizes, ref_sizes = [], []
    for x, w in zip(xs, ws):
      ref.forward(x, w, gamma * 0 + 1, beta * 0)
      state = step(jnp.asarray(w), jnp.asarray(x), state)
      sizes.append(int(state.window_count))
      ref_sizes.append(len(ref.pre_mu))
  assert sizes == ref_sizes, (sizes, ref_sizes)
  # floor(7 i / 9) for iter_count i = 1..9 caps the growth at step 5.
  assert ref_sizes[:10] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7], ref_sizes
