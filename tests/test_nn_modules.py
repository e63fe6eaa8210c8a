"""bn_jax.nn modules: drop-in equality with flax.linen, wrapper equality with
the core functions, the PreciseBN hook, the 'noise' rng and jit behaviour."""
import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax.nn as bnn
from bn_jax.core.batch_norm import BatchNormState, batch_norm
from bn_jax.core.batch_renorm import BatchRenormState, batch_renorm
from bn_jax.core.frozen_batch_norm import frozen_batch_norm
from bn_jax.core.group_norm import group_norm
from bn_jax.core.layer_norm import layer_norm
from bn_jax.core.lp_norm import LpNormState, lp_norm
from bn_jax.core.noisy_batch_norm import noisy_batch_norm


def _rand(seed, shape, scale=1.0, offset=0.0):
  return jnp.asarray(np.random.default_rng(seed).normal(offset, scale, shape),
                     jnp.float32)


def _max_diff(a, b):
  diffs = jax.tree.map(
      lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) -
                                       np.asarray(v, np.float64)))), a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def _max_rel_diff(a, b):
  """max |a - b| / (1 + |b|): float32 rounding of O(1) and larger values."""
  diffs = jax.tree.map(
      lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) -
                                       np.asarray(v, np.float64)) /
                                (1.0 + np.abs(np.asarray(v, np.float64))))),
      a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


class _MLP(fnn.Module):
  """Dense -> BN -> relu -> Dense -> BN with a pluggable BN class."""
  bn_cls: type
  bn_kwargs: tuple = ()
  ura_at_call: bool = False  # use_running_average at call vs construction

  @fnn.compact
  def __call__(self, x, train: bool, mask=None):
    kwargs = dict(self.bn_kwargs)
    for i, width in enumerate((6, 3)):
      x = fnn.Dense(width, name=f"Dense_{i}")(x)
      if self.ura_at_call:
        x = self.bn_cls(name=f"BatchNorm_{i}", **kwargs)(
            x, use_running_average=not train, mask=mask)
      else:
        x = self.bn_cls(use_running_average=not train, name=f"BatchNorm_{i}",
                        **kwargs)(x, mask=mask)
      if i == 0:
        x = fnn.relu(x)
    return x


# Jitted (the model is static): one compilation per model and case instead
# of dozens of op-by-op float64 compilations (~10 s of the suite's time).
@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(model, variables, x, mask):
  """One training step's output, gradients and updated batch_stats."""

  def loss(params):
    y, upd = model.apply({**variables, "params": params}, x, train=True,
                         mask=mask, mutable=["batch_stats"])
    # Not sum(y**2): after a BN that is ~N*F whatever the weights, so its
    # gradients would be pure rounding noise.
    loss = jnp.sum(jnp.sin(2.0 * y + 0.3))
    return loss, (y, upd["batch_stats"])

  grads, (y, batch_stats) = jax.grad(loss, has_aux=True)(variables["params"])
  return y, grads, batch_stats


def _max_diff_over_largest(a, b):
  """max |a - b| over the tree / max |b| over the tree. Per-element relative
  errors are meaningless for gradients that are zero in exact arithmetic
  (the bias of a Dense layer followed by BN), so the scale is the largest
  gradient."""
  top = max(float(np.max(np.abs(np.asarray(v, np.float64))))
            for v in jax.tree.leaves(b))
  return _max_diff(a, b) / top


BN_CASES = {
    "default": dict(kwargs={}, ura_at_call=False),
    "ura_at_call": dict(kwargs={}, ura_at_call=True),
    "no_bias_no_scale": dict(kwargs={"use_bias": False, "use_scale": False},
                             ura_at_call=False),
    "no_scale_momentum": dict(kwargs={"use_scale": False, "momentum": 0.8},
                              ura_at_call=True),
    "mask": dict(kwargs={}, ura_at_call=False, mask=True),
}

# The trajectory is compared in float64. In float32 the two implementations
# (our shifted one-pass variance vs flax's two-pass) legitimately differ by
# a few ulps per op, which two BN layers and their backward pass amplify to
# ~1e-5 relative on a gradient -- and the exact figure depends on the CPU's
# instruction set (measured 5e-6 with SSE4.2/AVX, 1.8e-5 with AVX2 on the
# 'mask' case). In float64 they agree to 4e-15 (measured, SSE4.2; each value
# is O(10) float64 ops of O(1) numbers, conditioning of BN's backward ~1e2
# at these batch sizes: 1e2 * 1e2 * 2.2e-16 ~ 2e-12), so 1e-10 is >= 50x that
# bound on any CPU, while a real semantic difference (biased vs unbiased
# variance, another momentum convention, a mask ignored) is >= 1e-3.
_F64_TOL = 1e-10


@pytest.mark.parametrize("case", sorted(BN_CASES))
def test_batch_norm_matches_flax(case):
  spec = BN_CASES[case]
  ours = _MLP(bnn.BatchNorm, tuple(spec["kwargs"].items()),
              spec["ura_at_call"])
  ref = _MLP(fnn.BatchNorm, tuple(spec["kwargs"].items()) +
             (("use_fast_variance", False),), spec["ura_at_call"])
  x0 = _rand(0, (10, 4), 2.0, 1.0)
  v_ours = ours.init(jax.random.key(0), x0, train=False)
  v_ref = ref.init(jax.random.key(0), x0, train=False)
  # The float32 drop-in contract: same tree, shapes, dtypes, initial values.
  assert (jax.tree.structure(v_ours) == jax.tree.structure(v_ref))
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_ref)
  assert jax.tree.map(lambda a: a.dtype, v_ours) == jax.tree.map(
      lambda a: a.dtype, v_ref)
  assert _max_diff(v_ours, v_ref) == 0.0

  with jax.enable_x64(True):
    batches = [jnp.asarray(_rand(s, (10, 4), 2.0, 1.0), jnp.float64)
               for s in (1, 2, 3)]
    masks = [None] * 3
    if spec.get("mask"):
      masks = [jnp.asarray(np.arange(10) % 4 != k)[:, None] for k in range(3)]
    # 3 SGD steps along the reference trajectory; both models see the same
    # variables at every step, so differences do not compound.
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v_ref)
    for x, mask in zip(batches, masks):
      y, g, bs = _loss_and_grads(ours, variables, x, mask)
      y_ref, g_ref, bs_ref = _loss_and_grads(ref, variables, x, mask)
      assert y.dtype == jnp.float64 and y_ref.dtype == jnp.float64
      assert _max_rel_diff(y, y_ref) <= _F64_TOL
      assert _max_rel_diff(bs, bs_ref) <= _F64_TOL
      assert _max_diff_over_largest(g, g_ref) <= _F64_TOL
      params = jax.tree.map(lambda p, d: p - 0.1 * d, variables["params"],
                            g_ref)
      variables = {"params": params, "batch_stats": bs_ref}
    # The running statistics really moved (the comparison is not vacuous).
    assert _max_diff(variables["batch_stats"]["BatchNorm_0"]["mean"],
                     0.0) > 1e-2

    x_eval = jnp.asarray(_rand(4, (5, 4), 2.0, 1.0), jnp.float64)
    y = ours.apply(variables, x_eval, train=False)
    y_ref = ref.apply(variables, x_eval, train=False)
    assert _max_rel_diff(y, y_ref) <= _F64_TOL


@pytest.mark.parametrize("x_dtype,dtype,expected", [
    (jnp.bfloat16, None, jnp.float32),  # flax: result type of x and params
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
])
def test_batch_norm_dtype_rule_matches_flax(x_dtype, dtype, expected):
  x = _rand(5, (16, 3), 3.0, 2.0).astype(x_dtype)
  ours, ref = bnn.BatchNorm(dtype=dtype), fnn.BatchNorm(
      dtype=dtype, use_fast_variance=False)
  v = ours.init(jax.random.key(0), x, use_running_average=False)
  y, upd = ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  y_ref, upd_ref = ref.apply(v, x, use_running_average=False,
                             mutable=["batch_stats"])
  assert y.dtype == y_ref.dtype == expected
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd))
  # The statistics after one EMA step (var ~1): float32 sums of 16 values,
  # <= ~8 ulps (1e-6) apart between the two algorithms; measured <= 2e-9.
  assert _max_diff(upd, upd_ref) <= 1e-6
  # Equal up to the rounding to the output dtype: float32 outputs (|y| <= ~3)
  # differ by a few ulps of the largest (measured 2.4e-7 = 2 ulps under
  # SSE4.2 and AVX2); 32 ulps of max |y| is >= 10x that. bf16 outputs: 4
  # bf16 ulps (2^-7 each at |y| in [1, 2)).
  largest = float(np.max(np.abs(np.asarray(y_ref, np.float32))))
  tol = (32 * np.finfo(np.float32).eps * largest
         if expected == jnp.float32 else 2 ** -7 * 4)
  assert _max_diff(y, y_ref) <= tol
  y_eval = ours.apply(upd | {"params": v["params"]}, x,
                      use_running_average=True)
  assert y_eval.dtype == expected


def test_batch_norm_init_does_not_update_and_accepts_tiny_batch():
  bn = bnn.BatchNorm(use_running_average=False)
  x = _rand(6, (1, 3), 1.0, 5.0)  # one sample: no batch variance exists
  v = bn.init(jax.random.key(0), x)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))
  assert set(v) == {"params", "batch_stats"}  # no batch_moments at init
  v = bn.init(jax.random.key(0), _rand(7, (4, 3), 1.0, 5.0))
  np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
  with pytest.raises(ValueError, match="more than 1 value"):
    bn.apply(v, x, mutable=["batch_stats"])


def test_batch_norm_extras_match_core():
  x = _rand(8, (12, 3), 2.0, -1.0)
  bn = bnn.BatchNorm(momentum=0.7, unbiased_running_var=True,
                     ghost_batch_size=4)
  v = bn.init(jax.random.key(0), x, use_running_average=False)
  params = {"scale": _rand(9, (3,), 1.0, 1.0), "bias": _rand(10, (3,))}
  state = BatchNormState(_rand(11, (3,)), jnp.abs(_rand(12, (3,))) + 0.5)
  v = {"params": params, "batch_stats": state._asdict()}
  y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  y_core, s_core = batch_norm(x, state, params["scale"], params["bias"],
                              train=True, momentum=0.7,
                              unbiased_running_var=True, ghost_batch_size=4)
  np.testing.assert_array_equal(y, y_core)
  assert _max_diff(upd["batch_stats"], s_core._asdict()) == 0.0


def _params_for(shape, seed):
  return {"scale": _rand(seed, shape, 0.5, 1.0), "bias": _rand(seed + 1, shape)}


def test_batch_renorm_wraps_core():
  x = _rand(20, (8, 3), 2.0, 1.0)
  kwargs = dict(momentum=0.9, warmup_steps=2, r_max_steps=10, d_max_steps=6)
  mod = bnn.BatchRenorm(**kwargs)
  v = mod.init(jax.random.key(0), x, use_running_average=True)
  assert jax.tree.map(jnp.shape, v["batch_stats"]) == {
      "mean": (3,), "var": (3,), "step": ()}
  state = BatchRenormState(_rand(21, (3,)), jnp.abs(_rand(22, (3,))) + 0.2,
                           jnp.asarray(5, jnp.int32))
  v = {"params": _params_for((3,), 23), "batch_stats": state._asdict()}
  y, upd = mod.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  y_core, s_core = batch_renorm(x, state, v["params"]["scale"],
                                v["params"]["bias"], train=True, **kwargs)
  np.testing.assert_array_equal(y, y_core)
  assert _max_diff(upd["batch_stats"], s_core._asdict()) == 0.0
  assert int(upd["batch_stats"]["step"]) == 6
  y_eval = mod.apply(v, x, use_running_average=True)
  np.testing.assert_array_equal(
      y_eval, batch_renorm(x, state, v["params"]["scale"], v["params"]["bias"],
                           train=False, **kwargs)[0])


def test_noisy_batch_norm_wraps_core_and_needs_noise_rng():
  x = _rand(30, (8, 3), 2.0, 1.0)
  state = BatchNormState(_rand(31, (3,)), jnp.abs(_rand(32, (3,))) + 0.2)
  params = _params_for((3,), 33)
  v = {"params": params, "batch_stats": state._asdict()}
  # Degenerate noise (mean 0.7, std 0): the key cannot matter, so the module
  # must equal the core function with any key.
  fixed = bnn.NoisyBatchNorm(noise_mean_range=(0.7, 0.7),
                             noise_std_range=(0.0, 0.0), momentum=0.8)
  y, upd = fixed.apply(v, x, use_running_average=False,
                       mutable=["batch_stats"],
                       rngs={"noise": jax.random.key(1)})
  y_core, s_core = noisy_batch_norm(
      x, state, params["scale"], params["bias"], key=jax.random.key(99),
      train=True, noise_mean_range=(0.7, 0.7), noise_std_range=(0.0, 0.0),
      momentum=0.8)
  np.testing.assert_allclose(y, y_core, atol=1e-6)
  assert _max_diff(upd["batch_stats"], s_core._asdict()) == 0.0
  # noise_form reaches the core: degenerate affine noise is y_bn * 2 + 0.7.
  affine = bnn.NoisyBatchNorm(noise_form="affine", noise_mean_range=(0.7, 0.7),
                              noise_std_range=(2.0, 2.0), momentum=0.8)
  y_aff, _ = affine.apply(v, x, use_running_average=False,
                          mutable=["batch_stats"],
                          rngs={"noise": jax.random.key(1)})
  y_bn = np.asarray(y_core, np.float64) - 0.7
  # |y| <= ~10: 1e-5 is ~8 float32 ulps of it.
  np.testing.assert_allclose(y_aff, 2.0 * y_bn + 0.7, atol=1e-5)

  noisy = bnn.NoisyBatchNorm()
  run = functools.partial(noisy.apply, v, x, use_running_average=False,
                          mutable=["batch_stats"])
  y1, _ = run(rngs={"noise": jax.random.key(1)})
  y1_again, _ = run(rngs={"noise": jax.random.key(1)})
  y2, _ = run(rngs={"noise": jax.random.key(2)})
  np.testing.assert_array_equal(y1, y1_again)
  assert _max_diff(y1, y2) > 0.1
  with pytest.raises(ValueError, match="'noise' rng"):
    run()
  # Eval: no rng needed, deterministic, equals batch-norm inference.
  y_eval = noisy.apply(v, x, use_running_average=True)
  y_bn = batch_norm(x, state, params["scale"], params["bias"], train=False)[0]
  np.testing.assert_array_equal(y_eval, y_bn)


@pytest.mark.parametrize("p", [1, "inf"])
def test_lp_norm_wraps_core(p):
  x = _rand(40, (8, 3), 2.0, 1.0)
  mod = bnn.LpNorm(p=p, momentum=0.8)
  v = mod.init(jax.random.key(0), x, use_running_average=False)
  assert set(v["batch_stats"]) == {"mean", "norm"}
  state = LpNormState(_rand(41, (3,)), jnp.abs(_rand(42, (3,))) + 0.2)
  v = {"params": _params_for((3,), 43), "batch_stats": state._asdict()}
  y, upd = mod.apply(v, x, use_running_average=False,
                     mutable=["batch_stats", "batch_moments"])
  y_core, s_core = lp_norm(x, state, v["params"]["scale"], v["params"]["bias"],
                           train=True, p=p, momentum=0.8)
  np.testing.assert_array_equal(y, y_core)
  assert _max_diff(upd["batch_stats"], s_core._asdict()) == 0.0
  assert "batch_moments" not in upd  # no PreciseBN hook (documented)


def test_frozen_batch_norm_wraps_core():
  x = _rand(50, (6, 2, 3), 2.0, 1.0)
  mod = bnn.FrozenBatchNorm(epsilon=1e-3)
  v = mod.init(jax.random.key(0), x)
  state = BatchNormState(_rand(51, (3,)), jnp.abs(_rand(52, (3,))) + 0.2)
  v = {"params": _params_for((3,), 53), "batch_stats": state._asdict()}
  y, upd = mod.apply(v, x, use_running_average=False,
                     mutable=["batch_stats", "batch_moments"])
  y_core, _ = frozen_batch_norm(x, state, v["params"]["scale"],
                                v["params"]["bias"], epsilon=1e-3)
  np.testing.assert_array_equal(y, y_core)
  assert _max_diff(upd["batch_stats"], state._asdict()) == 0.0
  assert "batch_moments" not in upd


@pytest.mark.parametrize("kwargs", [{"num_groups": 4},
                                    {"num_groups": None, "group_size": 2}])
def test_group_norm_matches_flax_and_core(kwargs):
  x = _rand(60, (2, 3, 3, 8), 2.0, 1.0)
  ours, ref = bnn.GroupNorm(**kwargs), fnn.GroupNorm(**kwargs)
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(
      jnp.shape, ref.init(jax.random.key(0), x))
  v = {"params": _params_for((8,), 61)}
  y = ours.apply(v, x)
  # float32, two reduction orders, |y| <= ~4: measured 1.4e-6; 2e-5 is
  # >= 10x that (~40 ulps of the largest output).
  np.testing.assert_allclose(y, ref.apply(v, x), atol=2e-5)
  y_core, _ = group_norm(x, scale=v["params"]["scale"],
                         bias=v["params"]["bias"], **kwargs)
  np.testing.assert_array_equal(y, y_core)


def test_layer_norm_matches_flax_and_core():
  x = _rand(70, (4, 5), 2.0, 1.0)
  ours, ref = bnn.LayerNorm(epsilon=1e-5), fnn.LayerNorm(epsilon=1e-5)
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(
      jnp.shape, ref.init(jax.random.key(0), x))
  v = {"params": _params_for((5,), 71)}
  y = ours.apply(v, x)
  np.testing.assert_allclose(y, ref.apply(v, x), atol=1e-5)
  np.testing.assert_array_equal(
      y, layer_norm(x, scale=v["params"]["scale"], bias=v["params"]["bias"],
                    epsilon=1e-5)[0])
  # bf16 input, float32 params: float32 output, as flax.
  assert ours.apply(v, x.astype(jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.parametrize("cls", [bnn.BatchNorm, bnn.BatchRenorm,
                                 bnn.NoisyBatchNorm])
def test_precise_bn_hook(cls):
  x = np.asarray(_rand(80, (12, 2, 3), 2.0, 1.0))
  mod = cls()
  rngs = {"noise": jax.random.key(0)}
  v = mod.init({"params": jax.random.key(0), **rngs}, x,
               use_running_average=False)
  assert set(v) == {"params", "batch_stats"}
  _, upd = mod.apply(v, x, use_running_average=False, rngs=rngs,
                     mutable=["batch_stats"])
  assert set(upd) == {"batch_stats"}
  _, upd = mod.apply(v, x, use_running_average=True,
                     mutable=["batch_stats", "batch_moments"])
  assert not upd.get("batch_moments")  # eval mode stores nothing
  _, upd = mod.apply(v, x, use_running_average=False, rngs=rngs,
                     mutable=["batch_stats", "batch_moments"])
  moments = upd["batch_moments"]
  flat = x.astype(np.float64).reshape(-1, 3)
  # float32 sums of 24 values: a few ulps of the largest |x| for the mean
  # (measured 2e-7 relative to a mean of ~1), so 32 ulps of max |x|; the
  # variance: measured < 7e-7 relative, 1e-5 is >= 14x that.
  np.testing.assert_allclose(
      moments["mean"], flat.mean(0), rtol=0,
      atol=32 * np.finfo(np.float32).eps * np.max(np.abs(flat)))
  np.testing.assert_allclose(moments["var"], flat.var(0), rtol=1e-5)
  assert moments["count"].shape == () and float(moments["count"]) == 24


def test_precise_bn_hook_ghost_and_mask():
  x = np.asarray(_rand(90, (12, 3), 2.0, 1.0))
  # Ghost batches: the stored moments are those of the whole batch.
  mod = bnn.BatchNorm(ghost_batch_size=4)
  v = mod.init(jax.random.key(0), x, use_running_average=True)
  _, upd = mod.apply(v, x, use_running_average=False,
                     mutable=["batch_stats", "batch_moments"])
  m = upd["batch_moments"]
  np.testing.assert_allclose(m["mean"], x.astype(np.float64).mean(0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["var"], x.astype(np.float64).var(0), rtol=1e-5)
  assert float(m["count"]) == 12
  # A mask: only the kept samples, and a per-feature count.
  keep = np.arange(12) % 3 != 0
  _, upd = bnn.BatchNorm().apply(v, x, use_running_average=False,
                                 mask=jnp.asarray(keep)[:, None],
                                 mutable=["batch_stats", "batch_moments"])
  m = upd["batch_moments"]
  np.testing.assert_allclose(m["mean"], x[keep].astype(np.float64).mean(0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["var"], x[keep].astype(np.float64).var(0),
                             rtol=1e-5)
  np.testing.assert_array_equal(m["count"], np.full(3, keep.sum()))


class _AllNorms(fnn.Module):
  """One of each batch-statistics module, for the jit/retracing test."""

  @fnn.compact
  def __call__(self, x, train: bool):
    ura = not train
    x = bnn.BatchNorm(use_running_average=ura)(fnn.Dense(4)(x))
    x = bnn.BatchRenorm(use_running_average=ura)(fnn.Dense(4)(x))
    x = bnn.NoisyBatchNorm(use_running_average=ura)(fnn.Dense(4)(x))
    x = bnn.LpNorm(use_running_average=ura, p=1)(fnn.Dense(4)(x))
    x = bnn.FrozenBatchNorm()(bnn.GroupNorm(num_groups=2)(x))
    return bnn.LayerNorm()(x)


def test_jit_train_step_does_not_retrace():
  model = _AllNorms()
  x = _rand(100, (8, 3))
  variables = model.init({"params": jax.random.key(0)}, x, train=False)
  traces = []

  @jax.jit
  def train_step(variables, x, key):
    traces.append(1)  # runs only while tracing

    def loss(params):
      y, upd = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"], rngs={"noise": key})
      return jnp.mean(y ** 2), upd
    grads, upd = jax.grad(loss, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return {"params": params, "batch_stats": upd["batch_stats"]}

  for step in range(3):
    new = train_step(variables, x + step, jax.random.key(step))
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    variables = new
  assert len(traces) == 1
  assert int(variables["batch_stats"]["BatchRenorm_0"]["step"]) == 3
  assert all(np.isfinite(np.asarray(a)).all()
             for a in jax.tree.leaves(variables))
