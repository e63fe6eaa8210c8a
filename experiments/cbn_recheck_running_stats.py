"""One-off check for REPRODUCTION.md section 4: are the low CBN accuracies at
batch 32/16 due to the running (EMA) statistics?

Retrains one run of experiments/cbn_small_batch.py exactly as the sweep does
(same config, seed, steps; it reproduces the sweep's test accuracy), then
evaluates it (a) with its running statistics, as the sweep does, and (b) with
running statistics re-estimated for the FINAL weights: 300 train-mode
forwards on training batches of the run's batch size (params frozen, EMA
momentum as configured). Prints both and the relative change of every
layer's running mean/var.

  python experiments/cbn_recheck_running_stats.py cbn 32
"""
import os
import runpy
import sys

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(_ROOT, "experiments"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cbn_small_batch as exp  # noqa: E402
from bn_jax.training import input_pipeline, loop  # noqa: E402

NUM_REESTIMATION_STEPS = 300


def main(method: str, batch_size: int) -> None:
  config = runpy.run_path(os.path.join(_ROOT, "configs",
                                       "exp_cbn_small_batch.py"))["get_config"]("cpu")
  train_ds, test_ds = exp.load_data(config)
  spec = next(s for s in exp.run_specs(config)
              if s.name == f"{method}_b{batch_size}")
  model, state, lr_fn, tconfig, num_steps, _, _ = exp.init_run(config, spec,
                                                               train_ds)
  step_fns = loop.step_functions(lr_fn)
  state = loop.train_loop(
      step_fns.train_step, state,
      input_pipeline.train_iterator(train_ds, tconfig), end_step=num_steps,
      sync_every=config.log_every).state
  evaluate = lambda st: loop.evaluate(
      step_fns.eval_step, st, input_pipeline.eval_iterator(test_ds, tconfig))
  print(method, batch_size, "running stats:", evaluate(state))

  @jax.jit
  def forward(batch_stats, images):
    _, updates = model.apply({"params": state.params,
                              "batch_stats": batch_stats}, images, train=True,
                             mutable=["batch_stats"])
    return updates["batch_stats"]

  batch_stats = state.batch_stats
  batches = input_pipeline.train_iterator(train_ds, tconfig)
  for _ in range(NUM_REESTIMATION_STEPS):
    batch_stats = forward(batch_stats, next(batches)["image"])
  print(method, batch_size, "re-estimated stats:",
        evaluate(state.replace(batch_stats=batch_stats)))
  new = dict(jax.tree_util.tree_leaves_with_path(batch_stats))
  for path, old in jax.tree_util.tree_leaves_with_path(state.batch_stats):
    key = jax.tree_util.keystr(path)
    if key.endswith("['mean']") or key.endswith("['var']"):
      change = jnp.linalg.norm(old - new[path]) / jnp.linalg.norm(new[path])
      print(f"{key} relative change {float(change):.3f}")


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
