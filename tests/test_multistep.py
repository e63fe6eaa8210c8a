"""Multi-step dispatch (``steps_per_dispatch``: n train steps in one jitted
``lax.scan``) and the input pipelines of ``train.py``.

References: the same steps dispatched one at a time (the reference path of
``bn_jax.training.loop``), compared in float64 where they must agree to
rounding; the NumPy host pipeline's batches; an uninterrupted run for the
resumes.
"""
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bn_jax import models
from bn_jax.training import (base_config, config_validation, input_pipeline,
                             loop, steps)


# A small MLP run on the 8x8 digits (355 test images in one batch).
_SMALL = dict(dataset="digits", model="mlp", batch_size=8, eval_batch_size=360,
              num_train_steps=12, learning_rate=0.1, momentum=0.9,
              progress_bar=False, plots=False, precise_bn_samples=0)


def _config(**overrides):
  c = base_config()
  c.model_kwargs = ml_collections.ConfigDict(dict(hidden=(16, 16)))
  c.norm_kwargs.cbn.window, c.norm_kwargs.cbn.burn_in = 3, 2
  for key, value in {**_SMALL, **overrides}.items():
    c[key] = value
  return c


@pytest.fixture(scope="module")
def digits():
  return input_pipeline.load_train_test(_config())


def _float64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(
      x.dtype, jnp.floating) else x, tree)


def _max_relative_difference(a, b):
  """max |a - b| / max |b| over the leaves (0 for equal trees)."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.max(np.abs(y)), 1e-300)
    worst = max(worst, float(np.max(np.abs(x - y)) / scale))
  return worst


# Float64 rounding: each step is ~10^3 flops per output with reductions of
# length <= 64; a different fusion or summation order inside the loop body
# moves a value by <= ~64 eps64 = 1.4e-14 per step, and 12 steps at lr 0.1
# amplify it by far less than 10^2 (the loss is smooth; gradients O(1)):
# <= 2e-12. 1e-9 keeps a margin >= 100x. A wrong batch, a skipped or
# repeated step or a lost batch_stats update changes values by >= 1e-4.
F64_TOLERANCE = 1e-9


@pytest.mark.parametrize("norm", ["bn", "cbn"])
def test_scanned_steps_equal_single_steps_in_float64(digits, norm):
  """n steps as one lax.scan (loop.step_runner, scan=True, device data
  gathered by example index) == the same n steps dispatched one at a time:
  params, batch_stats (CBN's window included), optimizer state and every
  step's loss/accuracy."""
  config = _config(norms=(norm,))
  train_ds, _ = digits
  with jax.enable_x64(True):
    model = models.create_model(
        "mlp", num_classes=10, norm=norm, dtype=jnp.float64,
        norm_kwargs=config.norm_kwargs[norm].to_dict(), hidden=(16, 16))
    state, lr_fn, _ = loop.create_state(config, model, input_shape=(8, 8, 8, 1),
                                        num_train_steps=12)
    state = _float64(state)
    images, labels = input_pipeline.normalized_arrays(train_ds)
    data = (images.astype(jnp.float64), labels)
    index = np.stack(list(itertools.islice(input_pipeline.epoch_index_batches(
        len(train_ds.labels), 8, seed=0), 12)))
    step_fn = functools.partial(steps.train_step, learning_rate_fn=lr_fn)
    one = loop.step_runner(step_fn, scan=False, gather=loop.index_gather)
    many = loop.step_runner(step_fn, scan=True, gather=loop.index_gather)

    single, losses = state, []
    for i in range(12):
      single, m = one(single, index[i], data)
      losses.append(float(m["loss"]))
    scanned, stacked = many(state, index, data)
    assert jax.tree.leaves(single.batch_stats)
    assert {x.dtype for x in jax.tree.leaves(scanned.params)} == {
        np.dtype(np.float64)}
    for name in ("params", "batch_stats", "opt_state"):
      got, want = getattr(scanned, name), getattr(single, name)
      assert _max_relative_difference(got, want) <= F64_TOLERANCE, name
    np.testing.assert_allclose(np.asarray(stacked["loss"]), losses,
                               rtol=F64_TOLERANCE)
    assert int(scanned.step) == 12


def test_train_loop_syncs_at_the_same_steps_with_multi_step_dispatch(digits):
  """train_loop with 5 steps per dispatch: dispatches end at every sync
  (log every 4, extra syncs at 6 and 9), on_sync sees the same steps, window
  means and states as with one step per dispatch, and the first non-finite
  loss is named by its step."""
  config = _config(norms=("bn",), schedule="step", decay_boundaries=(0.75,),
                   decay_factor=1e30, momentum=0.0)
  train_ds, _ = digits
  model = models.create_model("mlp", num_classes=10, norm="bn",
                              activation="relu", hidden=(16, 16))
  data = input_pipeline.normalized_arrays(train_ds)
  results = {}
  for n in (1, 5):
    state, lr_fn, _ = loop.create_state(config, model, input_shape=(8, 8, 8, 1),
                                        num_train_steps=12)
    step_fn = functools.partial(steps.train_step, learning_rate_fn=lr_fn)
    run = loop.step_runner(step_fn, scan=n > 1, gather=loop.index_gather)
    call = lambda s, b, run=run: run(s, b, data)
    seen = []
    result = loop.train_loop(
        call if n == 1 else None, state,
        input_pipeline.epoch_index_batches(len(train_ds.labels), 8, seed=0),
        end_step=12, sync_every=4, sync_at=(6, 9),
        on_sync=lambda step, s, window: seen.append(
            (step, window["train_loss"], window["train_accuracy"],
             jax.device_get(s.params))),
        steps_per_dispatch=n, multi_step_fn=call if n > 1 else None)
    results[n] = (seen, result)
  (seen1, r1), (seen5, r5) = results[1], results[5]
  # lr x 1e30 from step 10 on: step 10's update explodes, step 11's loss is
  # the first non-finite one (both runs stop at the sync of step 12).
  assert r1.status == r5.status and r1.diverged[0] == r5.diverged[0]
  assert r1.status.startswith("diverged at step 1")
  assert [s[0] for s in seen1] == [s[0] for s in seen5] == [4, 6, 8, 9]
  for a, b in zip(seen1, seen5):
    # float32: bit-identical on the CPUs we ran; a different fusion inside
    # the loop body may move the last bits (~64 eps32 = 8e-6 per step,
    # <= 9 steps): 1e-4, far below what a wrong batch or step changes.
    np.testing.assert_allclose(a[1:3], b[1:3], rtol=1e-4)
    assert _max_relative_difference(a[3], b[3]) <= 1e-4


def _records(path):
  return [json.loads(line) for line in open(path / "metrics.jsonl")]


def _assert_records_match(got, want, rtol):
  assert [sorted(r) for r in got] == [sorted(r) for r in want]
  for a, b in zip(got, want):
    assert a["step"] == b["step"]
    for key in a:
      if key not in ("step", "steps_per_sec", "examples_per_sec"):
        assert a[key] == pytest.approx(b[key], rel=rtol, abs=rtol), key


def test_train_py_multi_step_dispatch_equals_single_steps(
    train, tmp_path, unoptimized_compilation):
  """train.py with steps_per_dispatch=4 vs 1 (CBN, log every 3, evaluation
  every 6, checkpoints every 5): the same metric records at the same steps,
  the same checkpoints, the same final state."""
  finals = {}
  for n in (1, 4):
    config = _config(norms=("cbn",), steps_per_dispatch=n, log_every=3,
                     eval_every=6, checkpoint_every=5, keep_checkpoints=5)
    finals[n], _ = train.train_and_evaluate(config, str(tmp_path / str(n)))
  _assert_records_match(_records(tmp_path / "4"), _records(tmp_path / "1"),
                        rtol=1e-4)  # float32, see the test above
  for n in (1, 4):
    assert sorted(int(p.name) for p in (tmp_path / str(n) / "checkpoints")
                  .iterdir() if p.name.isdigit()) == [5, 10, 12]
  assert _max_relative_difference(
      jax.device_get((finals[4].params, finals[4].batch_stats)),
      jax.device_get((finals[1].params, finals[1].batch_stats))) <= 1e-4


def test_steps_per_dispatch_auto_by_platform_and_model():
  resolve = loop.resolve_steps_per_dispatch
  mlp, conv = _config(), _config(model="resnet20")
  assert resolve(mlp, "cpu") == loop.AUTO_STEPS_PER_DISPATCH
  assert resolve(conv, "cpu") == 1
  assert resolve(conv, "gpu") == resolve(conv, "tpu") > 1
  assert resolve(_config(analysis=("ics",), analysis_every=1), "gpu") == 1
  assert resolve(_config(steps_per_dispatch=7), "cpu") == 7
  with pytest.raises(ValueError, match="config.steps_per_dispatch"):
    config_validation.validate_config(_config(steps_per_dispatch=2,
                                              analysis=("ics",),
                                              analysis_every=1))
  with pytest.raises(ValueError, match="config.input_pipeline"):
    config_validation.validate_config(_config(input_pipeline="disk"))
  # The instruments measure on a batch of images, not on the device
  # pipeline's step number.
  with pytest.raises(ValueError, match="config.input_pipeline.*analysis"):
    config_validation.validate_config(_config(input_pipeline="device",
                                              analysis=("ics",),
                                              analysis_every=1))


def test_host_pipeline_on_device_gives_the_numpy_batches(train, digits):
  """'host' without augmentation keeps the normalized set on the device and
  gathers each step's examples by index: the batches of
  input_pipeline.train_iterator (the NumPy pipeline), bit for bit, from any
  start step (also across an epoch boundary: 224 batches of 8 per epoch)."""
  config = _config()
  train_ds, _ = digits
  _, _, indices = train.training_feed(
      config, None, None, train_ds, start_step=220, steps_per_dispatch=1)
  data = input_pipeline.normalized_arrays(train_ds)
  host = input_pipeline.train_iterator(train_ds, config, start_step=220)
  for _ in range(8):
    got = loop.index_gather(data, next(indices))
    want = next(host)
    np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])
    np.testing.assert_array_equal(np.asarray(got["label"]), want["label"])


# The three resumed settings, each a path of train.py's input feeds: the
# device pipeline with crops and flips, n steps per dispatch, CBN (its window
# of past statistics is part of the resumed state); the host pipeline with
# augmentation (NumPy batches), n steps per dispatch; the host pipeline
# without augmentation (the normalized set on the device, example indices
# from the host order), one step per dispatch, with AdamW (two moment trees
# in opt_state) and a warmup + cosine schedule (the learning rate depends on
# the restored step), batches of 128 so that the resumed steps cross an
# epoch boundary (11 steps per epoch: the order restarts from (seed, epoch)).
_RESUMED = {
    "device-augment-3-cbn": dict(input_pipeline="device", augment=True,
                                 steps_per_dispatch=3, norms=("cbn",)),
    "host-augment-3-bn": dict(input_pipeline="host", augment=True,
                              steps_per_dispatch=3, norms=("bn",)),
    "host-indices-1-bn-adamw-cosine-epoch": dict(
        input_pipeline="host", augment=False, steps_per_dispatch=1,
        norms=("bn",), batch_size=128, optimizer="adamw",
        weight_decay=0.1, schedule="cosine", warmup_steps=2),
}


@pytest.mark.parametrize("setting", list(_RESUMED))
def test_resume_is_bit_identical(train, tmp_path, digits, setting,
                                 unoptimized_compilation):
  """Stopped after 6 steps and resumed == 12 uninterrupted steps, bit for
  bit (params, batch_stats with CBN's window, optimizer state, key), each
  step logged once, in the settings of ``_RESUMED``. (The programs are
  compiled without XLA's optimizations, for time: both runs execute the
  same programs either way.)"""
  config = _config(log_every=3, checkpoint_every=3, **_RESUMED[setting])
  if config.batch_size == 128:  # the resumed steps 7-12 cross an epoch
    per_epoch = input_pipeline.steps_per_epoch(digits[0], config.batch_size)
    assert 6 < per_epoch < 12, per_epoch
  interrupted, _ = train.train_and_evaluate(config, str(tmp_path / "a"),
                                            stop_after_steps=6)
  assert int(interrupted.step) == 6
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / "a"))
  straight, _ = train.train_and_evaluate(config, str(tmp_path / "b"))
  assert int(resumed.step) == int(straight.step) == 12
  assert jax.tree.leaves(straight.batch_stats)
  # (train.py never changes the key, so 'rng' cannot fail here; that a
  # restore returns the saved key, not the target's, is
  # test_checkpoint.test_restore_returns_the_saved_state_not_the_target.)
  for name in ("params", "batch_stats", "opt_state", "rng"):
    for x, y in zip(jax.tree.leaves(getattr(resumed, name)),
                    jax.tree.leaves(getattr(straight, name)), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  steps_logged = [r["step"] for r in _records(tmp_path / "a")
                  if "train_loss" in r]
  assert steps_logged == [3, 6, 9, 12]


def test_digits_are_read_as_scikit_learn_loads_them():
  """bn_jax.data reads scikit-learn's digits file itself (no scikit-learn
  import, seconds of SciPy): the arrays of sklearn's load_digits, exactly."""
  from sklearn.datasets import load_digits
  from bn_jax.data import datasets
  images, target = datasets._sklearn_digits()
  bunch = load_digits()
  assert images.dtype == bunch.images.dtype and target.dtype == bunch.target.dtype
  np.testing.assert_array_equal(images, bunch.images)
  np.testing.assert_array_equal(target, bunch.target)
