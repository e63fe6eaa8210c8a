"""What the tap-by-tap weight gradient would give the ResNet-20 train step.

An experiment, not the library's code path: flax's ``Conv`` is pointed (for
this process only) at a ``lax.conv_general_dilated`` whose weight gradient,
on CPU, is `bn_jax.core.platform.conv_weight_gradient_by_taps` (a
``jax.custom_vjp``; the forward and the input gradient stay XLA's). Then
`bench_train.bench_jax` times the BN ResNet-20 train step (batch 128) with
XLA's convolutions and with the tap weight gradient, alternating, 3 rounds.

    python benchmarks/profile_tap_conv.py [--rounds 3]

Why it is not the models' default: a ``custom_vjp`` convolution gives up
forward-mode autodiff (``jax.jvp``/``jax.hessian``) through every model, and
it speeds up BN's step by the same absolute amount as CBN's, which raises
CBN's relative cost (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import types

import jax
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
import flax.linen.linear as flax_linear  # noqa: E402

from bn_jax.core import platform  # noqa: E402


def tap_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
             batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` with the tap weight gradient on CPU."""
  conv = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  found = platform._single_convolution(conv, lhs, rhs)  # noqa: SLF001
  if found is None:
    return conv(lhs, rhs)
  params = found[1]

  @jax.custom_vjp
  def f(x, w):
    return conv(x, w)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda xx: conv(xx, w), x)[1](g)[0]
    dw = lax.platform_dependent(
        g, cpu=lambda gg: platform.conv_weight_gradient_by_taps(
            x, gg, w.shape, params),
        default=lambda gg: jax.vjp(lambda ww: conv(x, ww), w)[1](gg)[0])
    return dx, dw

  f.defvjp(fwd, bwd)
  return f(lhs, rhs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  xla_lax = flax_linear.lax
  taps_lax = types.SimpleNamespace(
      **{k: getattr(lax, k) for k in dir(lax) if not k.startswith("__")})
  taps_lax.conv_general_dilated = tap_conv
  print(f"jax {jax.__version__}, {jax.default_backend()}, "
        f"load {os.getloadavg()[0]:.1f}")
  for r in range(args.rounds):
    rates = {}
    for name, module in (("xla", xla_lax), ("taps", taps_lax)):
      flax_linear.lax = module
      rates[name] = bench_train.bench_jax("bn", 128, 5, 2)
    flax_linear.lax = xla_lax
    print(f"round {r}: BN ResNet-20 batch 128 images/s: xla "
          f"{rates['xla']:.1f}, taps {rates['taps']:.1f} "
          f"({rates['taps'] / rates['xla']:.2f}x)", flush=True)


if __name__ == "__main__":
  main()
