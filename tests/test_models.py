"""Tests of bn_jax.models: every model with every normalization.

Cost control (2 shared CPU cores): the model x norm matrix is checked by
tracing (``jax.eval_shape``: shapes, dtypes, parameter trees, sown
activations, gradients' structure; no XLA compilation) -- every norm on the
MLP and ResNet-18, every model with none, BN and CBN; the numerics run
(one jit each, compiled without XLA optimizations) on tiny blocks for every
norm and on the models with BN.
"""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax.core.cross_iteration_batch_norm import CBNState
from bn_jax import nn as bn_jax_nn
from bn_jax.models import MODELS, NORMS, create_model, norms
from bn_jax.models.norms import ConvNorm
from bn_jax.models.resnet import BasicBlock, CifarResNet

NUM_CLASSES = 5
BATCH = 4
# norm_kwargs that make the tiny test widths valid and cheap.
TINY_NORM_KWARGS = {
    'gn': {'num_groups': 2},
    'ghost': {'ghost_batch_size': 2},
    'cbn': {'window': 3},
    'naive_cbn': {'window': 3},
    'lp': {'p': 1},
}
# Tiny versions of every model (all accept NHWC images).
TINY_MODELS = {
    'mlp': dict(hidden=(6, 6, 6)),
    'vgg': dict(variant='vgg11', width_multiplier=1 / 16),
    'resnet20': dict(width=2),
    'resnet18': dict(width=2),
    'deep_linear': dict(depth=3, width=4),
}
TINY_IMAGE = (BATCH, 4, 4, 3)
# Number of sown nonlinearity inputs of the tiny models.
NUM_PREACTS = {'mlp': 3, 'vgg': 8, 'resnet20': 1 + 2 * 9,
               'resnet18': 1 + 2 * 8, 'deep_linear': 2}
STATEFUL_NORMS = ('bn', 'cbn', 'naive_cbn', 'brn', 'noisy_bn', 'lp', 'frozen',
                  'ghost')
CBN_NORMS = ('cbn', 'naive_cbn')  # ConvCBN/DenseCBN blocks, named 'cbn'
RNGS_INIT = {'params': jax.random.key(0), 'noise': jax.random.key(1)}
# XLA's optimizations cost 3-4x the compile time of these tiny graphs and buy
# nothing here.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def normal(seed, shape, loc=0.0, scale=1.0):
  """float32 N(loc, scale^2) test inputs from NumPy (jax.random.normal
  compiles a sampler for every new shape: ~0.2-1 s each on a CPU)."""
  rng = np.random.default_rng(seed)
  return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def run_fast(fn, *args):
  """fn(*args) under one jit compiled without XLA optimizations."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def tiny_model(name, norm, dtype=jnp.float32):
  return create_model(name, num_classes=NUM_CLASSES, norm=norm,
                      norm_kwargs=TINY_NORM_KWARGS.get(norm), dtype=dtype,
                      **TINY_MODELS[name])


def full_step(model, x, key=jax.random.key(2)):
  """init, train-mode apply + gradient, eval-mode apply (the usage contract)."""
  variables = model.init(RNGS_INIT, x, train=False)

  def loss_fn(params):
    logits, updates = model.apply(
        {**variables, 'params': params}, x, train=True,
        mutable=['batch_stats', 'intermediates'], rngs={'noise': key})
    return jnp.mean(logits.astype(jnp.float32) ** 2), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(variables['params'])
  new_variables = dict(variables)
  if 'batch_stats' in updates:
    new_variables['batch_stats'] = updates['batch_stats']
  eval_logits = model.apply(new_variables, x, train=False)
  return dict(variables=variables, loss=loss, logits=logits, updates=updates,
              grads=grads, eval_logits=eval_logits)


def kernel_nodes(tree, path=()):
  """(path, dict) of every parameter dict that holds a 'kernel'."""
  if not isinstance(tree, dict):
    return []
  found = [(path, tree)] if 'kernel' in tree else []
  for key, sub in tree.items():
    if isinstance(sub, dict):
      found += kernel_nodes(sub, path + (key,))
  return found


def get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def check_param_tree(params, norm):
  """The bias rule: Conv/Dense before a norm have no bias; 'none' keeps it."""
  nodes = kernel_nodes(params)
  assert nodes
  for path, node in nodes:
    if path[-1] == 'head' or norm == 'none':
      assert set(node) == {'kernel', 'bias'}, (path, set(node))
      continue
    if norm in CBN_NORMS:
      assert path[-1] == 'cbn', path
      assert set(node) == {'kernel', 'scale', 'bias'}, (path, set(node))
      continue
    assert path[-1] in ('conv', 'dense'), path
    assert set(node) == {'kernel'}, (path, set(node))  # no bias
    norm_node = get(params, path[:-1])['norm']
    assert set(norm_node) == {'scale', 'bias'}, (path, set(norm_node))
  if norm == 'none':
    flat = flax.traverse_util.flatten_dict(params)
    assert not any('norm' in k for k in flat)


def count_preacts(intermediates):
  return sum(len(v) for k, v in flax.traverse_util.flatten_dict(
      intermediates).items() if k[-1] == 'preact')


# --------------------------------------------------------------------------
# The model x norm matrix, traced.


# Every norm module class of bn_jax.nn a model may build.
_ALL_NORM_CLASSES = tuple({c for n in NORMS for c in norms.norm_module_classes(
    n)})


def recording_norm_calls(calls):
  """A flax method interceptor appending, for every call of a norm module,
  (its path, the module, the input, the output) to ``calls``."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (isinstance(context.module, _ALL_NORM_CLASSES) and
        context.method_name == '__call__'):
      calls.append((tuple(context.module.scope.path), context.module,
                    args[0], out))
    return out
  return flax.linen.intercept_methods(interceptor)


# The model x norm matrix, traced. A model places its norms through the
# shared ConvNorm / DenseNorm (or its ConvCBN / DenseCBN blocks for CBN),
# whatever the norm; a norm's module, kwargs and statistics are the same in
# every model. So every norm is traced on the models that place the most
# kinds of norm -- the MLP (dense layers) and ResNet-18 (convolutions and
# option-B projection shortcuts, which carry a norm; ResNet-20 is the same
# class with parameter-free option-A shortcuts) -- and every other model with
# 'none' (the bias rule), 'bn' and 'cbn' (its own blocks). Tracing is
# Python-bound (~1.5 s a pair): 31 pairs instead of all 55.
_NORM_CARRIERS = ('mlp', 'resnet18')
_TRACED_PAIRS = ([(m, n) for m in _NORM_CARRIERS for n in NORMS] +
                 [(m, n) for m in MODELS if m not in _NORM_CARRIERS
                  for n in ('none', 'bn', 'cbn')])


def test_traced_pairs_cover_every_model_and_norm():
  assert {m for m, _ in _TRACED_PAIRS} == set(MODELS)
  for model in _NORM_CARRIERS:
    assert {n for m, n in _TRACED_PAIRS if m == model} == set(NORMS)


@pytest.mark.parametrize('name,norm', _TRACED_PAIRS)
def test_model_and_norm_traced(name, norm):
  """The model x norm matrix, abstractly (jax.eval_shape: no compilation):
  the parameter tree (the bias rule), gradients for every parameter, one
  sown pre-activation per nonlinearity, and the wiring of the norm into
  every layer, each a property a wrong model breaks:

  - every Conv/Dense layer but the head calls exactly one module of the named
    norm ('ln' on a conv is GroupNorm with one group), in init, training and
    evaluation, with the norm_kwargs given, over the channels axis of the
    layer's output (its input's last dimension is the layer's features);
  - training normalizes with batch statistics (use_running_average=False),
    init and evaluation with the running ones (True);
  - the norms with running statistics keep them per layer, one value per
    channel, and training returns an update of every one of them.

  (Their numerics, executed: test_every_norm_executes; per model with BN:
  test_every_model_executes_with_bn; training: tests/test_training.py.)
  """
  model = tiny_model(name, norm)
  x = jax.ShapeDtypeStruct(TINY_IMAGE, jnp.float32)
  creation_order = []
  calls = []

  def traced(x):
    with recording_norm_calls(calls):
      out = full_step(model, x)
    # Inside the trace the params dict still has Flax's creation order.
    creation_order.extend(out['variables']['params'])
    return out

  out = jax.eval_shape(traced, x)
  assert tuple(creation_order) == model.layer_names()
  for key in ('logits', 'eval_logits'):
    assert out[key].shape == (BATCH, NUM_CLASSES)
    assert out[key].dtype == jnp.float32
  params = out['variables']['params']
  assert (jax.tree.structure(out['grads']) == jax.tree.structure(params))
  check_param_tree(params, norm)
  # One sown pre-activation per nonlinearity.
  assert count_preacts(out['updates']['intermediates']) == NUM_PREACTS[name]
  has_stats = 'batch_stats' in out['variables']
  assert has_stats == (norm in STATEFUL_NORMS)

  # The norm of every layer: where it is, what it is, how it is called.
  layers = {path: node['kernel'].shape[-1]
            for path, node in kernel_nodes(params) if path[-1] != 'head'}
  norm_paths = {(p if norm in CBN_NORMS else p[:-1] + ('norm',)): features
                for p, features in layers.items()}
  if norm == 'none':
    assert not calls
    return
  # init, the training forward (traced once by value_and_grad), evaluation.
  assert len(calls) == 3 * len(norm_paths), (len(calls), len(norm_paths))
  phases = {'init': calls[:len(norm_paths)],
            'train': calls[len(norm_paths):2 * len(norm_paths)],
            'eval': calls[2 * len(norm_paths):]}
  classes = norms.norm_module_classes(norm)
  for phase, phase_calls in phases.items():
    assert {call[0] for call in phase_calls} == set(norm_paths), phase
    for path, module, inputs, _ in phase_calls:
      if norm == 'ln' and isinstance(module, bn_jax_nn.GroupNorm):
        assert module.num_groups == 1, path  # LN of a conv layer
      else:
        assert isinstance(module, classes), (path, type(module))
      for key, value in TINY_NORM_KWARGS.get(norm, {}).items():
        assert getattr(module, key) == value, (path, key)
      if norm == 'naive_cbn':
        assert module.rho == 0.0, path
      if norm not in CBN_NORMS:  # a CBN module's input is the layer's input
        assert inputs.shape[-1] == norm_paths[path], (path, inputs.shape)
        assert getattr(module, 'axis', -1) in (-1, inputs.ndim - 1), path
      if hasattr(module, 'use_running_average'):
        assert module.use_running_average == (phase != 'train'), (
            phase, path)
  if has_stats:
    stats = out['variables']['batch_stats']
    updated = out['updates']['batch_stats']
    assert jax.tree.structure(updated) == jax.tree.structure(stats)
    stats_paths = {k[:-1] for k in flax.traverse_util.flatten_dict(stats)}
    assert stats_paths == set(norm_paths), (stats_paths, set(norm_paths))
    for path, features in norm_paths.items():
      layer_stats = get(stats, path)
      if norm in CBN_NORMS:
        assert set(layer_stats) == set(CBNState._fields), path
        kernel_shape = get(params, path)['kernel'].shape
        window = TINY_NORM_KWARGS[norm]['window']
        assert layer_stats['window_weight'].shape == (
            window - 1,) + kernel_shape
        assert layer_stats['mean'].shape == (features,), path
      else:
        for key, leaf in layer_stats.items():
          if jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.shape == ():
            continue  # Batch Renorm's step counter (its r/d schedule)
          assert leaf.shape == (features,), (path, key, leaf.shape)


@pytest.mark.parametrize('name', MODELS)
def test_noisy_bn_needs_noise_rng(name):
  model = tiny_model(name, 'noisy_bn')
  x = jnp.zeros(TINY_IMAGE)
  variables = jax.eval_shape(
      lambda x: model.init({'params': jax.random.key(0)}, x, train=False), x)
  with pytest.raises(ValueError, match='noise'):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True,
                                            mutable=['batch_stats']),
                   variables, x)


# --------------------------------------------------------------------------
# Executed: every norm through a dense model and a conv block; every model.


def assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32))), leaf


def norm_probe(module, x, modules=None):
  """full_step plus the first sample's output when other samples change, and
  (in ``out['norm_io']``) the input and output of every norm module in a
  training-mode forward at init (the modules themselves: ``modules``)."""
  out = full_step(module, x)
  calls = []
  with recording_norm_calls(calls):
    module.apply(out['variables'], x, train=True, mutable=['batch_stats'],
                 rngs={'noise': jax.random.key(0)})
  out['norm_io'] = [(inputs, outputs) for _, _, inputs, outputs in calls]
  if modules is not None:
    modules.append([m for _, m, _, _ in calls])
  variables = dict(out['variables'])
  if 'batch_stats' in out['updates']:
    variables['batch_stats'] = out['updates']['batch_stats']
  inputs = {
      'x': x,
      # Another sample of the same ghost batch (size 2) changes.
      'same_group': x.at[1].set(-2.0 * x[1] + 3.0),
      # Only samples of the other ghost batch change.
      'other_group': x.at[2:].set(-2.0 * x[2:] + 3.0),
  }
  out['eval_first'] = {k: module.apply(variables, v, train=False)[0]
                       for k, v in inputs.items()}
  out['train_first'] = {
      k: module.apply(out['variables'], v, train=True,
                      mutable=['batch_stats'],
                      rngs={'noise': jax.random.key(0)})[0][0]
      for k, v in inputs.items()}
  return out


def _normalized(x, axes, eps):
  """NumPy float64 (x - mean) / sqrt(var + eps) over ``axes``."""
  mean = x.mean(axes, keepdims=True)
  return (x - mean) / np.sqrt(x.var(axes, keepdims=True) + eps)


def check_norm_outputs(norm_modules, norm_io):
  """Each norm module's training-mode output at init (scale 1, bias 0, the
  initial running statistics) against its definition in NumPy float64,
  from the module's own input (channels last):

  BatchNorm / BatchRenorm (r = 1, d = 0 at step 0): batch statistics over
  every axis but the channels, per ghost batch with ghost_batch_size;
  GroupNorm: per sample and group of channels; LayerNorm: per sample over the
  features; FrozenBatchNorm: the initial statistics (mean 0, var 1);
  LpNorm: (x - mean) / sqrt(n^2 + eps), n the mean l_p distance to the mean
  (p = 1, 2; l_inf: the max). NoisyBatchNorm draws noise (its distribution
  is tested in tests/test_noisy_lp_frozen.py): only finiteness here. CBN (the module
  owns the conv/dense, so its input is the layer's input): with an empty
  window, every channel of the output has batch mean 0 and variance
  v / (v + eps) <= 1.

  Tolerance: the float32 statistics of <= 16 values and one normalization
  are exact to ~20 eps_f32 = 2.4e-6 relative to the largest |y|: 1e-4 of it
  is > 10x that; normalizing over the wrong axes or with the running
  statistics is off by O(1).
  """
  for module, (x, y) in zip(norm_modules, norm_io):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    eps = module.epsilon
    channels_last = tuple(range(x.ndim - 1))
    kind = type(module).__name__
    if kind in ('ConvCBN', 'DenseCBN'):
      axes = tuple(range(y.ndim - 1))
      np.testing.assert_allclose(y.mean(axes), 0.0, atol=1e-4)
      var = y.var(axes)
      assert np.all(var <= 1 + 1e-4) and np.all(var >= 0.9), var
      continue
    if kind == 'NoisyBatchNorm':
      assert np.all(np.isfinite(y))
      continue
    if kind in ('BatchNorm', 'BatchRenorm'):
      ghost = getattr(module, 'ghost_batch_size', None) or x.shape[0]
      groups = x.reshape((x.shape[0] // ghost, ghost) + x.shape[1:])
      expected = _normalized(groups, tuple(range(1, groups.ndim - 1)), eps)
      expected = expected.reshape(x.shape)
    elif kind == 'GroupNorm':
      g = module.num_groups
      grouped = x.reshape(x.shape[:-1] + (g, x.shape[-1] // g))
      axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
      expected = _normalized(grouped, axes, eps).reshape(x.shape)
    elif kind == 'LayerNorm':
      expected = _normalized(x, (x.ndim - 1,), eps)
    elif kind == 'FrozenBatchNorm':
      expected = x / np.sqrt(1.0 + eps)
    elif kind == 'LpNorm':
      centred = x - x.mean(channels_last, keepdims=True)
      p = float(module.p)
      n = (np.abs(centred).max(channels_last, keepdims=True) if p == np.inf
           else (np.abs(centred) ** p).mean(channels_last, keepdims=True) ** (
               1 / p))
      expected = centred / np.sqrt(n ** 2 + eps)
    else:
      raise AssertionError(f'no reference for {kind}')
    scale = max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(y, expected, atol=1e-4 * scale, rtol=0,
                               err_msg=kind)


@pytest.mark.parametrize('norm', NORMS)
def test_every_norm_executes(norm):
  x = normal(3, (BATCH, 2, 2, 3), loc=1.0, scale=3.0)
  kwargs = TINY_NORM_KWARGS.get(norm)
  # Dense path, through create_model; conv path, one block.
  model = create_model('deep_linear', num_classes=NUM_CLASSES, norm=norm,
                       norm_kwargs=kwargs, depth=2, width=4)
  block = ConvNorm(4, (3, 3), norm=norm, norm_kwargs=kwargs)
  modules = []  # the norm modules of each, in call order (filled by tracing)
  outs = run_fast(lambda x: [norm_probe(m, x, modules)
                             for m in (model, block)], x)
  # deep_linear(depth=2) has one normalized hidden layer, the block one.
  for out, norm_modules, num_norms in zip(outs, modules, (1, 1)):
    assert len(out['norm_io']) == len(norm_modules) == (
        num_norms if norm != 'none' else 0)
    check_norm_outputs(norm_modules, out['norm_io'])
    assert out['logits'].shape[0] == BATCH
    assert_finite(out)
    grad_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(
        out['grads']))
    assert grad_norm > 0
    # Eval mode (use_running_average = not train): a sample's output does not
    # depend on the rest of the batch.
    first = out['eval_first']
    np.testing.assert_allclose(first['same_group'], first['x'], rtol=1e-5,
                               atol=1e-5)
    first = out['train_first']
    if norm in ('bn', 'ghost', 'brn', 'lp', 'cbn', 'naive_cbn', 'noisy_bn'):
      # Train mode normalizes with batch statistics: the other samples matter,
      # for ghost BN only those of the same ghost batch.
      assert not np.allclose(first['same_group'], first['x'], atol=1e-3)
      if norm == 'ghost':
        np.testing.assert_allclose(first['other_group'], first['x'],
                                   rtol=1e-5, atol=1e-5)
      else:
        assert not np.allclose(first['other_group'], first['x'], atol=1e-3)
    else:  # per-sample (or no) normalization
      np.testing.assert_allclose(first['same_group'], first['x'], rtol=1e-5,
                                 atol=1e-5)


# ResNet-20 and ResNet-18 are the CifarResNet class with 3x3 and 4x2 blocks;
# to save compile time it runs here with 2 stages of 1 block (stem, both
# block kinds, projection shortcut, pooling, head); the option-A shortcut runs
# in test_option_a_shortcut_matches_numpy, the full configurations are traced.
@pytest.mark.parametrize('name', ('mlp', 'vgg', 'cifar_resnet', 'deep_linear'))
def test_every_model_executes_with_bn(name):
  if name == 'cifar_resnet':
    model = CifarResNet(num_classes=NUM_CLASSES, stage_sizes=(1, 1), width=2,
                        shortcut='B', norm='bn')
  else:
    model = tiny_model(name, 'bn')
  x = normal(4, TINY_IMAGE)

  def step(x):
    out = full_step(model, x)
    # One SGD step, then eval with the updated statistics.
    params = jax.tree.map(lambda p, g: p - 0.1 * g,
                          out['variables']['params'], out['grads'])
    out['after_step'] = model.apply(
        {'params': params, 'batch_stats': out['updates']['batch_stats']}, x,
        train=False)
    return out

  out = run_fast(step, x)
  assert out['logits'].shape == (BATCH, NUM_CLASSES)
  assert out['eval_logits'].shape == (BATCH, NUM_CLASSES)
  assert_finite(out)
  # Train mode updated the running mean of the BN layers. (In the deep linear
  # net only the first one: the next layers' inputs are linear maps of a BN
  # output, whose batch mean is 0, the initial running mean.)
  old = flax.traverse_util.flatten_dict(out['variables']['batch_stats'])
  new = flax.traverse_util.flatten_dict(out['updates']['batch_stats'])
  assert set(old) == set(new)
  means = [key for key in old if key[-1] == 'mean']
  if name == 'deep_linear':
    means = means[:1]
  for key in means:
    assert not np.allclose(old[key], new[key]), key
  assert not np.allclose(out['after_step'], out['eval_logits'])


# --------------------------------------------------------------------------
# Architecture details against independent formulas / NumPy.


def conv_count(k, c_in, c_out, bias=False):
  return k * k * c_in * c_out + (c_out if bias else 0)


def num_params(model, image=(1, 32, 32, 3)):
  shapes = jax.eval_shape(
      lambda: model.init(RNGS_INIT, jnp.zeros(image), train=False))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes['params']))


def test_resnet20_parameter_count():
  # He et al. 2016 (CIFAR, option A): 3x3 stem 3->16, 3 stages x 3 blocks x 2
  # convs at 16/32/64 channels, BN (2 params/channel) after every conv,
  # parameter-free shortcuts, Dense 64->10.
  total = conv_count(3, 3, 16) + 2 * 16
  c_in = 16
  for c in (16, 32, 64):
    for _ in range(3):
      total += conv_count(3, c_in, c) + 2 * c + conv_count(3, c, c) + 2 * c
      c_in = c
  total += 64 * 10 + 10
  assert total == 269_722  # "0.27M" in the paper's Table 6
  assert num_params(create_model('resnet20', num_classes=10)) == total


def test_resnet18_parameter_count():
  # CIFAR ResNet-18: 3x3 stem 3->64, stages [2, 2, 2, 2] at 64..512, 1x1
  # conv + BN projection where the shape changes, Dense 512->10.
  total = conv_count(3, 3, 64) + 2 * 64
  c_in = 64
  for stage, c in enumerate((64, 128, 256, 512)):
    for block in range(2):
      total += conv_count(3, c_in, c) + 2 * c + conv_count(3, c, c) + 2 * c
      if block == 0 and stage > 0:
        total += conv_count(1, c_in, c) + 2 * c
      c_in = c
  total += 512 * 10 + 10
  assert total == 11_173_962  # the commonly quoted 11.17M
  assert num_params(create_model('resnet18', num_classes=10)) == total


def test_vgg11_parameter_count():
  # VGG-11 (configuration A) convs with BN, no conv bias, Dense 512->10.
  # kuangliu/pytorch-cifar's VGG('VGG11') has 9,231,114 parameters; it keeps
  # the (redundant) conv biases, 2,752 of them.
  channels = (64, 128, 256, 256, 512, 512, 512, 512)
  total, c_in = 0, 3
  for c in channels:
    total += conv_count(3, c_in, c) + 2 * c
    c_in = c
  total += 512 * 10 + 10
  assert total + sum(channels) == 9_231_114
  assert num_params(create_model('vgg', num_classes=10)) == total
  # Without a norm the conv biases come back and the BN parameters go.
  assert num_params(create_model('vgg', num_classes=10, norm='none')) == (
      total - 2 * sum(channels) + sum(channels))


def test_mlp_structure_and_init():
  model = create_model('mlp', num_classes=10, norm='bn')
  x = jnp.zeros((2, 28, 28, 1))
  assert model.layer_names() == ('hidden_0', 'hidden_1', 'hidden_2', 'head')
  variables, (_, state) = run_fast(
      lambda x: (model.init(RNGS_INIT, x, train=False),
                 model.apply(model.init(RNGS_INIT, x, train=False), x,
                             train=False, mutable=['intermediates'])), x)
  params = variables['params']
  assert params['hidden_0']['dense']['kernel'].shape == (784, 100)
  assert params['head']['kernel'].shape == (100, 10)
  # Small Gaussian init with the documented std (0.1): sample std of 78,400
  # draws is within 2% (its standard error is 0.25%).
  kernel = np.asarray(params['hidden_0']['dense']['kernel'], np.float64)
  assert abs(kernel.std() / 0.1 - 1) < 0.02
  assert abs(kernel.mean()) < 0.003
  # The input of every sigmoid is sown under its layer.
  preacts = state['intermediates']
  assert [list(preacts[f'hidden_{i}']) for i in range(3)] == [['preact']] * 3
  assert preacts['hidden_2']['preact'][0].shape == (2, 100)
  custom = create_model('mlp', num_classes=3, hidden=[7, 5],
                        activation='relu', kernel_init_std=0.5, norm='none')
  p = jax.eval_shape(lambda: custom.init(RNGS_INIT, jnp.zeros((1, 4)),
                                         train=False))['params']
  assert [p[k]['dense']['kernel'].shape for k in ('hidden_0', 'hidden_1')] \
      == [(4, 7), (7, 5)]


def test_bfloat16_activations_float32_params_and_logits():
  for name in ('mlp', 'resnet20'):
    model = tiny_model(name, 'bn', dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct(TINY_IMAGE, jnp.float32)
    out = jax.eval_shape(lambda x: full_step(model, x), x)
    assert out['logits'].dtype == jnp.float32
    assert out['eval_logits'].dtype == jnp.float32
    for collection in ('params', 'batch_stats'):
      dtypes = {l.dtype for l in jax.tree.leaves(out['variables'][collection])}
      assert dtypes == {jnp.dtype(jnp.float32)}, (collection, dtypes)
    dtypes = {l.dtype for l in jax.tree.leaves(out['updates']['batch_stats'])}
    assert dtypes == {jnp.dtype(jnp.float32)}
    preacts = jax.tree.leaves(out['updates']['intermediates'])
    assert preacts and {p.dtype for p in preacts} == {jnp.dtype(jnp.bfloat16)}
  # And it runs: finite float32 logits.
  model = tiny_model('mlp', 'bn', dtype=jnp.bfloat16)
  out = run_fast(lambda x: full_step(model, x),
                 normal(5, TINY_IMAGE))
  assert out['logits'].dtype == jnp.float32
  assert_finite(out)


def _np_mlp_forward(params, x, norm, train, batch_stats=None, eps=1e-5):
  """The MLP of bn_jax.models.mlp in NumPy float64: flatten -> [Dense ->
  norm -> sigmoid] x L -> Dense, with BN's batch statistics (train) or the
  running ones (eval); written from the BN paper, not from the code."""
  h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  for i in range(len([k for k in params if k.startswith('hidden_')])):
    layer = params[f'hidden_{i}']
    h = h @ np.asarray(layer['dense']['kernel'], np.float64)
    if norm == 'none':
      h = h + np.asarray(layer['dense']['bias'], np.float64)
    else:
      if train:
        mean, var = h.mean(0), h.var(0)
      else:
        stats = batch_stats[f'hidden_{i}']['norm']
        mean, var = (np.asarray(stats[k], np.float64) for k in ('mean', 'var'))
      h = ((h - mean) / np.sqrt(var + eps) *
           np.asarray(layer['norm']['scale'], np.float64) +
           np.asarray(layer['norm']['bias'], np.float64))
    h = 1.0 / (1.0 + np.exp(-h))
  return (h @ np.asarray(params['head']['kernel'], np.float64) +
          np.asarray(params['head']['bias'], np.float64))


# Tolerances relative to the largest logit. float32: ~16 roundings of 2^-24
# (6e-8 each) through 4 layers, amplified by BN's division by batch stds of
# ~0.3: measured 1.6e-7 (SSE4.2), so 1e-5 leaves >= 60x. bfloat16 (unit
# roundoff 2^-8 = 3.9e-3): the same ~16 roundings, measured 1.9% with BN in
# train mode (0.3% without a norm); 0.2 is >= 10x that -- loose, but what it
# pins (the bf16 model computes the float32 model's function: the same
# layers, statistics and parameters) fails by O(1) when broken.
_MLP_LOGIT_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 0.2}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16],
                         ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('norm', ['none', 'bn'])
def test_mlp_logits_match_numpy_forward(norm, dtype):
  """Train- and eval-mode logits of the MLP (sigmoid, BN or none) equal a
  NumPy float64 forward pass with the same parameters, within the rounding
  of the activation dtype (relative to the largest logit)."""
  model = create_model('mlp', num_classes=NUM_CLASSES, norm=norm,
                       hidden=(6, 5, 4), dtype=dtype)
  x = normal(6, (8, 3, 2, 1), loc=1.0, scale=2.0)
  variables = model.init(RNGS_INIT, x, train=False)
  # Non-trivial scale/bias and running statistics (init: 1, 0, 0, 1).
  variables = jax.tree.map(lambda a: a + 0.3 * jnp.sin(
      jnp.arange(a.size, dtype=a.dtype).reshape(a.shape) + 1.0), variables)
  params = variables['params']
  logits, updates = model.apply(variables, x, train=True,
                                mutable=['batch_stats'])
  eval_logits = model.apply(variables, x, train=False)
  assert logits.dtype == eval_logits.dtype == jnp.float32
  for got, train in ((logits, True), (eval_logits, False)):
    ref = _np_mlp_forward(params, x, norm, train,
                          variables.get('batch_stats'))
    err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(
        np.abs(ref))
    assert err <= _MLP_LOGIT_TOL[dtype], (train, err)
  if norm == 'bn':  # the running statistics moved by the batch's (flax EMA)
    h = x.reshape(8, -1).astype(np.float64) @ np.asarray(
        params['hidden_0']['dense']['kernel'], np.float64)
    old = variables['batch_stats']['hidden_0']['norm']
    new = updates['batch_stats']['hidden_0']['norm']
    np.testing.assert_allclose(
        new['mean'], 0.99 * np.asarray(old['mean']) + 0.01 * h.mean(0),
        rtol=_MLP_LOGIT_TOL[dtype], atol=1e-6)


def test_option_a_shortcut_matches_numpy():
  # With zero conv kernels and no norm the block is relu(shortcut(x)); option
  # A subsamples with stride 2 and zero-pads the new channels half/half.
  block = BasicBlock(8, strides=2, shortcut='A', norm='none')
  x = normal(6, (2, 4, 4, 4))
  variables = jax.eval_shape(
      lambda: block.init(jax.random.key(0), x, train=False))
  zero = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), variables)
  y = np.asarray(run_fast(lambda v, x: block.apply(v, x, train=False), zero,
                          x))
  xs = np.asarray(x)[:, ::2, ::2, :]
  expected = np.maximum(np.concatenate(
      [np.zeros((2, 2, 2, 2)), xs, np.zeros((2, 2, 2, 2))], axis=-1), 0)
  np.testing.assert_allclose(y, expected, rtol=0, atol=0)
  # Option B projects instead: 1x1 conv + norm.
  block_b = BasicBlock(8, strides=2, shortcut='B', norm='bn')
  params = jax.eval_shape(
      lambda: block_b.init(jax.random.key(0), x, train=False))['params']
  assert params['shortcut']['conv']['kernel'].shape == (1, 1, 4, 8)


def test_conv_layer_norm_normalizes_each_sample_over_hwc():
  x = normal(7, (3, 3, 3, 2))
  block = ConvNorm(4, (3, 3), norm='ln')
  variables, y = run_fast(lambda x: (
      block.init(jax.random.key(0), x, train=True),
      block.apply(block.init(jax.random.key(0), x, train=True), x,
                  train=True)), x)
  y = np.asarray(y, np.float64)
  # Reference: the conv output in float64, normalized per sample over H,W,C.
  kernel = np.asarray(variables['params']['conv']['kernel'], np.float64)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = np.zeros((3, 3, 3, 4))
  for i in range(3):
    for j in range(3):
      conv[:, i, j, :] = np.einsum('nhwc,hwcd->nd',
                                   xp[:, i:i + 3, j:j + 3, :], kernel)
  mean = conv.mean(axis=(1, 2, 3), keepdims=True)
  var = conv.var(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(y, (conv - mean) / np.sqrt(var + 1e-6),
                             rtol=1e-4, atol=1e-4)
  assert variables['params']['norm']['scale'].shape == (4,)


def test_group_norm_default_groups():
  assert [norms.default_num_groups(c) for c in (16, 64, 100, 512, 48, 7)] == \
      [16, 32, 25, 32, 24, 7]
  # 6 channels -> 6 groups: every channel normalized per sample over H, W.
  x = normal(8, (2, 3, 3, 2))
  block = ConvNorm(6, (1, 1), norm='gn')
  y = run_fast(lambda x: block.apply(
      block.init(jax.random.key(0), x, train=True), x, train=True), x)
  y = np.asarray(y, np.float64)
  np.testing.assert_allclose(y.mean(axis=(1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 2)), 1, atol=1e-3)


def test_sync_bn_axis_name_reaches_the_norm():
  # Data parallel over 4 devices with axis_name: every device's output equals
  # the single-device output on the whole batch (same batch statistics).
  model = create_model('deep_linear', num_classes=3, norm='bn', depth=2,
                       width=4, axis_name='batch')
  single = create_model('deep_linear', num_classes=3, norm='bn', depth=2,
                        width=4)
  x = normal(9, (8, 5), loc=1.0, scale=2.0)
  variables = single.init(jax.random.key(0), x, train=False)
  expected, updates = single.apply(variables, x, train=True,
                                   mutable=['batch_stats'])
  mapped = jax.pmap(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
      axis_name='batch', in_axes=(None, 0), devices=jax.devices()[:4])
  got, got_updates = mapped(variables, x.reshape(4, 2, 5))
  np.testing.assert_allclose(np.asarray(got).reshape(8, 3), expected,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      got_updates['batch_stats']['layer_0']['norm']['var'][0],
      updates['batch_stats']['layer_0']['norm']['var'], rtol=1e-5)


# --------------------------------------------------------------------------
# Errors, raised in create_model before any compute.


def test_unknown_model():
  with pytest.raises(ValueError, match=r"'resnet50'.*'mlp'.*'deep_linear'"):
    create_model('resnet50', num_classes=10)


def test_unknown_norm():
  with pytest.raises(ValueError, match=r"'batchnorm'.*'none'.*'ghost'"):
    create_model('mlp', num_classes=10, norm='batchnorm')


def test_unknown_norm_kwargs_key():
  with pytest.raises(ValueError, match=r"'groups'.*'num_groups'"):
    create_model('resnet20', num_classes=10, norm='gn',
                 norm_kwargs={'groups': 8})
  with pytest.raises(ValueError, match=r"'windw'.*'window'"):
    create_model('resnet20', num_classes=10, norm='cbn',
                 norm_kwargs={'windw': 8})
  with pytest.raises(ValueError, match=r"'axis_name'.*set by the model"):
    create_model('mlp', num_classes=10, norm='bn',
                 norm_kwargs={'axis_name': 'i'})
  with pytest.raises(ValueError, match=r"norm='none' takes no norm_kwargs"):
    create_model('mlp', num_classes=10, norm='none',
                 norm_kwargs={'momentum': 0.9})


def test_unknown_model_kwargs_and_values():
  with pytest.raises(ValueError, match=r"'depth'.*'mlp'"):
    create_model('mlp', num_classes=10, depth=3)
  with pytest.raises(ValueError, match=r"'vgg12'"):
    create_model('vgg', num_classes=10, variant='vgg12')
  with pytest.raises(ValueError, match=r"'swish'"):
    create_model('mlp', num_classes=10, activation='swish')
  with pytest.raises(ValueError, match=r"shortcut='C'"):
    create_model('resnet20', num_classes=10, shortcut='C')
  with pytest.raises(ValueError, match='num_classes'):
    create_model('mlp', num_classes=0)
  with pytest.raises(TypeError, match='dtype'):
    create_model('mlp', num_classes=10, dtype=jnp.int32)


def test_naive_cbn_is_cbn_without_compensation():
  """norm='naive_cbn' is Yao et al.'s baseline: CBN with rho=0 (past
  statistics used as stored). Over 4 training steps with moving weights its
  outputs and running statistics equal norm='cbn' with rho=0 exactly, and
  differ from compensated CBN's once the window holds past entries."""
  x = normal(5, (4, 6), loc=1.0, scale=2.0)

  def run(norm, kwargs):
    model = create_model('deep_linear', num_classes=NUM_CLASSES, norm=norm,
                         norm_kwargs=kwargs, depth=2, width=4)
    # Jitted, as in training (op by op: ~120 small compilations).
    variables = jax.jit(model.init, static_argnames='train')(
        RNGS_INIT, x, train=False)
    train_apply = jax.jit(functools.partial(model.apply, train=True,
                                            mutable=['batch_stats']))
    params, stats, outs = variables['params'], variables['batch_stats'], []
    for step in range(4):
      y, upd = train_apply({'params': params, 'batch_stats': stats},
                           x * (1.0 + 0.3 * step))
      stats = upd['batch_stats']
      outs.append(np.asarray(y))
      # Move the weights, so compensation has something to do.
      params = jax.tree.map(lambda p: p * 1.1 + 0.01, params)
    return outs, stats

  kwargs = {'window': 3, 'burn_in': 0}
  naive, naive_stats = run('naive_cbn', kwargs)
  rho0, rho0_stats = run('cbn', {**kwargs, 'rho': 0.0})
  compensated, _ = run('cbn', kwargs)
  for a, b in zip(naive, rho0):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(naive_stats), jax.tree.leaves(rho0_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(naive[-1], compensated[-1], atol=1e-4)
