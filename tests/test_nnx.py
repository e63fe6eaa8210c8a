"""bn_jax.nnx: each NNX module against its core function and its Linen twin.

For every module: one training step (output, gradients w.r.t. input, scale
and bias, new running statistics) and one eval step, under ``nnx.jit``,
``nnx.vmap`` (an ensemble of modules) and ``nnx.scan`` (several training
steps), against the :mod:`bn_jax.core` function (itself checked against
NumPy float64 in the core tests) and the :mod:`bn_jax.nn` Linen module.

Tolerance (float32, any CPU): the three computations evaluate the same
formulas, possibly fused differently by XLA. BN/LN/GN over <= 32 values per
statistic take a sum of <= 32 terms and <= 10 further roundings per output,
so two orders of evaluation differ by at most ~(32 + 10) * eps_f32 ~ 5e-6
relative to the largest magnitude involved; TOL = 5e-5 (10x margin) relative
to the largest magnitude of the reference. A wrong momentum, epsilon,
mask, ghost split or a missing update is off by >= 1e-3.
"""
from __future__ import annotations

import inspect

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bn_jax
import bn_jax.nn as bnn
import bn_jax.nnx as bx

TOL = 5e-5
C = 4
N = 16


def _close(got, want, what, tol=TOL):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want))) if got.size else 0.0
  assert err <= tol * scale, f"{what}: max error {err} > {tol} * {scale}"


def _data(shape, seed, loc=1.5, spread=2.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(loc + spread * rng.standard_normal(shape), jnp.float32)


def _mask(seed):
  rng = np.random.default_rng(seed)
  m = rng.random((N, 1)) < 0.7
  m[:2] = True  # at least 2 valid samples
  return jnp.asarray(m)


# name -> (nnx class, linen class, core fn, constructor kwargs, core kwargs,
#          call kwargs, stateful)
SPECS = {
    "bn": (bx.BatchNorm, bnn.BatchNorm, bn_jax.batch_norm,
           dict(momentum=0.8, epsilon=1e-3),
           dict(momentum=0.8, epsilon=1e-3), {}, True),
    "bn_mask_unbiased": (
        bx.BatchNorm, bnn.BatchNorm, bn_jax.batch_norm,
        dict(momentum=0.7, unbiased_running_var=True),
        dict(momentum=0.7, unbiased_running_var=True), {"mask": True}, True),
    "ghost": (bx.BatchNorm, bnn.BatchNorm, bn_jax.batch_norm,
              dict(ghost_batch_size=4), dict(ghost_batch_size=4), {}, True),
    "brn": (bx.BatchRenorm, bnn.BatchRenorm, bn_jax.batch_renorm,
            dict(r_max=1.5, d_max=0.5, momentum=0.5),
            dict(r_max=1.5, d_max=0.5, momentum=0.5), {}, True),
    "noisy": (bx.NoisyBatchNorm, bnn.NoisyBatchNorm, bn_jax.noisy_batch_norm,
              dict(noise_std_range=(0.2, 0.4)),
              dict(noise_std_range=(0.2, 0.4)), {"key": True}, True),
    "lp1": (bx.LpNorm, bnn.LpNorm, bn_jax.lp_norm, dict(p=1), dict(p=1), {},
            True),
    "frozen": (bx.FrozenBatchNorm, bnn.FrozenBatchNorm,
               bn_jax.frozen_batch_norm, dict(epsilon=1e-3),
               dict(epsilon=1e-3), {}, False),
    "ln": (bx.LayerNorm, bnn.LayerNorm, bn_jax.layer_norm,
           dict(epsilon=1e-5), dict(epsilon=1e-5), {}, False),
    "gn": (bx.GroupNorm, bnn.GroupNorm, bn_jax.group_norm,
           dict(num_groups=2), dict(num_groups=2), {}, False),
}
NOISE_KEY = jax.random.key(7)


def _build(name, seed=0):
  """The NNX module with random scale/bias/statistics and the state/params
  in the core's form."""
  nnx_cls, _, _, kwargs, _, _, stateful = SPECS[name]
  if name == "gn":
    model = nnx_cls(C, rngs=nnx.Rngs(0), **kwargs)
  else:
    model = nnx_cls(C, rngs=nnx.Rngs(0, noise=1), **kwargs)
  rng = np.random.default_rng(100 + seed)
  model.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(C),
                                 jnp.float32)
  model.bias[...] = jnp.asarray(0.3 * rng.standard_normal(C), jnp.float32)
  if stateful or name == "frozen":
    model.mean[...] = jnp.asarray(rng.standard_normal(C), jnp.float32)
    second = "norm" if name == "lp1" else "var"
    getattr(model, second)[...] = jnp.asarray(0.5 + rng.random(C),
                                              jnp.float32)
  return model


def _core_state(name, model):
  """The core state of ``model`` (its BatchStat values)."""
  if name in ("ln",):
    return bn_jax.layer_norm_state()
  if name in ("gn",):
    return bn_jax.group_norm_state()
  if name == "brn":
    return bn_jax.BatchRenormState(model.mean[...], model.var[...],
                                   model.step[...])
  if name == "lp1":
    return bn_jax.LpNormState(model.mean[...], model.norm[...])
  return bn_jax.BatchNormState(model.mean[...], model.var[...])


def _call_kwargs(name, mask):
  extra = SPECS[name][5]
  out = {}
  if extra.get("mask"):
    out["mask"] = mask
  return out


def _core_step(name, state, scale, bias, x, w, mask, train):
  """Reference: (y, (dx, dscale, dbias), new_state) from the core function."""
  _, _, core_fn, _, core_kwargs, extra, _ = SPECS[name]
  kw = dict(core_kwargs)
  if name not in ("ln", "gn", "frozen"):
    kw["train"] = train
  kw.update(_call_kwargs(name, mask))
  if extra.get("key") and train:
    kw["key"] = NOISE_KEY

  def loss(x, scale, bias):
    y, new_state = core_fn(x, state, scale, bias, **kw)
    return jnp.sum(w * y), (y, new_state)

  (_, (y, new_state)), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  return y, grads, new_state


def _nnx_call(name, model, x, mask, train):
  kwargs = _call_kwargs(name, mask)
  if name in ("ln", "gn"):
    return model(x, **kwargs)
  if SPECS[name][5].get("key"):
    return model(x, use_running_average=not train,
                 rngs=NOISE_KEY if train else None, **kwargs)
  return model(x, use_running_average=not train, **kwargs)


@nnx.jit(static_argnames=("name", "train"))
def _nnx_step(model, x, w, mask, *, name, train):
  def loss(model, x):
    y = _nnx_call(name, model, x, mask, train)
    return jnp.sum(w * y), y

  (_, y), (g_model, g_x) = nnx.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(model, x)
  return y, (g_x, g_model["scale"][...], g_model["bias"][...])


def _state_values(name, model):
  return tuple(np.asarray(v) for v in _core_state(name, model))


# Eval mode is one code path (normalize_with) for all but BRN and LpNorm.
@pytest.mark.parametrize("name,train", [(name, True) for name in SPECS] + [
    ("bn", False), ("brn", False), ("lp1", False)])
def test_nnx_module_equals_core_and_linen_under_jit(name, train):
  """Output, gradients and running statistics under nnx.jit."""
  model = _build(name)
  x, w, mask = _data((N, C), 1), _data((N, C), 2, 0.0, 1.0), _mask(3)
  state0 = _core_state(name, model)
  scale, bias = model.scale[...], model.bias[...]
  y_ref, g_ref, s_ref = _core_step(name, state0, scale, bias, x, w, mask,
                                   train)
  y, grads = _nnx_step(model, x, w, mask, name=name, train=train)
  _close(y, y_ref, f"{name} y")
  for got, want, what in zip(grads, g_ref, ("dx", "dscale", "dbias")):
    _close(got, want, f"{name} {what}")
  for got, want in zip(_core_state(name, model), s_ref):
    _close(got, want, f"{name} new state")
  if SPECS[name][6] and train:  # the update happened (not a no-op)
    assert float(np.max(np.abs(np.asarray(model.mean[...]) -
                               np.asarray(state0.mean)))) > 1e-3

  # The Linen twin from the same variables (not for the noisy norm: Linen
  # folds the module path into its key, so only the gradients would compare,
  # and those are the core's, checked above).
  _, linen_cls, _, kwargs, _, extra, stateful = SPECS[name]
  if extra.get("key"):
    return
  module = linen_cls(**kwargs)
  variables = {"params": {"scale": scale, "bias": bias}}
  if stateful or name == "frozen":
    variables["batch_stats"] = state0._asdict()
  call = _call_kwargs(name, mask)
  rngs = {"noise": NOISE_KEY} if extra.get("key") else None
  if name not in ("ln", "gn"):
    call["use_running_average"] = not train

  def linen_loss(params, x):
    y, upd = module.apply({**variables, "params": params}, x, rngs=rngs,
                          mutable=["batch_stats"], **call)
    return jnp.sum(w * y), (y, upd)

  (_, (y_lin, upd)), (g_p, g_x) = jax.jit(jax.value_and_grad(
      linen_loss, argnums=(0, 1), has_aux=True))(variables["params"], x)
  _close(y, y_lin, f"{name} y vs linen")
  _close(grads[0], g_x, f"{name} dx vs linen")
  _close(grads[1], g_p["scale"], f"{name} dscale vs linen")
  if stateful and train:
    for field, got in zip(type(state0)._fields, _core_state(name, model)):
      _close(got, upd["batch_stats"][field], f"{name} {field} vs linen")


@pytest.mark.parametrize("name", ["brn", "gn"])
def test_nnx_vmap_ensemble_equals_vmapped_core(name):
  """An ensemble of 3 modules under nnx.vmap = jax.vmap of the core."""
  members = 3

  @nnx.split_rngs(splits=members)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    nnx_cls, _, _, kwargs, _, _, _ = SPECS[name]
    return nnx_cls(C, rngs=rngs, **kwargs)

  models = create(nnx.Rngs(0))
  rng = np.random.default_rng(5)
  models.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal((members, C)),
                                  jnp.float32)
  xs = _data((members, N, C), 6)
  state0 = jax.tree.map(np.asarray, _core_state(name, models))

  @nnx.jit
  @nnx.vmap(in_axes=(0, 0), out_axes=0)
  def forward(model, x):
    return _nnx_call(name, model, x, None, True)

  ys = forward(models, xs)
  _, _, core_fn, _, core_kwargs, _, stateful = SPECS[name]
  kw = dict(core_kwargs)
  if stateful:
    kw["train"] = True
  y_ref, s_ref = jax.vmap(
      lambda x, s, g, b: core_fn(x, s, g, b, **kw))(
          xs, _core_state(name, models) if not stateful else type(
              _core_state(name, models))(*map(jnp.asarray, state0)),
          models.scale[...], models.bias[...])
  _close(ys, y_ref, f"{name} vmapped y")
  if stateful:
    for got, want in zip(_core_state(name, models), s_ref):
      _close(got, want, f"{name} vmapped state")


@pytest.mark.parametrize("name", ["ghost", "brn"])
def test_nnx_scan_over_steps_equals_core_loop(name):
  """Five training steps in nnx.scan = a Python loop of the core function."""
  steps = 5
  model = _build(name)
  xs = _data((steps, N, C), 8)
  state = _core_state(name, model)
  scale, bias = model.scale[...], model.bias[...]
  _, _, core_fn, _, core_kwargs, _, _ = SPECS[name]
  y_ref = []
  for t in range(steps):
    y_t, state = core_fn(xs[t], state, scale, bias, train=True,
                         **core_kwargs)
    y_ref.append(y_t)

  @nnx.jit
  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def run(model, x):
    return model, model(x, use_running_average=False)

  _, ys = run(model, xs)
  _close(ys, jnp.stack(y_ref), f"{name} scanned y")
  for got, want in zip(_core_state(name, model), state):
    _close(got, want, f"{name} state after scan")


def test_train_eval_switching_as_flax():
  """model.train()/eval(), nnx.view and the call argument select the mode
  as in flax.nnx (eval output = running-statistics affine map)."""

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(3, C, rngs=rngs)
      self.bn = bx.BatchNorm(C, momentum=0.5, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.linear(x))

  net = Net(nnx.Rngs(0))
  x = _data((N, 3), 9)
  assert net.bn.use_running_average is False  # flax's default: training
  z = np.asarray(net.linear(x), np.float64)
  net(x)  # a training step updates the statistics
  mean = 0.5 * z.mean(0)
  var = 0.5 + 0.5 * z.var(0)
  _close(net.bn.mean[...], mean, "EMA mean")
  _close(net.bn.var[...], var, "EMA var")
  net.eval()
  assert net.bn.use_running_average is True
  y_eval = net(x)
  want = (z - mean) / np.sqrt(var + 1e-5)
  _close(y_eval, want, "eval output")
  _close(net.bn.mean[...], mean, "eval leaves mean")
  train_view = nnx.view(net, use_running_average=False)
  assert train_view.bn.use_running_average is False
  assert net.bn.use_running_average is True
  net.train()
  assert net.bn.use_running_average is False
  _close(net.bn(net.linear(x), use_running_average=True), want,
         "call argument takes precedence")
  bare = bx.BatchNorm(C, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use_running_average"):
    bare(x[:, :C] if x.shape[1] >= C else jnp.ones((N, C)))


@pytest.mark.parametrize("ours,theirs", [
    (bx.BatchNorm, nnx.BatchNorm), (bx.LayerNorm, nnx.LayerNorm),
    (bx.GroupNorm, nnx.GroupNorm)])
def test_constructor_signature_and_variables_are_flax_nnx(ours, theirs):
  """flax.nnx's parameters, in order, with the same defaults; the same
  variable names and types; bn_jax's extras only after them."""
  def params(cls):
    return list(inspect.signature(cls.__init__).parameters.values())[1:]

  flax_params, our_params = params(theirs), params(ours)
  for theirs_p, ours_p in zip(flax_params, our_params):
    assert ours_p.name == theirs_p.name
    assert ours_p.kind == theirs_p.kind
    if ours_p.name not in ("bias_init", "scale_init", "promote_dtype"):
      assert ours_p.default == theirs_p.default, ours_p.name
  assert len(our_params) >= len(flax_params)
  kwargs = {"num_groups": 2} if theirs is nnx.GroupNorm else {}
  a, b = ours(C, rngs=nnx.Rngs(0), **kwargs), theirs(C, rngs=nnx.Rngs(0),
                                                      **kwargs)
  types = lambda m: {str(k): type(v).__name__ for k, v in
                     nnx.to_flat_state(nnx.state(m))}
  assert types(a) == types(b)


def test_state_round_trips_with_flax_nnx_batch_norm():
  """A checkpoint (pure-dict state, and orbax) of a model using
  nnx.BatchNorm restores into the same model built with bn_jax.nnx.BatchNorm
  and back; the restored model computes what the original's variables
  imply."""
  import orbax.checkpoint as ocp

  class Net(nnx.Module):

    def __init__(self, norm_cls, rngs):
      self.linear = nnx.Linear(3, C, rngs=rngs)
      self.bn = norm_cls(C, momentum=0.5, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.linear(x))

  x = _data((N, 3), 11)
  theirs = Net(nnx.BatchNorm, nnx.Rngs(1))
  for _ in range(2):
    theirs(x)  # non-trivial statistics
  theirs.eval()
  pure = nnx.to_pure_dict(nnx.state(theirs))
  ours = Net(bx.BatchNorm, nnx.Rngs(2))
  nnx.replace_by_pure_dict(state := nnx.state(ours), pure)
  nnx.update(ours, state)
  ours.eval()
  _close(ours(x), theirs(x), "restored (pure dict) eval output")
  # Back: train ours one step, restore into flax's through orbax.
  ours.train()
  ours(x)
  ours.eval()
  with __import__("tempfile").TemporaryDirectory() as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(f"{tmp}/ckpt", nnx.state(ours))
    checkpointer.wait_until_finished()
    back = Net(nnx.BatchNorm, nnx.Rngs(3))
    graphdef, abstract = nnx.split(back)
    restored = checkpointer.restore(f"{tmp}/ckpt", abstract)
    back = nnx.merge(graphdef, restored)
  back.eval()
  _close(back(x), ours(x), "restored (orbax) eval output")
  _close(back.bn.var[...], ours.bn.var[...], "restored var")


def test_bad_input_raises_naming_the_argument():
  with pytest.raises(TypeError, match="num_features"):
    bx.BatchNorm(0, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="num_features"):
    bx.LayerNorm(2.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_groups=3 must divide"):
    bx.GroupNorm(8, num_groups=3, rngs=nnx.Rngs(0))
  bn = bx.BatchNorm(C, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="state.mean has shape"):
    bn(jnp.ones((N, C + 1)))
  with pytest.raises(ValueError, match="1 value per feature"):
    bn(jnp.ones((1, C)))
  with pytest.raises(ValueError, match="ghost_batch_size=3 must divide"):
    bx.BatchNorm(C, ghost_batch_size=3, rngs=nnx.Rngs(0))(jnp.ones((N, C)))
  with pytest.raises(ValueError, match="momentum must be in"):
    bx.BatchNorm(C, momentum=1.0, rngs=nnx.Rngs(0))(_data((N, C), 1))
  noisy = bx.NoisyBatchNorm(C, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="noise_form must be one of"):
    bx.NoisyBatchNorm(C, noise_form="scale", rngs=nnx.Rngs(0))(_data((N, C), 1))
  with pytest.raises(TypeError, match="rngs"):
    noisy(_data((N, C), 1), rngs="not a key")
  with pytest.raises(ValueError, match="mask has shape"):
    bn(_data((N, C), 1), mask=jnp.ones((N + 1, 1), bool))
  with pytest.raises(TypeError, match="rngs"):
    bx.NoisyBatchNorm(C, rngs=jax.random.key(0))
