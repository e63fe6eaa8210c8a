r"""Experiment 2: BN paper, learning rates (Ioffe & Szegedy 2015, Sec. 4.2).

  python experiments/bn_learning_rates.py [--workdir DIR] [--scale cpu|paper] \
      [--config.runs="('none/relu/x1','bn/relu/x5')"] [--config.key=...]

The paper's Inception protocol (baseline vs BN at x1/x5/x30 the learning rate,
and BN with sigmoid) transferred to the MNIST MLP of experiment 1; see
``configs/exp_bn_lr.py``. For every run: test accuracy every ``eval_every``
steps, the best test accuracy, and the steps to reach the baseline's best
accuracy (the paper's "steps to 72.2%").

Writes ``results.json``, ``test_accuracy.png`` and ``results.md`` (the
table, next to the paper's Inception numbers) into ``--workdir``.
"""
from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import bn_mnist  # noqa: E402
import common  # noqa: E402
from bn_jax.training import loop  # noqa: E402

# PAPERS.md section 1 (ImageNet, Inception): steps to 72.2% / max accuracy.
PAPER_INCEPTION = {
    "none/relu/x1": ("Inception", "31.0M", "72.2%"),
    "bn/relu/x1": ("BN-Baseline", "13.3M", "72.7%"),
    "bn/relu/x5": ("BN-x5", "2.1M", "73.0%"),
    "bn/relu/x30": ("BN-x30", "2.7M", "74.8%"),
    "bn/sigmoid/x5": ("BN-x5-Sigmoid", "-", "69.8%"),
    "none/sigmoid/x5": ("Inception-Sigmoid (no BN)",
                        "-", "does not train (PAPERS.md §1)"),
}


def parse_run(spec: str) -> tuple[str, str, float]:
  """``'bn/relu/x5'`` -> ``('bn', 'relu', 5.0)``."""
  parts = spec.split("/")
  if len(parts) != 3 or not parts[2].startswith("x"):
    raise ValueError(f"config.runs entries must look like "
                     f"'<norm>/<activation>/x<multiplier>', got {spec!r}.")
  try:
    multiplier = float(parts[2][1:])
  except ValueError as e:
    raise ValueError(f"config.runs entry {spec!r}: the multiplier after 'x' "
                     f"must be a number.") from e
  if multiplier <= 0:
    raise ValueError(f"config.runs entry {spec!r}: multiplier must be > 0.")
  return parts[0], parts[1], multiplier


def train_one(config, spec: str, data) -> dict:
  norm, activation, multiplier = parse_run(spec)
  lr = config.base_learning_rate * multiplier
  run = bn_mnist.mlp_run(config, data, norm=norm, activation=activation,
                         learning_rate=lr)
  steps, accs = [0], [run.evaluate()["test_accuracy"]]
  t0 = time.perf_counter()
  for _ in run.train_chunks(config.num_train_steps, config.chunk_steps):
    if loop.is_due(run.step, config.eval_every, config.num_train_steps):
      steps.append(run.step)
      accs.append(run.evaluate()["test_accuracy"])
  wall = time.perf_counter() - t0
  common.log(f"[{spec}] lr {lr:g}: {run.status}, max test acc "
             f"{max(accs):.4f}, final {accs[-1]:.4f}, {wall:.0f}s")
  return {"norm": norm, "activation": activation, "multiplier": multiplier,
          "learning_rate": lr, "status": run.status, "steps": steps,
          "test_accuracy": accs, "max_test_accuracy": max(accs),
          "final_test_accuracy": accs[-1],
          "step_of_max": steps[accs.index(max(accs))],
          "wall_seconds": wall, "seconds_per_step": run.seconds_per_step()}


def table(results: dict, config, target: float) -> str:
  rows = ["| run | lr | steps to target | max test acc | final | status "
          "| paper (Inception, ImageNet): name, steps to 72.2%, max |",
          "|---|---|---|---|---|---|---|"]
  for spec, r in results.items():
    paper = PAPER_INCEPTION.get(spec)
    reach = r["steps_to_target"]
    rows.append(
        f"| {spec} | {r['learning_rate']:g} | "
        f"{'never' if reach is None else reach} | "
        f"{r['max_test_accuracy']:.4f} | {r['final_test_accuracy']:.4f} | "
        f"{r['status']} | {', '.join(paper) if paper else '(our control)'} |")
  return (f"Target: the baseline's ({config.baseline}) best test accuracy "
          f"{target:.4f}; {config.num_train_steps} steps, batch "
          f"{config.batch_size}, eval every {config.eval_every} steps.\n\n"
          + "\n".join(rows) + "\n")


def plot(results: dict, target: float, workdir: str) -> str:
  fig, axes = common.figure(2, width=5.0)
  for spec, r in results.items():
    style = "-" if r["norm"] == "bn" else "--"
    for ax in axes[0]:
      ax.plot(r["steps"], r["test_accuracy"], style, label=spec)
  axes[0, 0].set_ylim(0.0, 1.0)
  axes[0, 1].set_ylim(max(target - 0.03, 0.0), min(target + 0.015, 1.0))
  axes[0, 1].set_title("zoom (dotted: target)")
  for ax in axes[0]:
    ax.axhline(target, color="k", ls=":", lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  axes[0, 0].set_title("MNIST MLP: BN-paper learning-rate protocol")
  return common.save(fig, os.path.join(workdir, "test_accuracy.png"))


def run_experiment(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  specs = list(config.runs)
  for spec in specs:
    parse_run(spec)  # fail on a bad entry before any work
  if config.baseline not in specs:
    raise ValueError(f"config.baseline={config.baseline!r} must be one of "
                     f"config.runs {specs}.")
  specs.remove(config.baseline)
  specs.insert(0, config.baseline)  # its best accuracy is the target
  data = bn_mnist.setup_data(config)
  results = {spec: train_one(config, spec, data) for spec in specs}
  target = results[config.baseline]["max_test_accuracy"]
  for r in results.values():
    r["steps_to_target"] = common.steps_to_reach(r["steps"],
                                                 r["test_accuracy"], target)
  md = table(results, config, target)
  out = {"experiment": "bn_learning_rates", "config": common.to_dict(config),
         "target_accuracy": target, "results": results,
         "paper_inception": PAPER_INCEPTION}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("# BN paper learning-rate protocol on the MNIST MLP\n\n" + md)
  plot(results, target, workdir)
  return common.save_results(workdir, out, t0, summary=[md])


if __name__ == "__main__":
  common.run_script("bn_learning_rates", "exp_bn_lr.py", run_experiment)
