"""Smoke tests of experiments 4 (CBN, small batch) and 5 (Rethinking Batch).

A few steps on scikit-learn's 8x8 digits (no download), so CI keeps the
scripts runnable; plus the pieces whose arithmetic can be checked exactly
(downsampling, the run grid, the statistics divergence, the step-wise
training loop's bookkeeping, the resumable run cache of
``experiments/common.py``). Compiled with XLA's optimizations off
(conftest.py's ``unoptimized_compilation_module`` fixture): compilation is these tests' time.
"""
import importlib.util
import json
import math
import pathlib
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bn_jax.data import load_dataset
from bn_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _fast_compilation(unoptimized_compilation_module):
  # These tests' time is XLA compilation of tiny models (see conftest.py);
  # what they check does not depend on it.
  yield


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"exp_{name}", REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(name, **overrides):
  spec = importlib.util.spec_from_file_location(
      f"cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("cpu")
  for key, value in overrides.items():
    config[key] = value
  return config


def test_train_loop_syncs_and_finds_the_diverging_step():
  # A fake jitted step: the state counts steps, the losses are scripted.
  losses = [1.0, 2.0, 3.0, 4.0, 5.0, math.nan, 7.0]

  def step_fn(state, batch):
    assert set(batch) == {"image", "label"}
    return state + 1, {"loss": jnp.asarray(losses[state]),
                       "accuracy": jnp.asarray(0.25 * (state % 2))}

  batches = iter(lambda: {"image": 0, "label": 0, "mask": 1}, None)
  synced, before = [], []
  result = loop.train_loop(
      step_fn, 0, batches, end_step=5, sync_every=4, sync_at=(1,),
      on_sync=lambda step, state, window: synced.append(
          (step, state, window["train_loss"])),
      before_step=lambda step, state, batch: before.append((step, state)))
  # Syncs at step 1 (sync_at), 4 (every 4) and 5 (the last): window means.
  # (accuracies 0.25 * (state % 2): 0 | 0.25, 0, 0.25 | 0)
  assert result.curve == [(1, 1.0, 0.0), (4, 3.0, pytest.approx(0.5 / 3)),
                          (5, 5.0, 0.0)]
  assert synced == [(1, 1, 1.0), (4, 4, 3.0), (5, 5, 5.0)]
  assert before == [(s, s - 1) for s in range(1, 6)]  # the state before
  assert result.state == 5 and result.status == "ok"
  assert result.diverged is None and result.timed_steps == 4
  result = loop.train_loop(step_fn, 0, batches, end_step=7, sync_every=4)
  # Step 6's loss is NaN: seen at the last sync (step 7), named exactly.
  assert result.status == "diverged at step 6"
  assert result.diverged[0] == 6 and math.isnan(result.diverged[1])
  assert result.curve == [(4, 2.5, 0.125)] and result.state == 7
  # A resumed loop runs steps start_step + 1 .. end_step.
  result = loop.train_loop(step_fn, 2, batches, start_step=2, end_step=4)
  assert result.curve == [(4, 3.5, 0.125)] and result.state == 4


def test_cached_run_and_fingerprint(tmp_path):
  config = ml_collections.ConfigDict(dict(lr=0.1, log_every=10))
  calls = []

  def train():
    calls.append(1)
    return {"value": 1 / 3, "curve": [(1, 0.5)]}

  def run(config):
    return common.cached_run(
        str(tmp_path / "runs" / "a.json"),
        common.fingerprint(config, ["a", 1], ignore=("log_every",)), train,
        log=lambda *a: None)

  first = run(config)
  assert calls == [1] and first["value"] == 1 / 3
  config.log_every = 20  # not fingerprinted: the saved run is reused
  again = run(config)
  assert calls == [1] and again["value"] == 1 / 3  # exact, not rounded
  assert again["fingerprint"] == first["fingerprint"]
  config.lr = 0.2  # fingerprinted: trained again
  assert run(config)["fingerprint"] != first["fingerprint"] and calls == [1, 1]


def test_write_json_rounds_and_names_non_finite(tmp_path):
  path = tmp_path / "x.json"
  common.write_json(str(path), {"a": np.float32(1 / 3), "b": [1.5, math.inf],
                                "c": np.arange(2)})
  assert json.loads(path.read_text()) == {"a": 0.3333333, "b": [1.5, "inf"],
                                          "c": [0, 1]}
  common.write_json(str(path), {"a": 1 / 3}, significant_digits=None)
  assert json.loads(path.read_text()) == {"a": 1 / 3}


@pytest.fixture(scope="module")
def cbn_exp():
  return _load("cbn_small_batch")


@pytest.fixture(scope="module")
def rethinking_exp():
  return _load("rethinking_batch")


def test_downsample_is_block_mean(cbn_exp):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 4, 6, 2), dtype=np.uint8)
  got = cbn_exp.downsample_images(images, 2)
  want = np.zeros((3, 2, 3, 2))
  for i in range(2):
    for j in range(3):
      want[:, i, j] = images[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].astype(
          np.float64).mean(axis=(1, 2))
  np.testing.assert_array_equal(got, np.rint(want).astype(np.uint8))
  with pytest.raises(ValueError, match="downsample"):
    cbn_exp.downsample_images(images, 4)


def test_cbn_grid_and_norm_arguments(cbn_exp):
  config = _config("exp_cbn_small_batch", batch_sizes=(16, 4),
                   cbn_max_batch_size=8, ablation_windows=(2,),
                   ablation_burn_in_fractions=(0.0,), ablation_batch_size=4,
                   seeds=(0, 3))
  specs = cbn_exp.run_specs(config)
  cells = ["bn_b16", "gn_b16", "brn_b16", "bn_b4", "gn_b4", "brn_b4",
           "naive_cbn_b4", "cbn_b4", "cbn_nograd_b4", "cbn_k2_b4",
           "cbn_burnin0_b4"]
  assert [s.name for s in specs] == ([f"{c}_s0" for c in cells] +
                                     [f"{c}_s3" for c in cells])
  assert [s.seed for s in specs] == [0] * 11 + [3] * 11
  specs = {s.name: s for s in specs}
  steps = cbn_exp.num_steps_of(config, 4)
  assert steps == config.train_samples // 4
  norm, kw = cbn_exp.norm_of(config, specs["naive_cbn_b4_s0"], steps)
  assert (norm, kw["rho"], kw["window"]) == ("cbn", 0.0, config.cbn_window)
  assert kw["burn_in"] == round(config.cbn_burn_in_fraction * steps)
  # CBN keeps the library's defaults (momentum, gradient through the
  # compensation) unless it is the no-grad variant.
  assert "momentum" not in kw and "compensation_grad" not in kw
  _, kw = cbn_exp.norm_of(config, specs["cbn_nograd_b4_s3"], steps)
  assert (kw["rho"], kw["compensation_grad"]) == (1.0, False)
  norm, kw = cbn_exp.norm_of(config, specs["cbn_burnin0_b4_s0"], steps)
  assert (kw["rho"], kw["burn_in"]) == (1.0, 0)
  t = cbn_exp.training_config(config, 4, steps, seed=3)
  assert t.learning_rate == pytest.approx(
      config.base_learning_rate * 4 / config.base_batch_size)
  assert t.seed == 3
  with pytest.raises(ValueError, match="methods"):
    cbn_exp.run_specs(_config("exp_cbn_small_batch", methods=("bn", "xn")))
  with pytest.raises(ValueError, match="seeds"):
    cbn_exp.run_specs(_config("exp_cbn_small_batch", seeds=()))


def test_cbn_spread_is_mean_and_sample_std(cbn_exp):
  got = cbn_exp.spread([0.25, 0.5, 0.75])
  assert got["mean"] == 0.5 and got["std"] == pytest.approx(0.25)  # ddof 1
  assert (got["min"], got["max"]) == (0.25, 0.75)
  assert cbn_exp.spread([0.4])["std"] == 0.0
  assert cbn_exp.spread([0.4, None]) is None


def test_cbn_sweep_smoke(cbn_exp, tmp_path):
  config = _config(
      "exp_cbn_small_batch", dataset="digits", downsample=1, width=2,
      stage_sizes=(1,), seeds=(0, 1),
      methods=("cbn",), batch_sizes=(2,), cbn_window=2,
      train_samples=16, eval_batch_size=360, ablation_windows=(),
      ablation_burn_in_fractions=(), ablation_batch_size=2, log_every=2,
      staleness_fractions=(0.5,), precise_bn_samples=40,
      precise_bn_batch_size=20, compilation_cache=False)
  results = cbn_exp.run_sweep(config, str(tmp_path), log=lambda *a: None)
  cells = results["cells"]
  assert set(cells) == {"cbn_b2"}
  num_test = len(load_dataset("digits", "test").labels)
  for seed in (0, 1):
    run = results["runs"][f"cbn_b2_s{seed}"]
    assert run["num_steps"] == 8 and run["test_examples"] == num_test
    assert run["norm_kwargs"]["burn_in"] == 2  # 0.25 * 8 steps
    # Exact evaluation over the padded, masked test set: a count / num_test,
    # for both the running and the PreciseBN statistics.
    for key in ("test_accuracy", "precise_bn_test_accuracy"):
      count = run[key] * num_test
      assert abs(count - round(count)) < 1e-9
    # The staleness at step 4 (after the 2 burn-in steps the window holds
    # the previous step's entry): one row per CBN layer (stem conv, stage
    # conv x2), finite, in units of the sampling noise.
    layers = run["staleness"]["4"]["layers"]
    assert len(layers) == 3
    for layer in layers.values():
      assert all(math.isfinite(v) and v >= 0 for v in layer.values())
  cell = cells["cbn_b2"]["test_accuracy"]
  values = [results["runs"][f"cbn_b2_s{s}"]["test_accuracy"] for s in (0, 1)]
  assert cell["values"] == values
  assert cell["mean"] == pytest.approx(np.mean(values))
  assert cell["std"] == pytest.approx(np.std(values, ddof=1))
  # The two seeds are different runs.
  assert (results["runs"]["cbn_b2_s0"]["test_loss"] !=
          results["runs"]["cbn_b2_s1"]["test_loss"])
  for f in ("accuracy_vs_batch.png", "train_curves.png", "results.md"):
    assert (tmp_path / f).stat().st_size > 0
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["cells"] == json.loads(json.dumps(cells))


def test_stats_divergence_formula(rethinking_exp):
  ema = {"a": {"norm": {"mean": np.array([1.0, 0.0]),
                        "var": np.array([4.0, 1.0])}}}
  pop = {"a": {"norm": {"mean": np.array([0.0, 0.0]),
                        "var": np.array([1.0, 1.0])}}}
  got = rethinking_exp.stats_divergence(ema, pop)
  eps = 1e-5
  assert got["mean_abs_z"] == pytest.approx(0.5 / np.sqrt(1 + eps))
  assert got["var_abs_log_ratio"] == pytest.approx(
      0.5 * np.log((4 + eps) / (1 + eps)))


def test_rethinking_smoke(rethinking_exp, tmp_path):
  config = _config(
      "exp_rethinking_batch", dataset="digits",
      model_kwargs=ml_collections.ConfigDict(
          {"hidden": (8,), "activation": "relu"}), batch_size=16,
      num_train_steps=4, eval_batch_size=16, train_eval_examples=32,
      precise_bn_batches=2, ema_momenta=(0.5,), eval_steps=(0, 4),
      ghost_batch_sizes=(4, 16), log_every=2)
  results = rethinking_exp.run_experiment(config, str(tmp_path),
                                          log=lambda *a: None)
  rows = results["ema_vs_precise"]["0.5"]["evals"]
  assert [r["step"] for r in rows] == [0, 4]
  # At step 0 the EMA holds the initial statistics (mean 0, var 1), not the
  # population ones of the initial weights.
  assert rows[0]["ema_vs_pop_var_abs_log_ratio"] > 0
  ghost = results["ghost_batch"]
  assert set(ghost) == {"4", "16"}
  for r in ghost.values():
    assert r["normalization_gap"] == pytest.approx(
        r["train_accuracy_batch"] - r["train_accuracy_precise"])
  for png in ("ema_vs_precise.png", "ghost_batch.png"):
    assert (tmp_path / png).stat().st_size > 0
  with pytest.raises(ValueError, match="ghost_batch_sizes"):
    rethinking_exp.run_experiment(
        _config("exp_rethinking_batch", dataset="digits", batch_size=16,
                ghost_batch_sizes=(3,), ema_momenta=()),
        str(tmp_path / "bad"), log=lambda *a: None)
