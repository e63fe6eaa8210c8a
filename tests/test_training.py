"""Tests of train.py and bn_jax.training: configs, schedules, the loop, exact
evaluation, data parallelism, divergence, mixed precision, hooks. (Resume:
tests/test_multistep.py, per input pipeline, and tests/test_train_cli.py.)

Everything runs on scikit-learn's digits (offline) or synthetic data with tiny
widths and a handful of steps.
"""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from bn_jax.training import (base_config, config_validation, input_pipeline,
                             optim, parallel, TrainingDiverged,
                             validate_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The train.py configs (configs/exp_*.py belong to experiments/ scripts).
CONFIG_FILES = [os.path.join(REPO, "configs", name + ".py") for name in (
    "default", "mnist_mlp", "cifar10_vgg", "cifar10_resnet20",
    "cifar10_resnet18", "deep_linear", "cifar10_small_batch_cbn",
    "digits_small_batch_cbn")]


def _load_module(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def digits():
  return input_pipeline.load_train_test(tiny_config())


def tiny_config(**overrides):
  c = base_config()
  c.dataset = "digits"
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict(dict(hidden=(8,)))
  c.norms = ("bn",)
  c.norm_kwargs = ml_collections.ConfigDict(
      dict(cbn=dict(window=2, burn_in=1)))
  c.batch_size = 8
  c.eval_batch_size = 64       # 355 test images: the last batch is padded
  c.num_train_steps = 4
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.log_every = 1
  c.progress_bar = False
  c.plots = False
  c.precise_bn_samples = 0
  for key, value in overrides.items():
    c[key] = value
  return c


def _tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(la, lb))


# ----------------------------------------------------------------- configs

def test_known_names_match_the_other_layers():
  from bn_jax import data, models
  assert set(config_validation.MODELS) == set(models.MODELS)
  assert set(config_validation.NORMS) == set(models.NORMS)
  assert set(config_validation.DATASETS) - {"synthetic_gaussian"} == set(
      data.DATASETS)


@pytest.mark.parametrize("path", CONFIG_FILES,
                         ids=[os.path.basename(p) for p in CONFIG_FILES])
def test_every_config_file_is_valid(path):
  config = _load_module("cfg_" + os.path.basename(path)[:-3], path).get_config()
  validate_config(config)
  assert config.keys() == base_config().keys()


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, "config.batch_size must be >= 1"),
    ("eval_batch_size", -3, "config.eval_batch_size"),
    ("norms", ("bn", "fancy"), "config.norms contains an unknown norm 'fancy'"),
    ("norms", (), "config.norms must name at least one"),
    ("model", "transformer", "config.model must be one of"),
    ("dataset", "imagenet", "config.dataset must be one of"),
    ("optimizer", "lamb", "config.optimizer must be one of"),
    ("schedule", "exp", "config.schedule must be one of"),
    ("learning_rate", 0.0, "config.learning_rate must be > 0"),
    ("momentum", 1.0, "config.momentum must be < 1"),
    ("num_train_steps", 0, "config.num_train_steps must be >= 1"),
    ("analysis", ("ics", "hessian"), "config.analysis contains an unknown"),
    ("analysis", ("ics",), "config.analysis_every must be >= 1"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be >= 1"),
    ("log_every", 0, "config.log_every must be >= 1"),
])
def test_bad_values_fail_naming_the_key(key, value, message):
  config = tiny_config()
  config[key] = value
  with pytest.raises((ValueError, TypeError), match=__import__("re").escape(
      message)):
    validate_config(config)


def test_bad_nested_values_fail_naming_the_key():
  config = tiny_config(norms=("cbn",))
  config.norm_kwargs.cbn.window = 0
  with pytest.raises(ValueError, match=r"config\.norm_kwargs\.cbn\.window"):
    validate_config(config)
  config = tiny_config()
  config.norm_kwargs.fancy = ml_collections.ConfigDict(dict(window=2))
  with pytest.raises(ValueError, match=r"config\.norm_kwargs\.fancy"):
    validate_config(config)
  config = tiny_config()
  config.model_kwargs.depth = 3       # an 'mlp' has no depth
  with pytest.raises(ValueError, match=r"config\.model_kwargs"):
    validate_config(config)
  config = tiny_config()
  config.batch_szie = 3               # a typo added by a config file
  with pytest.raises(ValueError, match=r"config\.batch_szie is not a known"):
    validate_config(config)
  config = tiny_config(data_parallel=True, batch_size=12)
  with pytest.raises(ValueError, match=r"config\.batch_size must be divisible "
                     r"by the 8 local devices"):
    validate_config(config)


def _parse_config_flags(argv):
  # config_flags defines the --config.<key> flags from the argv it is given
  # at declaration (sys.argv by default), as train.py's FLAGS do.
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", os.path.join(REPO, "configs", "default.py"), flag_values=fv,
      sys_argv=argv)
  fv(argv)
  return fv.config


def test_unknown_command_line_override_is_rejected():
  config = _parse_config_flags(
      ["prog", "--config.batch_size=4", "--config.model_kwargs.hidden=(5,6)"])
  assert config.batch_size == 4
  assert config.model_kwargs.hidden == (5, 6)
  with pytest.raises((AttributeError, flags.Error), match="batchsize"):
    _parse_config_flags(["prog", "--config.batchsize=4"])


# --------------------------------------------------------------- schedules

@pytest.mark.parametrize("schedule", ["constant", "cosine", "step", "linear"])
def test_learning_rate_schedules_match_closed_form(schedule):
  total, warmup, lr = 100, 10, 0.4
  config = tiny_config(schedule=schedule, warmup_steps=warmup,
                       learning_rate=lr, decay_boundaries=(0.5, 0.8),
                       decay_factor=0.1)
  fn = optim.create_learning_rate_fn(config, total)
  for t in [0, 5, 10, 11, 30, 49, 50, 79, 80, 99]:
    if t < warmup:
      expected = lr * t / warmup
    else:
      s, span = t - warmup, total - warmup
      expected = {
          "constant": lr,
          "cosine": 0.5 * lr * (1 + math.cos(math.pi * s / span)),
          "linear": lr * (1 - s / span),
          "step": lr * 0.1 ** ((t >= 50) + (t >= 80)),
      }[schedule]
    assert float(fn(t)) == pytest.approx(expected, rel=1e-5, abs=1e-7), t


def test_weight_decay_touches_kernels_only():
  params = {"dense": {"kernel": jnp.ones((2, 3))}, "norm": {"scale": jnp.ones(
      3), "bias": jnp.ones(3)}}
  config = tiny_config(optimizer="sgd", momentum=0.0, weight_decay=0.5,
                       learning_rate=0.1)
  tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config,
                                                                      10))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5)
  np.testing.assert_allclose(updates["norm"]["scale"], 0.0)
  np.testing.assert_allclose(updates["norm"]["bias"], 0.0)


# ------------------------------------------------ every model x every norm

_MODEL_KWARGS = {
    "mlp": dict(hidden=(8, 8)),
    "vgg": dict(variant="vgg11", width_multiplier=0.0625),
    "resnet20": dict(width=4),
    "deep_linear": dict(depth=3, width=8),
}
_NORM_KWARGS = dict(cbn=dict(window=2, burn_in=1), gn=dict(num_groups=2),
                    ghost=dict(ghost_batch_size=2))


# Which (model, norm) pairs train here. Their time is compiling tiny models
# (15-40 s a pair on 2 shared cores), and what this test adds over the rest of
# the suite is the training plumbing of a norm (its state in TrainState, the
# 'noise' key, batch_stats updates, evaluation with running statistics) and of
# a model (input shapes, eval batches), which do not depend on each other:
# - every norm trains on the MLP (the cheapest model);
# - every other model class trains once, with BN: the CIFAR ResNet
#   (ResNet-20), VGG and the deep linear net. ResNet-18 is the ResNet class
#   with other stage sizes: nothing the loop could get wrong differs. (CBN on
#   convolutions -- ConvCBN owns the kernel and keeps a window of conv-shaped
#   statistics in batch_stats -- trains through bn_jax.training's loop in
#   tests/test_experiments_cbn_rethinking.py::test_cbn_sweep_smoke, a ResNet
#   with ConvCBN layers; tracing CBN on VGG's 8 convs cost ~6 s here);
# - every norm on the MLP and ResNet-18, and every model with none, BN and
#   CBN, is built and traced (init, train-mode forward, gradient, eval) in
#   tests/test_models.py::test_model_and_norm_traced,
#   and every norm's numerics run on a Dense and a Conv block in
#   test_models.py::test_every_norm_executes.
# XLA's optimization passes are off for them (conftest.py); the numerics of
# each norm are tested against references elsewhere.
# ('naive_cbn' is the 'cbn' module with rho=0: tests/test_models.py.)
_CASES = ([("mlp", n) for n in config_validation.NORMS if n != "naive_cbn"] +
          [("resnet20", "bn"), ("deep_linear", "bn"), ("vgg", "bn")])


# Slow (13 cases of ~2-15 s, compiling): worth it as the only check that each
# norm's state and each model's shapes go through the real train/eval steps.
@pytest.mark.parametrize("model_name,norm", _CASES)
def test_every_model_and_norm_trains_a_few_steps(train, digits, model_name,
                                                 norm, unoptimized_compilation):
  """create_state -> 2 jitted train steps -> exact evaluation, on 8x8 digits."""
  config = tiny_config(model=model_name, norms=(norm,), batch_size=4,
                       eval_batch_size=400, learning_rate=0.01)
  config.model_kwargs = ml_collections.ConfigDict(_MODEL_KWARGS[model_name])
  config.norm_kwargs = ml_collections.ConfigDict(_NORM_KWARGS)
  validate_config(config)
  train_ds, test_ds = digits
  model = train.create_model(config, norm, train_ds.num_classes)
  state, lr_fn, _ = train.create_state(config, model, input_shape=(4, 8, 8, 1),
                                       num_train_steps=2)
  params0 = jax.tree.map(np.asarray, state.params)
  stats0 = jax.tree.map(np.asarray, state.batch_stats)
  fns = parallel.make_step_functions(lr_fn, data_parallel=False)
  batches = input_pipeline.train_iterator(train_ds, config)
  losses = []
  for _ in range(2):
    state, metrics = fns.train_step(state, next(batches))
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)), losses
  assert int(state.step) == 2
  assert not _tree_equal(params0, state.params)
  has_stats = norm in ("bn", "cbn", "brn", "noisy_bn", "lp", "ghost")
  if has_stats:  # running statistics moved (frozen BN's are fixed)
    assert not _tree_equal(stats0, state.batch_stats)
  if norm in ("none", "gn", "ln"):
    assert not jax.tree.leaves(state.batch_stats)
  test = train.evaluate(fns, state, test_ds, config)
  assert test["test_examples"] == len(test_ds.labels)
  assert np.isfinite(test["test_loss"]) and 0 <= test["test_accuracy"] <= 1


# ------------------------------------------------------------ the loop

def test_evaluation_is_exact_over_the_padded_test_set(train, digits):
  """Padded+masked batches of 64 give the loss/accuracy of one forward pass
  over all test images (355), computed here in NumPy float64."""
  config = tiny_config()
  train_ds, test_ds = digits
  model = train.create_model(config, "bn", train_ds.num_classes)
  state, lr_fn, _ = train.create_state(config, model, input_shape=(8, 8, 8, 1),
                                       num_train_steps=1)
  fns = parallel.make_step_functions(lr_fn, data_parallel=False)
  state, _ = fns.train_step(state, next(input_pipeline.train_iterator(
      train_ds, config)))
  got = train.evaluate(fns, state, test_ds, config)
  everything = next(input_pipeline.epoch_iterator(
      test_ds, len(test_ds.labels), seed=0, epoch=0, shuffle=False,
      augment=False, remainder="keep"))
  logits = np.asarray(model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      everything["image"], train=False), np.float64)
  labels = everything["label"]
  log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + (
      logits.max(1))
  loss = np.mean(log_z - logits[np.arange(len(labels)), labels])
  accuracy = np.mean(np.argmax(logits, 1) == labels)
  n = len(test_ds.labels)
  assert n % config.eval_batch_size, "the last batch must need padding"
  assert got["test_examples"] == n
  assert got["test_loss"] == pytest.approx(loss, rel=1e-5)
  assert got["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)


# Slow (~10 s): the only run of run_comparison's outputs (tables, plots,
# TensorBoard, the metrics' step schedule) and that BN learns the digits.
def test_comparison_learns_and_writes_table_metrics_plots(
    train, tmp_path, unoptimized_compilation):
  config = tiny_config(norms=("none", "bn"), num_train_steps=60,
                       learning_rate=0.5, momentum=0.0, log_every=20,
                       eval_every=30, checkpoint_every=30, plots=True)
  config.model_kwargs.hidden = (32,)
  rows = train.run_comparison(config, str(tmp_path))
  assert [r["norm"] for r in rows] == ["none", "bn"]
  for row in rows:
    assert row["status"] == "ok" and row["steps"] == 60
    assert row["examples_per_sec"] > 0
  # BN learns the digits well above chance (0.1) in 60 steps of batch 8.
  assert rows[1]["test_accuracy"] > 0.5, rows
  for name in ("results.md", "results.json", "comparison.png",
               "none/curves.png", "bn/curves.png", "bn/summary.json"):
    assert (tmp_path / name).is_file(), name
  assert os.listdir(tmp_path / "bn" / "tensorboard")
  records = [json.loads(l) for l in open(tmp_path / "bn" / "metrics.jsonl")]
  assert [r["step"] for r in records if "test_accuracy" in r] == [30, 60]
  assert [r["step"] for r in records if "train_loss" in r] == [20, 30, 40, 60]
  table = (tmp_path / "results.md").read_text()
  assert "| bn |" in table and "| none |" in table


def test_data_parallel_syncbn_matches_one_device(train, tmp_path,
                                                unoptimized_compilation):
  """8 simulated devices x 2 examples with SyncBN == 1 device x 16."""
  assert jax.local_device_count() == 8
  losses, finals = {}, {}
  for dp in (False, True):
    config = tiny_config(batch_size=16, eval_batch_size=72, num_train_steps=4,
                         data_parallel=dp, save_checkpoints=False)
    config.model_kwargs.hidden = (8, 8)
    state, summary = train.train_and_evaluate(config, str(tmp_path / str(dp)))
    records = [json.loads(l) for l in open(tmp_path / str(dp) /
                                           "metrics.jsonl")]
    losses[dp] = [r["train_loss"] for r in records if "train_loss" in r]
    finals[dp] = (jax.device_get(state.params),
                  jax.device_get(state.batch_stats), summary["test_loss"])
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               finals[True][:2], finals[False][:2])
  assert finals[True][2] == pytest.approx(finals[False][2], rel=1e-5)


def test_divergence_names_the_step_and_keeps_last_finite_checkpoint(
    train, digits, tmp_path):
  """The learning rate jumps by 1e30 after step 4 (of 8), with a checkpoint
  every 2 steps and host syncs at 2, 3, 4, 6, 8 (so the first non-finite loss
  sits inside a multi-step window): training must stop naming exactly the
  first step whose loss is non-finite, and the latest checkpoint must be the
  state after the last checkpointed step before it.

  The reference replays the same steps by hand (the same jitted step, the
  same batches), records each step's loss and state, and finds that step
  and state itself, independently of the loop's bookkeeping."""
  config = tiny_config(norms=("none",), num_train_steps=8, schedule="step",
                       decay_boundaries=(0.5,), decay_factor=1e30,
                       checkpoint_every=2, log_every=3, momentum=0.0)
  # ReLU (unbounded, unlike the sigmoid) so the huge step overflows.
  config.model_kwargs = ml_collections.ConfigDict(dict(hidden=(8, 8),
                                                       activation="relu"))
  train_ds, _ = digits
  model = train.create_model(config, "none", train_ds.num_classes)
  state, lr_fn, _ = train.create_state(config, model, input_shape=(8, 8, 8, 1),
                                       num_train_steps=8)
  fns = parallel.make_step_functions(lr_fn, data_parallel=False)
  batches = input_pipeline.train_iterator(train_ds, config)
  losses, states = {}, {}
  for step in range(1, 9):
    state, metrics = fns.train_step(state, next(batches))
    losses[step] = float(metrics["loss"])
    states[step] = jax.device_get((state.params, state.opt_state))
  first_bad = min(s for s, v in losses.items() if not math.isfinite(v))
  # The jump makes the run diverge after the schedule's boundary (step 4),
  # and the step before is a finite checkpoint (so the check is not empty).
  assert 5 <= first_bad <= 8 and math.isfinite(losses[first_bad - 1])
  last_good_checkpoint = max(s for s in (2, 4, 6) if s < first_bad)

  with pytest.raises(TrainingDiverged) as info:
    train.train_and_evaluate(config, str(tmp_path))
  error = info.value
  assert error.step == first_bad
  assert f"at step {first_bad}" in str(error)
  assert error.last_checkpoint == last_good_checkpoint
  from bn_jax.training import checkpoint
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() == last_good_checkpoint
  target, _, _ = train.create_state(config, model, input_shape=(8, 8, 8, 1),
                                    num_train_steps=8)
  restored = ckpt.restore(target)
  ckpt.close()
  # The checkpoint is that step's state (a freshly initialised or a later,
  # non-finite state both fail here).
  assert int(restored.step) == last_good_checkpoint
  assert _tree_equal(jax.device_get((restored.params, restored.opt_state)),
                     states[last_good_checkpoint])
  assert not _tree_equal(jax.device_get(restored.params),
                         jax.device_get(target.params))
  # The non-finite loss is recorded at its step in metrics.jsonl.
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert records[-1]["step"] == first_bad
  assert not math.isfinite(records[-1]["train_loss"])


def test_half_precision_activations_bf16_state_float32(train, tmp_path):
  """half_precision=True: the hidden matmuls run in bf16, the whole
  state stays float32, and 2 steps land where float32 training lands within
  bf16 rounding (an independent run, the same config otherwise)."""
  summaries, states = {}, {}
  for half in (True, False):
    config = tiny_config(half_precision=half, norms=("bn",),
                         num_train_steps=2, save_checkpoints=False)
    states[half], summaries[half] = train.train_and_evaluate(
        config, str(tmp_path / str(half)))
  state = states[True]
  for tree in (state.params, state.batch_stats, state.opt_state):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  model = train.create_model(tiny_config(half_precision=True), "bn", 10)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True,
                                                  mutable=["batch_stats"]))(
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.zeros((8, 8, 8, 1)))
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  # The hidden layer in bf16; the head in float32 by design (float32 logits
  # for the softmax, bn_jax.models.norms.logits_head).
  assert [e.outvars[0].aval.dtype for e in dots] == [jnp.bfloat16,
                                                      jnp.float32]
  # bf16's unit roundoff is 2^-8 = 3.9e-3; ~10 roundings per forward pass
  # and 2 updates of lr 0.1 move the test loss (~2.3) by ~sqrt(10) * 2^-8
  # ~ 1% at most; 2% and 5% of the largest parameter leave room for the
  # updates' own rounding. A bf16 run that computed something else (other
  # data, other statistics, no update) is off by more than that.
  assert summaries[True]["test_loss"] == pytest.approx(
      summaries[False]["test_loss"], rel=0.02)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=0.05, atol=0.05 * np.max(np.abs(b))),
      jax.device_get(state.params), jax.device_get(states[False].params))


def test_precise_bn_evaluation_uses_population_statistics(train, digits):
  """PreciseBN's mean/var of the first layer equal the NumPy mean/var of the
  first Dense layer's outputs over the same training batches."""
  config = tiny_config(precise_bn_samples=24, precise_bn_batch_size=8)
  train_ds, _ = digits
  model = train.create_model(config, "bn", 10)
  state, _, _ = train.create_state(config, model, input_shape=(8, 8, 8, 1),
                                   num_train_steps=1)
  precise = train.precise_bn_state(config, state, model, train_ds)
  batches = input_pipeline.train_iterator(
      train_ds, config, seed_offset=1 + int(state.step))
  x = np.concatenate([np.asarray(next(batches)["image"]).reshape(8, -1)
                      for _ in range(3)]).astype(np.float64)
  kernel = np.asarray(state.params["hidden_0"]["dense"]["kernel"], np.float64)
  h = x @ kernel
  stats = precise.batch_stats["hidden_0"]["norm"]
  np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["var"], h.var(0), rtol=1e-4, atol=1e-5)


def test_analysis_hooks_write_their_metrics(train, tmp_path,
                                            unoptimized_compilation):
  config = tiny_config(num_train_steps=2, analysis=("ics", "landscape",
                                                    "percentiles"),
                       analysis_every=2, save_checkpoints=False)
  config.model_kwargs.hidden = (8, 8)
  train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  measured = [r for r in records if "landscape/loss_range" in r]
  assert [r["step"] for r in measured] == [1]
  keys = set(measured[0])
  assert "percentiles/p50" in keys
  assert any(k.startswith("ics/") and k.endswith("/cosine") for k in keys)


# `python train.py` as a subprocess (no arguments; killed and restarted; resume
# with augmentation, noisy BN and 8 devices): tests/test_train_cli.py.
