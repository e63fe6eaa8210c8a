"""The README's claims about ``python train.py``, run as the user runs it (a
subprocess, flags only, so the tests do not depend on train.py's internals):

- with no arguments it trains configs/default.py into ./workdir/default
  (checkpoints, metrics.jsonl, TensorBoard events per norm);
- killed (SIGKILL) mid-run and restarted with the same command, it resumes
  and its final results equal an uninterrupted run's;
- resuming is bit-identical on the real image pipeline with augmentation,
  with noisy BN (which draws noise every step) and data parallel over 8
  simulated devices (SyncBN).
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")

# The default job made tiny: one norm of each of its two parts (BN in
# 'bn_paper'; CBN in 'small_batch', whose window of past statistics is part
# of the resumed state), 20 steps each, checkpoints and logs every 5 steps
# (so a restart resumes on a log boundary).
_SMALL_PART = "--config.parts.small_batch."
_SMALL_DEFAULT = [
    "--config.norms=('bn',)", "--config.num_train_steps=20",
    "--config.model_kwargs.hidden=(16,16)",
    "--config.checkpoint_every=5", "--config.log_every=5",
    "--config.eval_every=10",
    f"{_SMALL_PART}norms=('cbn',)", f"{_SMALL_PART}num_train_steps=20",
    f"{_SMALL_PART}checkpoint_every=5", f"{_SMALL_PART}log_every=5",
    f"{_SMALL_PART}eval_every=10", f"{_SMALL_PART}norm_kwargs.cbn.burn_in=5",
    "--config.precise_bn_samples=256", "--config.progress_bar=False",
    "--config.plots=False",
    # The suite's compilation cache (conftest.py; '' = off), not the user's
    # ~/.cache: a restarted run loads what the killed one compiled.
    f"--compilation_cache={os.environ.get('JAX_COMPILATION_CACHE_DIR', '')}"]
# Timings differ between runs; every other result must be identical.
_TIMING_KEYS = ("examples_per_sec", "train_seconds")


def _env(devices=None, unoptimized=False):
  """The user's environment with one device (or ``devices`` simulated ones);
  the other XLA flags the suite runs under (e.g. --xla_cpu_max_isa) stay.
  ``unoptimized``: programs compiled without most XLA optimizations (for
  time, where runs are compared with runs under the same setting)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  if unoptimized:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  return env


def _run(args, cwd, timeout=300, env=None):
  result = subprocess.run([sys.executable, TRAIN, *args], cwd=str(cwd),
                          env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _start(args, cwd, env=None):
  return subprocess.Popen([sys.executable, TRAIN, *args], cwd=str(cwd),
                          env=env or _env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)


def _kill_when(process, ready, timeout=300):
  """SIGKILLs ``process`` as soon as ``ready()`` holds (polled every 10 ms);
  fails if it exits first."""
  deadline = time.monotonic() + timeout
  while not ready():
    assert process.poll() is None, "the run ended before it could be killed"
    assert time.monotonic() < deadline, "timed out waiting to kill the run"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL


def _logged_steps(path):
  if not path.is_file():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)["step"])
    except ValueError:  # a line cut by the kill
      pass
  return steps


def _results_without_timings(workdir):
  rows = json.loads((workdir / "results.json").read_text())["results"]
  return [{k: v for k, v in row.items() if k not in _TIMING_KEYS}
          for row in rows]


# Slow (a subprocess importing JAX and compiling the default MLP, killed
# after its first evaluation): the README's first command, run as written.
def test_no_arguments_trains_the_default_config_into_workdir_default(
    tmp_path):
  """`python train.py` exactly as the README runs it, in an empty directory:
  configs/default.py's first part's first norm ('none') trains in
  ./workdir/default/bn_paper/none,
  logging every 50 steps (train loss) and evaluating every 100 steps into
  metrics.jsonl, with TensorBoard events beside it. (The whole job takes
  minutes on 2 cores: the run is killed after its first evaluation; the
  checkpoints, the resume and the results files are tested below with fewer
  steps given by flags.)"""
  run_dir = tmp_path / "workdir" / "default" / "bn_paper" / "none"
  process = _start([], tmp_path)
  try:
    _kill_when(process, lambda: len(_logged_steps(
        run_dir / "metrics.jsonl")) >= 3)
  finally:
    if process.poll() is None:
      process.kill()
  records = [json.loads(l) for l in
             (run_dir / "metrics.jsonl").read_text().splitlines()[:3]]
  # default.py: log_every=50, eval_every=100; 355 test digits.
  assert [r["step"] for r in records] == [50, 100, 100]
  assert "train_loss" in records[0] and "train_loss" in records[1]
  assert records[2]["test_examples"] == 355
  assert list((run_dir / "tensorboard").glob("**/events.out.tfevents.*"))
  assert sorted(os.listdir(tmp_path / "workdir")) == ["default"]


# The slowest test (~60 s: three train.py processes, 2 norms x 20 steps):
# the README's promise that a SIGKILLed job resumes to identical results can
# only be checked by killing a real process and comparing with a clean run.
def test_killed_and_restarted_run_equals_an_uninterrupted_one(tmp_path):
  """The default job (fewer steps and norms by flags), SIGKILLed while its
  second part's 'cbn' trains, then restarted with the same command: it
  resumes ('bn' is not retrained, 'cbn' continues from its last checkpoint)
  and its results equal those of a run never interrupted, to the last bit;
  results.md/json, and per norm checkpoints, metrics.jsonl (each step once)
  and TensorBoard events are where the README says."""
  interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
  args = [f"--workdir={interrupted}", *_SMALL_DEFAULT]
  bn_dir, cbn_dir = "bn_paper/bn", "small_batch/cbn"
  cbn_metrics = interrupted / cbn_dir / "metrics.jsonl"
  # All three runs compile without XLA's optimizations (for time; the same
  # programs in each run, so "to the last bit" still holds).
  env = _env(unoptimized=True)
  process = _start(args, tmp_path, env=env)
  try:
    _kill_when(process, lambda: any(s >= 10 for s in _logged_steps(
        cbn_metrics)))
  finally:
    if process.poll() is None:
      process.kill()
  assert (interrupted / bn_dir / "summary.json").is_file()
  assert not (interrupted / cbn_dir / "summary.json").is_file()  # mid-run
  assert not (interrupted / "results.json").exists()
  bn_checkpoints = sorted(os.listdir(interrupted / bn_dir / "checkpoints"))
  _run(args, tmp_path, env=env)
  # 'bn' was finished: nothing retrained, its checkpoints untouched.
  assert sorted(os.listdir(interrupted / bn_dir / "checkpoints")) == \
      bn_checkpoints
  _run([f"--workdir={straight}", *_SMALL_DEFAULT], tmp_path, env=env)
  resumed_rows = _results_without_timings(interrupted)
  assert [(r["part"], r["norm"]) for r in resumed_rows] == [
      ("bn_paper", "bn"), ("small_batch", "cbn")]
  assert all(r["status"] == "ok" and r["steps"] == 20 for r in resumed_rows)
  assert resumed_rows == _results_without_timings(straight)
  assert (interrupted / "results.md").is_file()
  for norm in (bn_dir, cbn_dir):
    run_dir = interrupted / norm
    assert os.listdir(run_dir / "checkpoints")
    assert list((run_dir / "tensorboard").glob("**/events.out.tfevents.*"))
    # Each step logged once, as in the straight run, although 'cbn'
    # trained the steps after its last checkpoint twice.
    assert _logged_steps(run_dir / "metrics.jsonl") == _logged_steps(
        straight / norm / "metrics.jsonl")


_RESUME_SCRIPT = r"""
import importlib.util, json, sys
import jax, numpy as np
import ml_collections
from ml_collections import config_flags  # noqa: F401 (train.py's flags)
spec = importlib.util.spec_from_file_location("train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
spec = importlib.util.spec_from_file_location("default", sys.argv[2])
default = importlib.util.module_from_spec(spec)
spec.loader.exec_module(default)
workdir = sys.argv[3]
assert jax.local_device_count() == 8, jax.devices()
config = default.get_config()
config.unlock()
config.parts = ml_collections.ConfigDict()  # train_and_evaluate: one run
config.update(dict(norms=("noisy_bn",), augment=True, data_parallel=True,
                   batch_size=16, num_train_steps=4, checkpoint_every=2,
                   log_every=2, eval_every=4, precise_bn_samples=0,
                   progress_bar=False, plots=False))
config.model_kwargs.hidden = (16, 16)
first, _ = train.train_and_evaluate(config, workdir + "/a", stop_after_steps=2)
assert int(jax.device_get(first.step)) == 2
resumed, _ = train.train_and_evaluate(config, workdir + "/a")
straight, _ = train.train_and_evaluate(config, workdir + "/b")
same = {}
for name in ("params", "batch_stats", "opt_state", "rng", "step"):
  a, b = (jax.device_get(getattr(s, name)) for s in (resumed, straight))
  same[name] = all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
print("RESULT " + json.dumps(same))
"""


# Slow (~25 s: a process with 8 simulated devices, 3 short runs): resume on
# the paths a single-device MLP run does not take (crops/flips, noise keys,
# sharded state), the README's claim for real training jobs.
def test_resume_is_bit_identical_with_augmentation_noise_and_8_devices(
    tmp_path):
  """Digits through the image pipeline with random crop + flip, noisy BN
  (noise redrawn every step) and data parallel SyncBN over 8 simulated CPU
  devices (SyncBN): 2 steps, stop (with a checkpoint), resume to 4 == 4
  steps uninterrupted, bit for bit (params, statistics, optimizer state,
  key). (That the noise and the crops are drawn from the step's key is
  tested in test_nn_modules and test_data; a resume that replayed other
  keys or other crops would differ here.)"""
  result = subprocess.run(
      [sys.executable, "-c", _RESUME_SCRIPT, TRAIN,
       str(REPO / "configs" / "default.py"), str(tmp_path)],
      cwd=str(tmp_path), env=_env(devices=8, unoptimized=True),
      capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  same = json.loads(line[-1][len("RESULT "):])
  assert same == {"params": True, "batch_stats": True, "opt_state": True,
                  "rng": True, "step": True}
