r"""Train-mode batch norm forward+backward: bn_jax vs flax vs PyTorch (CPU).

What is timed, per implementation, under ``jax.jit`` (PyTorch eagerly):
``value_and_grad`` of ``sum(y**2)`` with respect to ``x``, ``scale`` and
``bias``, where ``y`` is the train-mode batch norm of ``x`` (batch
statistics, running-statistics update included and returned).

Implementations:
  * ``ours``: ``bn_jax.batch_norm`` (stable shifted one-pass statistics).
  * ``flax``: ``flax.linen.BatchNorm(dtype=x.dtype)``, otherwise defaults
    (``use_fast_variance=True``:
    ``E[x^2] - E[x]^2``, fast but loses precision when ``|mean| >> std``).
  * ``flax2p``: ``flax.linen.BatchNorm(use_fast_variance=False)``, the
    stable two-pass variance -- the fair comparison for precision.
  * ``torch``: ``torch.nn.functional.batch_norm`` on a channels-last tensor,
    forward + ``backward()``, when torch is installed (threads set to match).

Repetitions are interleaved (every implementation once per round, in a
rotating order) so that load changes on a shared machine hit all of them
alike. Each sample times a short inner loop (calibrated to ~``--sample_ms``).
Printed: median ms per call, the median over rounds of the per-round ratio
ours/flax and ours/flax2p, and the minimum ms per call of ours, flax, flax2p
(the least disturbed sample; a load-robust second opinion). The script
prints; it does not assert.

Usage::

  python benchmarks/bench_norm.py            # all shapes, f32 and bf16
  python benchmarks/bench_norm.py --quick    # fewer rounds, shorter samples
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

import bn_jax

# NHWC activations of a CIFAR ResNet, and MLP activations (BN paper MNIST).
SHAPES = [
    (128, 32, 32, 64),
    (128, 16, 16, 32),
    (128, 8, 8, 64),
    (60, 100),
    (256, 100),
]
MOMENTUM = 0.99
EPSILON = 1e-5


def _inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)
  scale = (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32)
  bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
  return x, scale, bias


def _jax_timer(loss, shape, dtype, state):
  """A no-argument call timing one jitted value_and_grad of ``loss`` w.r.t.
  (x, scale, bias) on the shared inputs, with ``state`` passed through."""
  x, scale, bias = _inputs(shape, dtype)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  args = (jnp.asarray(x, dtype), jnp.asarray(scale), jnp.asarray(bias), state)
  return lambda: jax.block_until_ready(step(*args))


def make_ours(shape, dtype):
  state = bn_jax.batch_norm_state(shape[-1])

  def loss(x, scale, bias, state):
    y, new_state = bn_jax.batch_norm(x, state, scale, bias, train=True,
                                     momentum=MOMENTUM, epsilon=EPSILON)
    return jnp.sum(jnp.square(y.astype(jnp.float32))), new_state

  return _jax_timer(loss, shape, dtype, state)


def make_flax(shape, dtype, use_fast_variance):
  # dtype=x's dtype: bf16 in, bf16 out, as bn_jax does (flax's default would
  # promote the output to float32 through its float32 scale and bias).
  module = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM,
                        epsilon=EPSILON, use_fast_variance=use_fast_variance,
                        dtype=dtype)
  stats = {"mean": jnp.zeros(shape[-1]), "var": jnp.ones(shape[-1])}

  def loss(x, scale, bias, stats):
    y, updates = module.apply(
        {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x,
        mutable=["batch_stats"])
    return jnp.sum(jnp.square(y.astype(jnp.float32))), updates

  return _jax_timer(loss, shape, dtype, stats)


def make_torch(shape, dtype, torch):
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  x, scale, bias = _inputs(shape, dtype)
  tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
  xt = torch.from_numpy(x)
  if xt.ndim == 4:  # NHWC data -> logical NCHW, channels-last memory
    xt = xt.permute(0, 3, 1, 2)
  xt = xt.to(tdtype).detach().requires_grad_(True)
  weight = torch.from_numpy(scale).requires_grad_(True)
  b = torch.from_numpy(bias).requires_grad_(True)
  running_mean = torch.zeros(shape[-1])
  running_var = torch.ones(shape[-1])

  def run():
    for t in (xt, weight, b):
      t.grad = None
    y = F.batch_norm(xt, running_mean, running_var, weight, b, training=True,
                     momentum=1.0 - MOMENTUM, eps=EPSILON)
    loss = y.float().square().sum()
    loss.backward()
    return loss

  run()  # fails here (caught by the caller) if the dtype is unsupported
  return run


def _time(fn, inner):
  t0 = time.perf_counter()
  for _ in range(inner):
    fn()
  return (time.perf_counter() - t0) / inner


def bench_case(shape, dtype, rounds, sample_ms, torch):
  fns = {
      "ours": make_ours(shape, dtype),
      "flax": make_flax(shape, dtype, True),
      "flax2p": make_flax(shape, dtype, False),
  }
  if torch is not None:
    try:
      fns["torch"] = make_torch(shape, dtype, torch)
    except (RuntimeError, TypeError) as e:  # e.g. dtype unsupported on CPU
      print(f"  torch skipped for {shape} {jnp.dtype(dtype).name}: {e}")
  inner = {}
  for name, fn in fns.items():  # compile + warm up + calibrate
    fn()
    one = _time(fn, 3)
    inner[name] = max(1, int(sample_ms * 1e-3 / max(one, 1e-6)))
  names = list(fns)
  times = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      times[name].append(_time(fns[name], inner[name]))
  med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
  best = {n: min(t) * 1e3 for n, t in times.items()}
  ratio = statistics.median(
      o / f for o, f in zip(times["ours"], times["flax"]))
  ratio2p = statistics.median(
      o / f for o, f in zip(times["ours"], times["flax2p"]))
  return med, best, ratio, ratio2p


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="9 rounds of ~3 ms samples (default 31 x 6 ms)")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--sample_ms", type=float, default=None)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--shapes", default=None,
                      help="comma-separated shapes like 60x100,256x100")
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args()
  # Short samples, many rounds: on a shared machine, load changes between
  # implementations less within a short round.
  rounds = args.rounds or (9 if args.quick else 31)
  sample_ms = args.sample_ms or (3.0 if args.quick else 6.0)

  torch = None
  if not args.no_torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel,redefined-outer-name
      torch.set_num_threads(os.cpu_count() or 1)  # XLA:CPU uses every core
    except ImportError:
      torch = None

  print(f"jax {jax.__version__} ({jax.default_backend()}), flax "
        f"{getattr(nn, '__version__', None) or __import__('flax').__version__}"
        f", torch {torch.__version__ if torch else 'not installed'}; "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
        f"; rounds={rounds}, sample~{sample_ms:g} ms")
  print("value_and_grad of sum(y**2) wrt (x, scale, bias), train mode, "
        "median ms per call")
  header = (f"{'shape':>18} {'dtype':>8} {'ours':>8} {'flax':>8} {'flax2p':>8}"
            f" {'torch':>8} {'ours/flax':>10} {'ours/flax2p':>12}")
  print(header)
  for dtype_name in args.dtypes.split(","):
    dtype = jnp.dtype(dtype_name)
    shapes = SHAPES if args.shapes is None else [
        tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    for shape in shapes:
      med, best, ratio, ratio2p = bench_case(shape, dtype, rounds, sample_ms, torch)
      tm = f"{med['torch']:8.3f}" if "torch" in med else f"{'-':>8}"
      print(f"{'x'.join(map(str, shape)):>18} {dtype.name:>8} "
            f"{med['ours']:8.3f} {med['flax']:8.3f} {med['flax2p']:8.3f} {tm}"
            f" {ratio:10.3f} {ratio2p:12.3f}   min: {best['ours']:.3f} "
            f"{best['flax']:.3f} {best['flax2p']:.3f}", flush=True)


if __name__ == "__main__":
  main()
