"""Where the ResNet-20 train step loses on XLA:CPU: per-convolution times,
XLA against PyTorch (oneDNN), forward / input-gradient / weight-gradient.

  python benchmarks/profile_convs.py [--batch_size 128 --rounds 5]

For each distinct 3x3 convolution of ResNet-20 (CIFAR, batch B, NHWC in
JAX, NCHW in PyTorch as bench_train.py's model), timed in interleaved
rounds (each round runs every op of both frameworks once, median over
rounds):

* JAX: ``lax.conv_general_dilated`` (NHWC/HWIO, padding 1) jitted alone;
  the input gradient and the weight gradient each jitted alone through
  ``jax.vjp`` (what XLA emits for the backward pass of the train step).
* PyTorch: ``F.conv2d`` and ``aten.convolution_backward`` with only the
  input or only the weight gradient requested (what autograd calls), with
  ``torch.set_num_threads(os.cpu_count())``.

``per step`` multiplies by how many times each convolution occurs in
ResNet-20 (the stem has no input gradient). Also timed: train-mode BN
forward+backward on the largest activation (bn_jax vs PyTorch), to show
whether the norm or the convolutions carry the gap.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import bn_jax

# (name, H=W of the input, C_in, C_out, stride, occurrences in ResNet-20)
CONVS = (
    ("stem 3->16 @32", 32, 3, 16, 1, 1),
    ("16->16 @32", 32, 16, 16, 1, 6),
    ("16->32 /2 @32", 32, 16, 32, 2, 1),
    ("32->32 @16", 16, 32, 32, 1, 5),
    ("32->64 /2 @16", 16, 32, 64, 2, 1),
    ("64->64 @8", 8, 64, 64, 1, 5),
)


def _conv(x, w, stride):
  return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_ops(b, hw, cin, cout, stride):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, hw, hw, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
  g = jnp.asarray(rng.standard_normal((b, hw // stride, hw // stride, cout)),
                  jnp.float32)
  fwd = jax.jit(lambda x, w: _conv(x, w, stride))
  dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: _conv(x, w, stride), x)[1](
      g)[0])
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: _conv(x, w, stride), w)[1](
      g)[0])
  return {"fwd": lambda: jax.block_until_ready(fwd(x, w)),
          "dx": lambda: jax.block_until_ready(dx(x, w, g)),
          "dw": lambda: jax.block_until_ready(dw(x, w, g))}


def torch_ops(torch, b, hw, cin, cout, stride):
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  x = torch.randn(b, cin, hw, hw)
  w = torch.randn(cout, cin, 3, 3) * 0.1
  g = torch.randn(b, cout, hw // stride, hw // stride)
  backward = torch.ops.aten.convolution_backward

  def grad(mask):
    return lambda: backward(g, x, w, None, [stride] * 2, [1, 1], [1, 1],
                            False, [0, 0], 1, mask)
  return {"fwd": lambda: F.conv2d(x, w, None, stride, 1),
          "dx": grad([True, False, False]), "dw": grad([False, True, False])}


def bn_ops(torch, shape):
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape),
                  jnp.float32)
  state = bn_jax.batch_norm_state(shape[-1])
  scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])

  def loss(x, scale, bias):
    y, _ = bn_jax.batch_norm(x, state, scale, bias, train=True)
    return jnp.sum(y * y)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  ops = {"jax": lambda: jax.block_until_ready(grad(x, scale, bias))}
  if torch is not None:
    xt = torch.randn(shape[0], shape[3], shape[1], shape[2],
                     requires_grad=True)
    wt = torch.ones(shape[3], requires_grad=True)
    bt = torch.zeros(shape[3], requires_grad=True)

    def run():
      y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, True)
      (y * y).sum().backward()
    ops["torch"] = run
  return ops


def _time(fn, inner=3):
  start = time.perf_counter()
  for _ in range(inner):
    fn()
  return (time.perf_counter() - start) / inner


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  try:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(os.cpu_count() or 1)
  except ImportError:
    torch = None
  b = args.batch_size
  ops = {}
  for name, hw, cin, cout, stride, _ in CONVS:
    for kind, fn in jax_ops(b, hw, cin, cout, stride).items():
      ops[("jax", name, kind)] = fn
    if torch is not None:
      for kind, fn in torch_ops(torch, b, hw, cin, cout, stride).items():
        ops[("torch", name, kind)] = fn
  for fw, fn in bn_ops(torch, (b, 32, 32, 16)).items():
    ops[(fw, "BN fwd+bwd 32x32x16", "all")] = fn
  for fn in ops.values():
    fn()  # compile / warm up
  times = {key: [] for key in ops}
  keys = list(ops)
  for r in range(args.rounds):
    for key in keys[r % len(keys):] + keys[:r % len(keys)]:
      times[key].append(_time(ops[key]))
  med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
  print(f"jax {jax.__version__}, torch {torch.__version__ if torch else '-'}"
        f", {os.cpu_count()} CPUs, batch {b}, median of {args.rounds} "
        f"interleaved rounds, load {os.getloadavg()[0]:.1f}\n")
  print("| conv | x | op | XLA ms | PyTorch ms | XLA/PyTorch | XLA ms/step |"
        " PyTorch ms/step |")
  print("|---|---|---|---|---|---|---|---|")
  totals = {"jax": 0.0, "torch": 0.0}
  for name, _, _, _, _, count in CONVS:
    for kind in ("fwd", "dx", "dw"):
      if name.startswith("stem") and kind == "dx":
        continue  # the image needs no gradient
      j = med[("jax", name, kind)]
      t = med.get(("torch", name, kind))
      totals["jax"] += count * j
      totals["torch"] += count * (t or 0.0)
      print(f"| {name} | {count} | {kind} | {j:.2f} | "
            f"{'-' if t is None else f'{t:.2f}'} | "
            f"{'-' if t is None else f'{j / t:.2f}'} | {count * j:.1f} | "
            f"{'-' if t is None else f'{count * t:.1f}'} |")
  print(f"| all 19 convs | | fwd+dx+dw | | | "
        f"{totals['jax'] / max(totals['torch'], 1e-9):.2f} | "
        f"{totals['jax']:.1f} | {totals['torch']:.1f} |")
  for fw in ("jax", "torch"):
    key = (fw, "BN fwd+bwd 32x32x16", "all")
    if key in med:
      print(f"BN fwd+bwd on {b}x32x32x16 ({fw}): {med[key]:.2f} ms")


if __name__ == "__main__":
  main()
