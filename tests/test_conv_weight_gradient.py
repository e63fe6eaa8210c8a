"""platform.weight_pullback: the tap-by-tap convolution weight gradient CBN's
Jacobians use on CPU, against XLA's own transpose of the convolution
(``jax.vjp``) and a NumPy float64 loop over the definition."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bn_jax.core import platform

# (input shape, kernel shape, conv keyword arguments, dimension numbers)
_CASES = {
    "3x3_same": ((2, 7, 6, 3), (3, 3, 3, 4), dict(window_strides=(1, 1),
                                                  padding="SAME"), None),
    "stride2_valid": ((2, 9, 8, 3), (3, 3, 3, 5), dict(window_strides=(2, 2),
                                                       padding="VALID"), None),
    "stride2_same_even": ((3, 8, 8, 2), (3, 3, 2, 4),
                          dict(window_strides=(2, 2), padding="SAME"), None),
    "dilated_explicit": ((2, 9, 9, 3), (3, 2, 3, 2), dict(
        window_strides=(1, 2), padding=((2, 1), (0, 3)),
        rhs_dilation=(2, 1)), None),
    "negative_padding": ((2, 9, 9, 2), (2, 2, 2, 3), dict(
        window_strides=(1, 1), padding=((-1, 0), (1, -2))), None),
    "1x1": ((2, 5, 5, 4), (1, 1, 4, 6), dict(window_strides=(1, 1),
                                             padding="SAME"), None),
    "1d": ((3, 11, 2), (4, 2, 3), dict(window_strides=(2,), padding="SAME"),
           ("NWC", "WIO", "NWC")),
    "3d": ((2, 4, 5, 4, 2), (2, 3, 2, 2, 3), dict(window_strides=(1, 1, 2),
                                                  padding="SAME"),
           ("NDHWC", "DHWIO", "NDHWC")),
    "nchw_oihw": ((2, 3, 7, 6), (4, 3, 3, 2), dict(window_strides=(1, 1),
                                                   padding="SAME"),
                  ("NCHW", "OIHW", "NCHW")),
}


def _dn(x_shape, case_dn):
  if case_dn is not None:
    return case_dn
  return ("NHWC", "HWIO", "NHWC")


def _numpy_weight_gradient(x, ct, w_shape, dn, kwargs):
  """dW[o, i, taps] = sum_{n, p} xpad[n, i, p * s + tap * d] ct[n, o, p]:
  the definition, looped in float64 (channels-first internally)."""
  lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(
      x.shape, w_shape, dn)
  xt = np.transpose(x, lhs_spec).astype(np.float64)      # N, C, spatial
  gt = np.transpose(ct, out_spec).astype(np.float64)     # N, O, out spatial
  k = [w_shape[d] for d in rhs_spec[2:]]
  strides = kwargs["window_strides"]
  dil = kwargs.get("rhs_dilation", (1,) * len(k))
  padding = kwargs["padding"]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(xt.shape[2:], [
        (kk - 1) * d + 1 for kk, d in zip(k, dil)], strides, padding)
  # Pad (negative = crop) the spatial axes.
  for ax, (lo, hi) in enumerate(padding, start=2):
    if lo < 0:
      xt = np.take(xt, range(-lo, xt.shape[ax]), axis=ax)
      lo = 0
    if hi < 0:
      xt = np.take(xt, range(0, xt.shape[ax] + hi), axis=ax)
      hi = 0
    widths = [(0, 0)] * xt.ndim
    widths[ax] = (lo, hi)
    xt = np.pad(xt, widths)
  out = np.zeros((gt.shape[1], xt.shape[1], *k))
  for tap in itertools.product(*(range(kk) for kk in k)):
    for pos in itertools.product(*(range(o) for o in gt.shape[2:])):
      idx = tuple(p * s + t * d for p, s, t, d in zip(pos, strides, tap, dil))
      xs = xt[(slice(None), slice(None)) + idx]          # N, C
      gs = gt[(slice(None), slice(None)) + pos]          # N, O
      out[(slice(None), slice(None)) + tap] += gs.T @ xs
  # out is (O, I, spatial...) -> the weight's layout.
  return np.transpose(out, np.argsort(rhs_spec))


@pytest.mark.parametrize("name", sorted(_CASES))
def test_tap_weight_gradient_matches_numpy_and_xla_in_float64(name):
  x_shape, w_shape, kwargs, case_dn = _CASES[name]
  dn = _dn(x_shape, case_dn)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal(x_shape))
    w = jnp.asarray(rng.standard_normal(w_shape))

    def layer_fn(xx, ww):
      return lax.conv_general_dilated(xx, ww, dimension_numbers=dn, **kwargs)

    y = layer_fn(x, w)
    ct = jnp.asarray(rng.standard_normal(y.shape))
    # The conv is recognised (else the test would compare XLA with itself).
    assert platform._single_convolution(layer_fn, x, w) is not None
    got = jax.jit(lambda xx, ww, cc: platform.weight_pullback(
        layer_fn, xx, ww)(cc))(x, w, ct)
    xla = jax.vjp(lambda ww: layer_fn(x, ww), w)[1](ct)[0]
    want = _numpy_weight_gradient(np.asarray(x), np.asarray(ct), w_shape, dn,
                                  kwargs)
  assert got.shape == w_shape and got.dtype == jnp.float64
  # float64: both are sums of <= N * out_positions ~ 200 products of O(1)
  # terms; 1e-12 relative to the largest entry is ~1e4 ulps of margin.
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(xla), want, rtol=0, atol=1e-12 * scale)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-12 * scale)


def test_flax_conv_is_recognised_and_other_layers_fall_back():
  """flax.linen.Conv (no bias) takes the tap path; Dense, grouped convs and
  dtype-promoting layers use XLA's transpose, with the same gradient."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)

  def apply(layer, w):
    return lambda xx, ww: layer.apply({"params": {"kernel": ww}}, xx)

  conv = nn.Conv(5, (3, 3), strides=2, use_bias=False)
  w_conv = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
  assert platform._single_convolution(apply(conv, w_conv), x, w_conv)

  grouped = nn.Conv(4, (3, 3), feature_group_count=2, use_bias=False)
  w_grouped = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
  dense = nn.Dense(3, use_bias=False)
  w_dense = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  bf16 = nn.Conv(5, (3, 3), dtype=jnp.bfloat16, use_bias=False)
  for layer, w in ((grouped, w_grouped), (dense, w_dense), (bf16, w_conv)):
    fn = apply(layer, w)
    assert platform._single_convolution(fn, x, w) is None, layer
    y = fn(x, w)
    ct = jnp.ones_like(y)
    np.testing.assert_array_equal(
        np.asarray(platform.weight_pullback(fn, x, w)(ct)),
        np.asarray(jax.vjp(lambda ww: fn(x, ww), w)[1](ct)[0]))
