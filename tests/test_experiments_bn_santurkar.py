"""Tests of the BN-paper and Santurkar et al. experiment scripts and of
``experiments/common.py``.

The library's device-resident paths the scripts train with are checked
against its plain pipeline (the device-resident index order against
``bn_jax.data.epoch_batches``; ``loop.Trainer``'s scanned and per-step
dispatch against a loop of the library's ``train_step`` over
``input_pipeline.train_iterator`` batches), the small
statistics against closed forms, and every script runs end to end at a tiny
setting (scikit-learn digits / synthetic data: no download). Compilation
dominates on a CPU: the tests compile with XLA's optimizations off
(conftest.py's ``unoptimized_compilation_module`` fixture), the smoke tests use one-unit-wide conv
layers (one kernel shape to initialize) and the fewest runs that reach every
branch.
"""
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import common  # noqa: E402

from bn_jax.models import create_model  # noqa: E402
from bn_jax.training import input_pipeline, loop, train_step  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _fast_compilation(unoptimized_compilation_module):
  # These tests' time is XLA compilation of tiny models (see conftest.py);
  # what they check does not depend on it.
  yield


@pytest.fixture(scope="module")
def digits():
  data = common.library_config(dataset="digits", batch_size=32, seed=3,
                               eval_batch_size=256, learning_rate=0.3,
                               momentum=0.9)
  train_ds, test_ds = input_pipeline.load_train_test(data)
  return data, train_ds, test_ds


def test_index_order_matches_library_pipeline(digits):
  data, train_ds, _ = digits
  images, labels = input_pipeline.normalized_arrays(train_ds)
  per_epoch = len(train_ds.labels) // data.batch_size
  reference = input_pipeline.train_iterator(train_ds, data)
  ours = input_pipeline.epoch_index_batches(
      len(train_ds.labels), data.batch_size, seed=data.seed)
  # Two epochs and a bit: crosses an epoch boundary.
  for _ in range(2 * per_epoch + 3):
    ref, index = next(reference), next(ours)
    np.testing.assert_array_equal(np.asarray(images[index]), ref["image"])
    np.testing.assert_array_equal(np.asarray(labels[index]), ref["label"])
  resumed = input_pipeline.epoch_index_batches(
      len(train_ds.labels), data.batch_size, seed=data.seed,
      start_step=per_epoch + 2)
  fresh = input_pipeline.epoch_index_batches(
      len(train_ds.labels), data.batch_size, seed=data.seed)
  for _ in range(per_epoch + 2):
    next(fresh)
  np.testing.assert_array_equal(next(resumed), next(fresh))


def test_training_paths_match_a_plain_library_loop(digits):
  settings, train_ds, test_ds = digits
  model = create_model("mlp", num_classes=10, norm="bn", hidden=(8,))
  steps = 6
  runs = [loop.Trainer(model, settings, train_ds, test_ds,
                       num_train_steps=steps, scan=scan)
          for scan in (True, False)]
  outs = [[r.train(3), r.train(3)] for r in runs]
  # Reference: the library's train_step, one jitted step per batch of the
  # library's own iterator, from the same initial state.
  state, lr_fn, _ = loop.create_state(
      settings, model, num_train_steps=steps,
      input_shape=(settings.batch_size,) + train_ds.images.shape[1:], seed=0)
  step = jax.jit(lambda s, b: train_step(s, b, learning_rate_fn=lr_fn))
  batches = input_pipeline.train_iterator(train_ds, settings)
  losses = []
  for _ in range(steps):
    b = next(batches)
    state, m = step(state, {"image": b["image"], "label": b["label"]})
    losses.append(float(m["loss"]))
  for run, out in zip(runs, outs):
    np.testing.assert_allclose(
        [out[0]["train_loss"], out[1]["train_loss"]],
        [np.mean(losses[:3]), np.mean(losses[3:])], rtol=2e-5)
    assert [c[0] for c in run.curve] == [3, 6] and run.status == "ok"
    for a, b in zip(jax.tree.leaves(run.state.params),
                    jax.tree.leaves(state.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                 atol=1e-6)
  # Evaluation: exact count over the test set.
  ev = runs[0].evaluate()
  logits = model.apply(runs[0].variables,
                       input_pipeline.normalized_arrays(test_ds)[0],
                       train=False)
  expected = float(np.mean(np.argmax(np.asarray(logits), -1)
                           == test_ds.labels))
  assert ev["test_accuracy"] == pytest.approx(expected, abs=1e-6)


def test_small_helpers():
  assert common.steps_to_reach([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == 10
  assert common.steps_to_reach([0, 10], [0.1, 0.2], 0.5) is None
  assert common.scale_from_argv(["x", "--scale", "paper"]) == "paper"
  assert common.scale_from_argv(["x", "--scale=cpu"]) == "cpu"
  assert common.scale_from_argv(["x"]) == "cpu"
  with pytest.raises(SystemExit, match="--scale"):
    common.scale_from_argv(["x", "--scale=gpu"])
  assert [loop.is_due(s, 4, 10) for s in (3, 4, 8, 9, 10)] == [
      False, True, True, False, True]
  settings = common.library_config(learning_rate=0.5, batch_size=7)
  assert (settings.learning_rate, settings.batch_size) == (0.5, 7)
  derived = common.library_config(settings, learning_rate=2.0)
  assert (derived.learning_rate, derived.batch_size) == (2.0, 7)
  assert settings.learning_rate == 0.5  # the base is copied, not changed
  with pytest.raises(KeyError, match="learning_rat"):
    common.library_config(learning_rat=0.1)
  import bn_learning_rates as blr
  assert blr.parse_run("bn/relu/x30") == ("bn", "relu", 30.0)
  for bad in ("bn/relu", "bn/relu/5", "bn/relu/x0", "bn/relu/xa"):
    with pytest.raises(ValueError, match="config.runs"):
      blr.parse_run(bad)


def test_excess_kurtosis_and_ics_summary():
  import santurkar_vgg as sv
  two_point = np.array([[-1.0, 3.0], [1.0, 5.0]] * 8)  # kurtosis 1 -> -2
  uniform = np.linspace(-1, 1, 20001)[:, None]           # -> -1.2
  out = sv.excess_kurtosis({"intermediates": {
      "a": {"preact": (jnp.asarray(two_point),)},
      "b": {"preact": (jnp.asarray(uniform),)}}})
  assert out["a/preact"] == pytest.approx(-2.0, abs=1e-9)
  assert out["b/preact"] == pytest.approx(-1.2, abs=1e-3)
  record = {"step": 5}
  for i, (name, l2, cos, g) in enumerate([("l0", 0.0, 1.0, 2.0),
                                          ("l1", 1.0, 0.5, 4.0),
                                          ("l2", 3.0, 0.1, 6.0)]):
    record.update({f"ics/{name}/l2_diff": l2, f"ics/{name}/cosine": cos,
                   f"ics/{name}/grad_norm": g, f"ics/{name}/position": i})
  (s,) = sv.ics_summary([record])  # layer 0 (G' = G) is excluded
  assert s["mean_l2_diff"] == pytest.approx(2.0)
  assert s["mean_cosine"] == pytest.approx(0.3)
  assert s["min_cosine"] == pytest.approx(0.1)
  assert s["mean_relative_l2_diff"] == pytest.approx((0.25 + 0.5) / 2)
  assert sv.measurement_steps(10, 3) == [0, 5, 10]


def _config(module_name, **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      module_name, os.path.join(REPO, "configs", f"{module_name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("cpu")
  paper = module.get_config("paper")
  assert set(paper.keys()) == set(config.keys())
  with pytest.raises(ValueError, match="scale"):
    module.get_config("gpu")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_bn_mnist_smoke(tmp_path):
  import bn_mnist
  config = _config("exp_bn_mnist", dataset="digits", hidden=(8,),
                   num_train_steps=20, chunk_steps=10, eval_every=10,
                   probe_size=64)
  out = bn_mnist.run_experiment(config, str(tmp_path))
  for norm in ("none", "bn"):
    res = out["results"][norm]
    assert res["steps"] == [0, 10, 20]
    assert 0.0 <= res["final_test_accuracy"] <= 1.0
    values = np.asarray(res["percentiles"]["train"]["values"])
    assert values.shape == (3, 3) and np.all(np.diff(values, axis=1) >= 0)
  none, bn = out["results"]["none"], out["results"]["bn"]
  # Closed forms at step 0 (same seed: both models start from the same
  # first-layer kernel; the no-norm layer's bias starts at 0):
  # (1) eval mode: BN's running statistics are still (mean 0, var 1), so its
  #     pre-activation is the no-norm one times 1/sqrt(1 + eps), eps = 1e-5:
  #     every percentile scales by that constant. Two float32 paths of a few
  #     ops: relative error ~ 4 eps_f32 ~ 5e-7; rtol 1e-5 leaves > 10x.
  eps = 1e-5
  np.testing.assert_allclose(
      np.asarray(bn["percentiles"]["eval"]["values"])[0],
      np.asarray(none["percentiles"]["eval"]["values"])[0] / np.sqrt(1 + eps),
      rtol=1e-5)
  # (2) train mode: BN normalizes the probe batch by its own statistics:
  #     mean 0 and std sqrt(var / (var + eps)) per unit, within eps / (2 var)
  #     of 1 (var of the initial pre-activations ~ 0.3 here, so ~2e-5;
  #     float32 error ~1e-6); the no-norm model's would be ~0.56.
  drift = bn["drift"]["train"]
  assert abs(float(np.asarray(drift["hidden_0/preact/mean"])[0])) < 1e-5
  assert abs(float(np.asarray(drift["hidden_0/preact/std"])[0]) - 1.0) < 1e-3
  # (3) without normalization, train and eval mode are the same function.
  for key in ("hidden_0/preact/mean", "hidden_0/preact/std"):
    np.testing.assert_array_equal(np.asarray(none["drift"]["train"][key]),
                                  np.asarray(none["drift"]["eval"][key]))
  # Exact evaluation: accuracies are counts over the 355 test images.
  for acc in none["test_accuracy"] + bn["test_accuracy"]:
    assert abs(acc * 355 - round(acc * 355)) < 1e-9
  for name in ("results.json", "fig1a_test_accuracy.png",
               "fig1bc_percentiles.png", "drift.png"):
    assert (tmp_path / name).stat().st_size > 0
  json.loads((tmp_path / "results.json").read_text())


def test_bn_learning_rates_smoke(tmp_path):
  import bn_learning_rates
  config = _config("exp_bn_lr", dataset="digits", hidden=(8,),
                   num_train_steps=20, chunk_steps=10, eval_every=10,
                   runs=("bn/relu/x1", "none/relu/x1", "none/relu/x1e30"))
  out = bn_learning_rates.run_experiment(config, str(tmp_path))
  results = out["results"]
  assert list(results)[0] == "none/relu/x1"  # the baseline trains first
  assert out["target_accuracy"] == results["none/relu/x1"]["max_test_accuracy"]
  assert results["none/relu/x1"]["steps_to_target"] is not None
  assert results["none/relu/x1e30"]["status"].startswith("diverged")
  assert "| none/relu/x1e30 |" in (tmp_path / "results.md").read_text()


def test_santurkar_dln_smoke(tmp_path):
  import santurkar_dln
  config = _config("exp_santurkar_dln", num_train_steps=6, chunk_steps=3,
                   num_points=2, probe_size=32, batch_size=16,
                   eval_batch_size=64, tracked_layers=(0, -1),
                   **{"model_kwargs.depth": 3, "model_kwargs.width": 8,
                      "synthetic.num_train": 128, "synthetic.num_test": 64,
                      "synthetic.dim": 8})
  out = santurkar_dln.run_experiment(config, str(tmp_path))
  for label in ("DLN", "DLN + BN"):
    s = out["summary"][label]
    assert [x["step"] for x in s["ics"]] == [0, 6]
    assert all(-1.0 <= x["mean_cosine"] <= 1.0 + 1e-6 for x in s["ics"])
    assert s["landscape"]["steps"] == [0, 6]
  assert (tmp_path / "ics.png").stat().st_size > 0


def test_santurkar_variants():
  import santurkar_lp
  import santurkar_vgg
  # The smoke test below trains one variant; here the mapping of every norm
  # to its run (noisy BN gets config.noise; which runs get which
  # instruments), without training.
  config = _config("exp_santurkar_vgg", norms=("none", "bn", "noisy_bn"),
                   ics_norms=("bn", "noisy_bn"), landscape_norms=("none",))
  variants = santurkar_vgg.variants(config)
  assert [(v.label, v.norm, v.ics, v.landscape) for v in variants] == [
      ("Standard", "none", False, True), ("Standard + BN", "bn", True, False),
      ("BN + noise", "noisy_bn", True, False)]
  assert variants[0].norm_kwargs is None and variants[1].norm_kwargs is None
  assert variants[2].norm_kwargs == {
      "noise_mean_range": (-1.0, 1.0), "noise_std_range": (0.5, 1.5)}
  config = _config("exp_santurkar_lp")
  assert [(v.label, v.norm, v.norm_kwargs)
          for v in santurkar_lp.variants(config)] == [
              ("BN", "bn", None), ("l_1", "lp", {"p": 1.0}),
              ("l_2", "lp", {"p": 2.0}), ("l_inf", "lp", {"p": math.inf})]


def test_santurkar_vgg_and_lp_smoke(tmp_path):
  import santurkar_lp
  import santurkar_vgg
  # Training, pre-activation capture, evaluation and plots of the conv
  # scripts; the instruments (ICS, landscape) run in the DLN smoke test above
  # (same train_and_measure code): compiling them for a VGG takes minutes.
  # One-channel conv layers: every kernel has one shape, initialized once.
  tiny = dict(dataset="digits", num_train_steps=2, chunk_steps=2,
              num_points=2, probe_size=16, batch_size=8, eval_batch_size=64,
              train_subset=64, test_subset=64,
              **{"model_kwargs.width_multiplier": 1e-3})
  config = _config("exp_santurkar_vgg", norms=("noisy_bn",), ics_norms=(),
                   landscape_norms=(), **tiny)
  out = santurkar_vgg.run_experiment(config, str(tmp_path / "vgg"))
  summary = out["summary"]["BN + noise"]
  assert summary["landscape"] == {} and summary["ics"] == []
  assert set(summary["stability"]) == {f"conv_{i}/preact" for i in range(8)}
  assert (tmp_path / "vgg" / "stability.png").stat().st_size > 0
  config = _config("exp_santurkar_lp", ps=(math.inf,), include_bn=False,
                   **tiny)
  out = santurkar_lp.run_experiment(config, str(tmp_path / "lp"))
  # Excess kurtosis E[z^4]/E[z^2]^2 - 3 >= -2 for any distribution
  # (Jensen: E[z^4] >= E[z^2]^2), with equality only for two points.
  kurtosis = out["summary"]["l_inf"]["final_mean_excess_kurtosis"]
  assert math.isfinite(kurtosis) and kurtosis >= -2.0


def test_santurkar_noise_smoke(tmp_path):
  import ml_collections
  import santurkar_noise
  # Known case: noisy BN with zero noise (additive m = s = 0) is BN, step
  # for step, so its accuracy and every drift equal BN's run up to float32
  # rounding. (A setting that did not reach the layer would leave the
  # default noise on, m ~ U(-1, 1), and move the drifts by O(0.1).)
  setting = lambda form, m, s: dict(noise_form=form, noise_mean_range=m,
                                    noise_std_range=s)
  config = _config(
      "exp_santurkar_noise", norms=("bn",), dataset="digits",
      num_train_steps=2, chunk_steps=2, num_points=2, probe_size=16,
      batch_size=8, eval_batch_size=64, train_subset=64, test_subset=64,
      **{"model_kwargs.width_multiplier": 1e-3})
  config.noise_settings = ml_collections.ConfigDict(dict(
      zero=setting("additive", (0.0, 0.0), (0.0, 0.0))))
  out = santurkar_noise.run_experiment(config, str(tmp_path))
  labels = list(out["summary"])
  assert labels == ["Standard + BN", "additive m~U(0,0) s~U(0,0)"]
  bn, zero = (out["summary"][k] for k in labels)
  # Not bit for bit: the two are different programs (noisy BN draws its
  # zero noise and applies it), which XLA may round differently in the last
  # bits (observed: drifts differing by up to 2.4e-7 with XLA:CPU's legacy
  # fusion emitters, equal with its default ones). The drifts are float32
  # statistics of O(1)-normalized pre-activations after 2 steps: 2e-5 is
  # ~80x that, and 4e-5 of what the default noise changes (0.51 against
  # 0.0031 for the first layer's mean drift). One of the 64 test digits may
  # flip on a near-tie of two logits.
  assert abs(zero["final_test_accuracy"] - bn["final_test_accuracy"]) <= (
      1 / 64 + 1e-9)
  assert zero["stability"].keys() == bn["stability"].keys()
  for layer, drifts in bn["stability"].items():
    for key, value in drifts.items():
      assert zero["stability"][layer][key] == pytest.approx(
          value, rel=0, abs=2e-5), (layer, key)
  for key in ("mean_drift", "std_drift"):
    assert zero[key] == pytest.approx(bn[key], rel=0, abs=2e-5), key
  # mean_drift / std_drift: the plain mean over the tracked layers.
  assert bn["mean_drift"] == pytest.approx(np.mean(
      [v["mean_drift_over_std0"] for v in bn["stability"].values()]))
  assert bn["std_drift"] == pytest.approx(np.mean(
      [v["std_drift_over_std0"] for v in bn["stability"].values()]))
  assert (tmp_path / "noise.png").stat().st_size > 0
  # The default settings' labels and forms (what REPRODUCTION.md quotes).
  default = santurkar_noise.variants(_config("exp_santurkar_noise"))
  assert [(v.label, v.norm) for v in default] == [
      ("Standard", "none"), ("Standard + BN", "bn"),
      ("additive m~U(-0.1,0.1) s~U(0,0.1)", "noisy_bn"),
      ("additive m~U(-0.25,0.25) s~U(0,0.25)", "noisy_bn"),
      ("additive m~U(-0.5,0.5) s~U(0,0.5)", "noisy_bn"),
      ("affine m~U(-0.25,0.25) s~U(0.75,1.25)", "noisy_bn"),
      ("affine m~U(-1,1) s~U(0.5,1.5)", "noisy_bn")]


def test_seed_summary_statistics_match_numpy(tmp_path):
  """``--seeds``: every numeric leaf of the per-seed summaries gets its
  values, mean, sample std (ddof=1), min and max; strings/bools skipped;
  a path missing from one seed is summarized over the seeds that have it."""
  summaries = {
      0: {"A": {"acc": 0.5, "status": "ok", "curve": [1.0, 2.0]},
          "flag": True},
      1: {"A": {"acc": 0.7, "status": "ok", "curve": [3.0, 5.0]},
          "flag": False},
      2: {"A": {"acc": 0.9, "status": "diverged", "curve": [2.0, 8.0],
                "extra": 4}, "flag": True},
  }
  out = common.write_seed_summary(str(tmp_path), "toy", summaries)
  stats = out["stats"]
  assert set(stats) == {"A/acc", "A/curve/0", "A/curve/1", "A/extra"}
  acc = np.array([0.5, 0.7, 0.9])
  assert stats["A/acc"]["values"] == pytest.approx(acc.tolist())
  assert stats["A/acc"]["mean"] == pytest.approx(0.7)
  assert stats["A/acc"]["std"] == pytest.approx(np.sqrt(
      ((acc - 0.7) ** 2).sum() / 2))
  assert (stats["A/curve/1"]["min"], stats["A/curve/1"]["max"]) == (2.0, 8.0)
  assert stats["A/extra"]["seeds"] == [2] and stats["A/extra"]["std"] == 0.0
  written = json.load(open(tmp_path / "seeds.json"))
  assert written["seeds"] == [0, 1, 2]
  md = (tmp_path / "seeds.md").read_text()
  assert "| A/acc | 0.7 | 0.2 | 0.5 | 0.9 | 0.5, 0.7, 0.9 |" in md
  assert "curve" not in md  # list items only in seeds.json


def test_sweep_runs_every_value_and_reads_finished_seeds_back(tmp_path):
  """``--sweep``/``--seeds``: one run per (value, seed) in its own folder;
  a seed folder written with the same config is read back (not rerun) with
  the summary recomputed; sweep.json/.md hold each value's mean and sample
  std over the seeds."""
  import ml_collections
  config = ml_collections.ConfigDict(dict(
      seed=0, learning_rate=0.1, noise=dict(scale=(0.0, 1.0))))
  calls = []

  def experiment(config, workdir):  # accuracy = lr * (seed + 1)
    calls.append((config.learning_rate, config.seed))
    out = {"config": common.to_dict(config),
           "summary": {"A": {"acc": config.learning_rate * (config.seed + 1)}}}
    common.write_json(os.path.join(workdir, "results.json"), out)
    return out

  key, values = common.parse_sweep("learning_rate=0.1, 0.3", config)
  assert (key, values) == ("learning_rate", [0.1, 0.3])
  assert common.parse_sweep("noise.scale=(0, 0.5),(0, 1)", config) == (
      "noise.scale", [(0, 0.5), (0, 1)])
  for bad, match in (("learning_rate", "key=v1"), ("lr=0.1", "not a config"),
                     ("learning_rate=0.1,0.1", "distinct")):
    with pytest.raises(ValueError, match=match):
      common.parse_sweep(bad, config)
  assert common.sweep_dirname("noise.scale", (0, 0.5)) == "noise.scale_0_0.5"

  out = common.run_sweep(experiment, config, str(tmp_path), key, values,
                         [0, 1, 2], "toy", ["acc"])
  assert calls == [(lr, s) for lr in (0.1, 0.3) for s in (0, 1, 2)]
  assert (tmp_path / "learning_rate_0.3" / "seed_2" / "results.json").exists()
  for lr in (0.1, 0.3):
    acc = lr * np.array([1.0, 2.0, 3.0])
    st = out["stats"][repr(lr)]["A/acc"]
    assert st["mean"] == pytest.approx(acc.mean())
    assert st["std"] == pytest.approx(acc.std(ddof=1))
  md = (tmp_path / "sweep.md").read_text()
  assert "| A/acc | 0.2 +- 0.1 | 0.6 +- 0.3 |" in md
  assert (tmp_path / "sweep.png").stat().st_size > 0

  # Rerun: nothing trains again; the summary is the resummarized one.
  calls.clear()
  out = common.run_sweep(
      experiment, config, str(tmp_path), key, values, [0, 1, 2], "toy",
      ["acc"], resummarize=lambda r: {"A": {"acc": 2 * r["summary"]["A"][
          "acc"]}})
  assert calls == []
  assert out["stats"]["0.3"]["A/acc"]["mean"] == pytest.approx(1.2)
  # Another config (here a nested field) runs again.
  config.noise.scale = (0.0, 2.0)
  common.run_seeds(experiment, config, str(tmp_path / "learning_rate_0.3"),
                   [1], "toy")
  assert calls == [(0.3, 1)]
