"""Float64 evidence for the measured differences of run_flax_tests.py.

Evaluates flax's and bn_jax's layers on the inputs of flax's
``test_layer_norm4``, ``test_normalization_equivalence0/1`` and
``test_instance_norm3`` (tests/linen/linen_test.py, flax 0.12.8), and prints
each result's largest error against a NumPy float64 evaluation of the same
float32 inputs. Usage: ``python tools/flax_compat/measure_differences.py``.
"""
import jax
import numpy as np
from flax import linen as flax_nn
from jax import random

import bn_jax
import bn_jax.nn


def _err(y, ref) -> str:
  return f"{np.abs(np.asarray(y, np.float64) - ref).max():.3g}"


def _f64_norm(x64, axes, eps):
  return ((x64 - x64.mean(axes, keepdims=True)) /
          np.sqrt(x64.var(axes, keepdims=True) + eps))


def main() -> None:
  # test_layer_norm4: x = normal(2, 3, 4) + 1e6, reduction_axes=-1.
  key1, key2 = random.split(random.key(0))
  e = 1e-5
  x = random.normal(key1, (2, 3, 4)) + 1e6
  ref = _f64_norm(np.asarray(x, np.float64), -1, e)
  one_liner = (x - x.mean(axis=-1, keepdims=True)) * jax.lax.rsqrt(
      x.var(axis=-1, keepdims=True) + e)
  for name, cls in (("flax.linen.LayerNorm", flax_nn.LayerNorm),
                    ("bn_jax.nn.LayerNorm", bn_jax.nn.LayerNorm)):
    for fast in (False, True):
      y, _ = cls(use_bias=False, use_scale=False, epsilon=e,
                 use_fast_variance=fast).init_with_output(key2, x)
      print(f"test_layer_norm4 {name}(use_fast_variance={fast}): "
            f"max|y - y_f64| = {_err(y, ref)}")
  print(f"test_layer_norm4 the test's float32 one-liner: "
        f"max|y - y_f64| = {_err(one_liner, ref)}")

  # test_normalization_equivalence0/1: bn_jax's LayerNorm vs flax's own
  # InstanceNorm (not replaced), default epsilon 1e-6.
  x = random.normal(random.key(0), (2, 3, 4, 5))
  x64 = np.asarray(x, np.float64)
  cases = [(dict(feature_axes=(1, 2)), dict(feature_axes=(1, 2)), (3,)),
           (dict(reduction_axes=(1, 2), feature_axes=-1),
            dict(feature_axes=-1), (1, 2))]
  for i, (ln_kwargs, in_kwargs, axes) in enumerate(cases):
    ref = _f64_norm(x64, axes, 1e-6)
    out = {}
    for name, module in (
        ("bn_jax.nn.LayerNorm", bn_jax.nn.LayerNorm(**ln_kwargs)),
        ("flax.linen.LayerNorm", flax_nn.LayerNorm(**ln_kwargs)),
        ("flax.linen.InstanceNorm", flax_nn.InstanceNorm(**in_kwargs))):
      y = module.apply(module.init(random.key(1), x), x)
      out[name] = np.asarray(y, np.float64)
      print(f"test_normalization_equivalence{i} {name}: "
            f"max|y - y_f64| = {_err(y, ref)}")
    gap = np.abs(out["bn_jax.nn.LayerNorm"] -
                 out["flax.linen.InstanceNorm"]).max()
    flax_gap = np.abs(out["flax.linen.LayerNorm"] -
                      out["flax.linen.InstanceNorm"]).max()
    print(f"test_normalization_equivalence{i} |bn_jax LN - flax IN| = "
          f"{gap:.3g}, |flax LN - flax IN| = {flax_gap:.3g} (atol 1e-7)")

  # test_instance_norm3: what a bn_jax InstanceNorm (LayerNorm's code path)
  # would give: x = normal(2, 3, 4, 5) + 1e4, statistics over axes (1, 2).
  x = random.normal(key1, (2, 3, 4, 5)) + 1e4
  axes = (1, 2)
  ref = _f64_norm(np.asarray(x, np.float64), axes, e)
  one_liner = (x - x.mean(axis=axes, keepdims=True)) * jax.lax.rsqrt(
      x.var(axis=axes, keepdims=True) + e)
  y, _ = bn_jax.layer_norm(x, axis=axes, epsilon=e)
  y_flax, _ = flax_nn.InstanceNorm(
      use_bias=False, use_scale=False, epsilon=e,
      use_fast_variance=False).init_with_output(key2, x)
  for name, value in (("bn_jax.layer_norm over (1, 2)", y),
                      ("flax.linen.InstanceNorm", y_flax)):
    print(f"test_instance_norm3 {name}: max|y - one-liner| = "
          f"{np.abs(value - one_liner).max():.3g} (atol 1e-6), "
          f"max|y - y_f64| = {_err(value, ref)}")


if __name__ == "__main__":
  main()
