"""Convolution weight gradients on XLA:CPU: XLA's own against tap by tap.

For each distinct 3x3 convolution of ResNet-20 (CIFAR, 32x32 inputs), times
the weight gradient ``dW = d <G, conv(X, W)> / dW`` computed

* ``xla``: by XLA's transpose of the convolution (``jax.vjp``), which XLA:CPU
  emits as a convolution whose "kernel" is the whole output cotangent;
* ``taps``: by `bn_jax.core.platform.conv_weight_gradient_by_taps`, one
  ``(N * P, C_in)^T (N * P, C_out)`` matrix product per kernel tap (what
  CBN's Jacobians use on CPU),

next to the same convolution's forward, each jitted alone, interleaved
rounds, median ms. Both results are compared (max relative difference).

    python benchmarks/bench_weight_gradient.py [--batches 32 128] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax.core import platform

# (name, input spatial size, C_in, C_out, stride): ResNet-20's 3x3 convs.
CONVS = (
    ("stem 3->16 @32", 32, 3, 16, 1),
    ("16->16 @32", 32, 16, 16, 1),
    ("16->32 /2 @32", 32, 16, 32, 2),
    ("32->32 @16", 16, 32, 32, 1),
    ("32->64 /2 @16", 16, 32, 64, 2),
    ("64->64 @8", 8, 64, 64, 1),
)
_DN = ("NHWC", "HWIO", "NHWC")


def _functions(stride):
  def conv(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                    dimension_numbers=_DN)

  def xla(x, w, g):
    return jax.vjp(lambda ww: conv(x, ww), w)[1](g)[0]

  def taps(x, w, g):
    return platform.weight_pullback(conv, x, w)(g)

  return jax.jit(conv), jax.jit(xla), jax.jit(taps)


def _median_ms(fn, args, reps=3):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
  print("| batch | conv | fwd ms | dW xla ms | dW taps ms | xla / taps | "
        "max rel diff |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for batch in args.batches:
    for name, size, c_in, c_out, stride in CONVS:
      x = jnp.asarray(rng.standard_normal((batch, size, size, c_in)),
                      jnp.float32)
      w = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)), jnp.float32)
      fwd, xla, taps = _functions(stride)
      g = jnp.asarray(rng.standard_normal(fwd(x, w).shape), jnp.float32)
      a, b = np.asarray(xla(x, w, g)), np.asarray(taps(x, w, g))
      diff = float(np.abs(a - b).max() / np.abs(a).max())
      times = {"fwd": [], "xla": [], "taps": []}
      for _ in range(args.rounds):
        times["fwd"].append(_median_ms(fwd, (x, w)))
        times["xla"].append(_median_ms(xla, (x, w, g)))
        times["taps"].append(_median_ms(taps, (x, w, g)))
      med = {k: float(np.median(v)) for k, v in times.items()}
      ratio = float(np.median(np.array(times["xla"]) /
                              np.array(times["taps"])))
      print(f"| {batch} | {name} | {med['fwd']:.2f} | {med['xla']:.2f} | "
            f"{med['taps']:.2f} | {ratio:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
