"""Argument checks shared by every normalization.

All checks run at trace time on static information (shapes, dtypes, Python
numbers), so a bad call fails when the function is traced under ``jax.jit``
with an error that names the argument, instead of producing NaNs later.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_static_number(value) -> bool:
  """True when ``value`` is a concrete Python/NumPy number (not a tracer).

  The range checks run only on such values: a traced hyperparameter (e.g. a
  scheduled momentum) is known only at run time.
  """
  if isinstance(value, jax.core.Tracer):
    return False
  return isinstance(value, (numbers.Number, np.ndarray, np.generic)) or (
      isinstance(value, jax.Array) and value.ndim == 0)


# Old private name, still read by cross_iteration_batch_norm.py (owned by
# another change); new code calls ``is_static_number``.
_is_static_number = is_static_number


def check_floating(x, name: str = "x", *, allow_complex: bool = False) -> None:
  """Raises TypeError unless ``x`` has a floating-point dtype.

  ``allow_complex``: complex64/complex128 are accepted too (batch norm, whose
  statistics are defined for complex inputs as in flax).
  """
  dtype = jnp.result_type(x)
  if jnp.issubdtype(dtype, jnp.floating) or (
      allow_complex and jnp.issubdtype(dtype, jnp.complexfloating)):
    return
  kinds = "float16/bfloat16/float32/float64"
  if allow_complex:
    kinds += "/complex64/complex128"
  raise TypeError(
      f"{name} must be a floating-point array ({kinds}), got dtype {dtype}. "
      f"Cast it first, e.g. {name}.astype(jnp.float32).")


def normalize_axes(axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
  """Turns an int or tuple of ints into sorted, non-negative, unique axes.

  A list is accepted like a tuple; anything else (a float, a string, an
  array) raises a TypeError naming ``name``.
  """
  if isinstance(axis, numbers.Integral):
    axes = (axis,)
  elif isinstance(axis, (tuple, list)):
    axes = tuple(axis)
  else:
    raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}.")
  if not axes:
    raise ValueError(f"{name} must name at least one axis, got {axis!r}.")
  out = []
  for a in axes:
    if not isinstance(a, numbers.Integral):
      raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axis!r} is out of range for an input with {ndim} dims.")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axis!r} repeats an axis.")
  return tuple(sorted(out))


def check_momentum(momentum, name: str = "momentum") -> None:
  """momentum is the weight of the old value; it must lie in [0, 1)."""
  if is_static_number(momentum):
    m = float(momentum)
    if not 0.0 <= m < 1.0:
      raise ValueError(
          f"{name} must be in [0, 1) (the weight of the OLD running value, as "
          f"in flax; PyTorch's momentum=0.1 is {name}=0.9), got {m}.")


def check_epsilon(epsilon, name: str = "epsilon") -> None:
  if is_static_number(epsilon):
    e = float(epsilon)
    if not e > 0.0:
      raise ValueError(f"{name} must be > 0 (it keeps 1/sqrt(var + {name}) "
                       f"finite), got {e}.")


def check_feature_shape(array, expected: Sequence[int], name: str) -> None:
  """Raises ValueError unless ``array`` has exactly the per-feature shape."""
  if array is None:
    return
  shape = tuple(jnp.shape(array))
  if shape != tuple(expected):
    raise ValueError(
        f"{name} has shape {shape} but the input has feature shape "
        f"{tuple(expected)} (the sizes of the feature axes).")


def check_divides(divisor: int, name: str, total: int, what: str) -> None:
  """Raises ValueError unless ``divisor`` (the argument ``name``) divides
  ``total``; ``what`` describes ``total`` in the message."""
  if total % divisor:
    raise ValueError(f"{name}={divisor} must divide {what}.")


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)
