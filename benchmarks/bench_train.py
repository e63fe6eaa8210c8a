"""Training throughput of ResNet-20 on CIFAR shapes, per normalization.

Measures images/s of the jitted ``train_step`` of ``bn_jax.training`` (SGD
with momentum, random 32x32x3 data, batch 128 by default) for no
normalization, BN, CBN and GN in one run, and, when PyTorch is installed, of
an equivalent ResNet-20 written in PyTorch below (eager, CPU threads =
``os.cpu_count()``; no CBN there: PyTorch has no CBN layer).

  python benchmarks/bench_train.py [--batch_size 128 --steps 10 --warmup 2]

Compilation is excluded (``--warmup`` steps are run first); each timed step
ends with ``block_until_ready`` on the metrics of the last step only, so
dispatch overlaps as it does in ``train.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_jax.models import create_model
from bn_jax.training import base_config, optim, parallel, train_state

NORM_KWARGS = {"cbn": {"window": 4, "burn_in": 0}, "gn": {"num_groups": 8}}


def bench_jax(norm: str, batch_size: int, steps: int, warmup: int) -> float:
  config = base_config()
  config.learning_rate, config.momentum = 0.1, 0.9
  lr_fn = optim.create_learning_rate_fn(config, steps + warmup)
  tx = optim.create_optimizer(config, lr_fn)
  model = create_model("resnet20", num_classes=10, norm=norm,
                       norm_kwargs=NORM_KWARGS.get(norm))
  state = train_state.create_train_state(jax.random.PRNGKey(0), model, tx,
                                         (batch_size, 32, 32, 3))
  fns = parallel.make_step_functions(lr_fn, data_parallel=False)
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      "image": rng.standard_normal((batch_size, 32, 32, 3), np.float32),
      "label": rng.integers(0, 10, batch_size).astype(np.int32),
      "mask": np.ones(batch_size, bool)})
  for _ in range(warmup):
    state, metrics = fns.train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = fns.train_step(state, batch)
  jax.block_until_ready(metrics)
  return steps * batch_size / (time.perf_counter() - start)


def torch_resnet20(norm: str):
  """ResNet-20 (option A shortcuts, as bn_jax.models' 'resnet20')."""
  import torch
  from torch import nn

  def make_norm(c):
    if norm == "bn":
      return nn.BatchNorm2d(c)
    if norm == "gn":
      return nn.GroupNorm(8, c)
    return nn.Identity()

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
      self.n1 = make_norm(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
      self.n2 = make_norm(cout)
      self.pad = cout - cin
      self.stride = stride

    def forward(self, x):
      y = torch.relu(self.n1(self.conv1(x)))
      y = self.n2(self.conv2(y))
      shortcut = x[:, :, ::self.stride, ::self.stride]
      if self.pad:
        shortcut = nn.functional.pad(
            shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
      return torch.relu(y + shortcut)

  layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=norm == "none"), make_norm(16),
            nn.ReLU()]
  cin = 16
  for i, width in enumerate((16, 32, 64)):
    for j in range(3):
      layers.append(Block(cin, width, 2 if (j == 0 and i > 0) else 1))
      cin = width
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
  return nn.Sequential(*layers)


def bench_torch(norm: str, batch_size: int, steps: int, warmup: int) -> float:
  import torch
  torch.manual_seed(0)
  model = torch_resnet20(norm).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  x = torch.randn(batch_size, 3, 32, 32)
  y = torch.randint(0, 10, (batch_size,))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss

  for _ in range(warmup):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  loss.item()
  return steps * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--norms", default="none,bn,cbn,gn")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--json", default="", help="also write results here")
  args = parser.parse_args()

  rows = []
  for norm in args.norms.split(","):
    row = {"norm": norm,
           "jax_images_per_sec": bench_jax(norm, args.batch_size, args.steps,
                                           args.warmup)}
    if not args.no_torch and norm != "cbn":
      try:
        import torch  # noqa: F401
        torch.set_num_threads(os.cpu_count())
        row["torch_images_per_sec"] = bench_torch(norm, args.batch_size,
                                                  args.steps, args.warmup)
      except ImportError:
        pass
    rows.append(row)
    print(row, flush=True)

  machine = (f"{platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU cores, JAX {jax.__version__} on "
             f"{jax.devices()[0].platform}")
  print(f"\nResNet-20 train step, batch {args.batch_size}, 32x32x3 random "
        f"data, {args.steps} timed steps after {args.warmup} warm-up; "
        f"{machine}\n")
  print("| norm | bn_jax (JAX) images/s | PyTorch images/s |")
  print("|---|---|---|")
  for r in rows:
    t = r.get("torch_images_per_sec")
    print(f"| {r['norm']} | {r['jax_images_per_sec']:.0f} | "
          f"{'-' if t is None else f'{t:.0f}'} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine, "args": vars(args), "rows": rows}, f,
                indent=2)


if __name__ == "__main__":
  main()
