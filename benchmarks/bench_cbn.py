r"""Cost of Cross-Iteration BN in a CIFAR ResNet-20 train step (CPU).

What is timed: one SGD train step under ``jax.jit`` (forward, backward,
parameter update and the new ``batch_stats``; params and state donated) of
``bn_jax.models.create_model('resnet20', norm=..., num_classes=10)`` on
32x32x3 inputs, for

  * ``bn``: BatchNorm;
  * ``cbn_k4`` / ``cbn_k8``: ConvCBN with window 4 / 8, ``burn_in=0`` (the
    window is active and entries are recorded every step, the steady state);
  * ``cbn_k8_burnin``: ConvCBN k=8 during the early burn-in (normalizes as BN,
    but still computes the compensated statistics and writes the window
    slot). On GPU/TPU the Jacobians are skipped there by ``lax.cond``; on
    CPU they are computed and discarded (XLA:CPU runs convolutions inside a
    ``cond`` branch ~25x slower, see ``bn_jax.core.platform.compute_if``), so
    on CPU this costs about what ``cbn_k8`` costs;
  * ``cbn_k8_nocg``: ``cbn_k8`` with ``compensation_grad=False`` (the
    official gradient). The other CBN rows use the default
    ``compensation_grad=True``: the gradient through the compensation,
    elementwise work over the window in the backward pass (no extra
    convolution), and a copy of the two Jacobian buffers (the backward reads
    the old ones after the forward wrote this step's slot): ``temp MB`` grows
    by ``2 (k-1) |W|``.

Repetitions are interleaved (each configuration once per round, rotating
order) so machine load hits all alike; printed are the median ms per step and
the median over rounds of the per-round ratio to ``bn``, for the wall time
and for the process CPU time (steadier on a shared machine).

Memory: ``compiled.memory_analysis()`` of the jitted step (argument, output
and temp bytes), and the bytes of the CBN window in ``batch_stats`` compared
with ``3 (k-1) |conv weights|`` (theta and both Jacobians per past step).

Usage::

  python benchmarks/bench_cbn.py           # batch 4 and 32
  python benchmarks/bench_cbn.py --quick   # fewer rounds
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax.models import create_model

WINDOW_FIELDS = ("window_weight", "window_mean", "window_var",
                 "window_dmean", "window_dvar")


def _configs():
  return {
      "bn": ("bn", None),
      "cbn_k4": ("cbn", {"window": 4, "burn_in": 0}),
      "cbn_k8": ("cbn", {"window": 8, "burn_in": 0}),
      "cbn_k8_burnin": ("cbn", {"window": 8, "burn_in": 10**6}),
      "cbn_k8_nocg": ("cbn", {"window": 8, "burn_in": 0,
                              "compensation_grad": False}),
  }


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _window_bytes(batch_stats):
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
    if getattr(path[-1], "key", None) in WINDOW_FIELDS:
      total += leaf.size * leaf.dtype.itemsize
  return total


def _conv_kernel_bytes(params):
  total = 0
  for _, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if leaf.ndim == 4:  # HWIO conv kernels (the Dense head is 2-D)
      total += leaf.size * leaf.dtype.itemsize
  return total


def _build(norm, norm_kwargs, batch):
  model = create_model("resnet20", norm=norm, norm_kwargs=norm_kwargs,
                       num_classes=10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)

  def train_step(params, batch_stats, x, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, x, train=True,
          mutable=["batch_stats"])
      logp = jax.nn.log_softmax(logits)
      loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
      return loss, updates["batch_stats"]

    grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
    return params, new_stats

  params, stats = variables["params"], variables["batch_stats"]
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      params, stats, x, labels).compile()
  return compiled, params, stats, x, labels


class Runner:
  """Holds one configuration's compiled step and its (donated) state."""

  def __init__(self, name, norm, norm_kwargs, batch):
    self.name = name
    t0 = time.perf_counter()
    (self.step, params, stats, self.x, self.labels) = _build(
        norm, norm_kwargs, batch)
    self.compile_s = time.perf_counter() - t0
    self.window_bytes = _window_bytes(stats)
    self.conv_bytes = _conv_kernel_bytes(params)
    self.stats_bytes = _nbytes(stats)
    self.memory = self.step.memory_analysis()
    # Copies, since the step donates its inputs.
    self.state = (jax.tree.map(jnp.copy, params),
                  jax.tree.map(jnp.copy, stats))
    self.run(10)  # fill the window (k <= 8) and warm up

  def run(self, n):
    params, stats = self.state
    for _ in range(n):
      params, stats = self.step(params, stats, self.x, self.labels)
    jax.block_until_ready(stats)
    self.state = (params, stats)

  def time(self, n):
    """(wall, process CPU) seconds per step. On a shared machine the CPU
    time of this process (all its threads) is the steadier measure of the
    work done; the wall time also counts waiting for a core."""
    t0, c0 = time.perf_counter(), time.process_time()
    self.run(n)
    return ((time.perf_counter() - t0) / n, (time.process_time() - c0) / n)


def bench(batch, rounds, inner):
  runners = [Runner(name, norm, kw, batch)
             for name, (norm, kw) in _configs().items()]
  times = {r.name: [] for r in runners}
  cpu_times = {r.name: [] for r in runners}
  for i in range(rounds):
    order = runners[i % len(runners):] + runners[:i % len(runners)]
    for r in order:
      wall, cpu = r.time(inner)
      times[r.name].append(wall)
      cpu_times[r.name].append(cpu)
  print(f"\nbatch {batch}: median ms/step over {rounds} rounds x {inner} "
        "steps (ratio = median of per-round ratios to bn; cpu = process CPU "
        f"time); load average {os.getloadavg()[0]:.1f}")
  print(f"{'config':<15}{'ms/step':>9}{'x bn':>7}{'cpu ms':>9}{'cpu x bn':>9}"
        f"{'temp MB':>9}"
        f"{'args MB':>9}{'window MB':>11}{'3(k-1)|W| MB':>14}{'compile s':>11}")
  for r in runners:
    ratio = statistics.median(
        a / b for a, b in zip(times[r.name], times["bn"]))
    cpu_ratio = statistics.median(
        a / b for a, b in zip(cpu_times[r.name], cpu_times["bn"]))
    k = (_configs()[r.name][1] or {}).get("window", 1)
    bound = 3 * (k - 1) * r.conv_bytes
    mem = r.memory
    print(f"{r.name:<15}{1e3 * statistics.median(times[r.name]):>9.2f}"
          f"{ratio:>7.3f}{1e3 * statistics.median(cpu_times[r.name]):>9.2f}"
          f"{cpu_ratio:>9.3f}{mem.temp_size_in_bytes / 2**20:>9.2f}"
          f"{mem.argument_size_in_bytes / 2**20:>9.2f}"
          f"{r.window_bytes / 2**20:>11.3f}{bound / 2**20:>14.3f}"
          f"{r.compile_s:>11.1f}")
  base = runners[0]
  for r in runners[1:]:
    k = _configs()[r.name][1]["window"]
    extra_args = (r.memory.argument_size_in_bytes -
                  base.memory.argument_size_in_bytes)
    extra_temp = r.memory.temp_size_in_bytes - base.memory.temp_size_in_bytes
    small = r.window_bytes - 3 * (k - 1) * r.conv_bytes
    print(f"  {r.name}: window - 3(k-1)|W| = {small} B (the O(kC) "
          f"statistics); args +{extra_args / 2**20:.3f} MB, temp "
          f"{extra_temp / 2**20:+.3f} MB vs bn")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batches", type=int, nargs="+", default=[4, 32])
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
  for batch in args.batches:
    rounds = 3 if args.quick else 7
    inner = (3 if batch > 8 else 10) if args.quick else (
        5 if batch > 8 else 20)
    bench(batch, rounds, inner)


if __name__ == "__main__":
  main()
