"""Pytree helpers shared by the analysis instruments.

Norms and inner products of whole parameter trees are sums of per-leaf sums,
accumulated in at least float32 (half-precision parameters are upcast) so that
no ``ravel_pytree`` copy of the parameters is needed.
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax.core.moments import stats_dtype


def _upcast(x):
  return jnp.asarray(x).astype(stats_dtype(jnp.result_type(x)))


def tree_dot(a, b) -> jax.Array:
  """``<a, b>`` summed over every leaf of two trees of the same structure."""
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, y: jnp.sum(_upcast(x) * _upcast(y)), a, b))
  return sum(leaves, jnp.zeros((), jnp.float32))


def tree_sq_norm(a) -> jax.Array:
  """``||a||_2^2`` over every leaf of a tree."""
  return tree_dot(a, a)


def tree_l2(a) -> jax.Array:
  """``||a||_2`` over every leaf of a tree (the norm of the flattened tree)."""
  return jnp.sqrt(tree_sq_norm(a))


def tree_sub(a, b):
  return jax.tree.map(lambda x, y: _upcast(x) - _upcast(y), a, b)


def safe_cosine(dot, sq_norm_a, sq_norm_b) -> jax.Array:
  """``dot / (|a| |b|)``, defined as 0 when either vector is exactly 0.

  A zero gradient has no direction; returning 0 (rather than NaN) keeps logs
  finite, and the accompanying norm (0) tells the reader why.
  """
  denom = jnp.sqrt(sq_norm_a) * jnp.sqrt(sq_norm_b)
  return jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_to_str(path) -> str:
  """A jax key path as ``'Block_0/Dense_0/kernel'``."""
  return "/".join(_key_name(k) for k in path)


def _as_path(layer, argname: str) -> tuple[str, ...]:
  if isinstance(layer, str):
    parts = tuple(p for p in layer.split("/") if p)
  elif isinstance(layer, (tuple, list)) and all(
      isinstance(p, str) for p in layer):
    parts = tuple(layer)
  else:
    raise TypeError(f"{argname} entries must be layer names ('Dense_0'), "
                    f"'/'-joined paths ('Block_0/Conv_0') or tuples of names, "
                    f"got {layer!r}.")
  if not parts:
    raise ValueError(f"{argname} contains an empty layer name: {layer!r}.")
  return parts


def ordered_layers(params, layers=None, argname: str = "layers"
                   ) -> list[tuple[str, ...]]:
  """The ordered list of layer paths.

  Default: the top-level keys of ``params`` in their order (flax creates
  parameter dicts in module-creation order, i.e. input to output). Explicit
  ``layers`` are checked to exist and to be disjoint (no layer inside another).
  """
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a mapping of layer name -> parameters "
                    f"(e.g. variables['params']), got {type(params).__name__}.")
  if layers is None:
    paths = [(str(k),) for k in params.keys()]
  else:
    if isinstance(layers, str):
      raise TypeError(f"{argname} must be a sequence of layer names, got the "
                      f"single string {layers!r}; wrap it in a list.")
    paths = [_as_path(layer, argname) for layer in layers]
  if not paths:
    raise ValueError(f"{argname} is empty: there are no layers to measure "
                     "(params has no entries or an empty list was given).")
  for path in paths:
    node = params
    for i, part in enumerate(path):
      if not isinstance(node, Mapping) or part not in node:
        where = "/".join(path[:i]) or "<params root>"
        options = list(node.keys()) if isinstance(node, Mapping) else []
        raise ValueError(f"{argname}: layer '{'/'.join(path)}' not found: "
                         f"'{part}' is not in {where} (has {options}).")
      node = node[part]
  for i, a in enumerate(paths):
    for b in paths[i + 1:]:
      n = min(len(a), len(b))
      if a[:n] == b[:n]:
        raise ValueError(f"{argname}: layers '{'/'.join(a)}' and "
                         f"'{'/'.join(b)}' overlap (one is the other or "
                         "contains it); layers must be disjoint.")
  return paths


def leaf_layer_positions(params, paths: Sequence[tuple[str, ...]]) -> list[int]:
  """For every leaf of ``params`` (in tree order), the position of the layer
  that owns it, or ``len(paths)`` for leaves that belong to no listed layer."""
  positions = []
  for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(_key_name(k) for k in key_path)
    pos = len(paths)
    for i, p in enumerate(paths):
      if names[:len(p)] == p:
        pos = i
        break
    positions.append(pos)
  return positions


def check_same_structure(reference, candidate, argname: str, what: str):
  """Raises ValueError unless ``candidate`` has the tree structure and leaf
  shapes of ``reference``."""
  ref_def = jax.tree.structure(reference)
  cand_def = jax.tree.structure(candidate)
  if ref_def != cand_def:
    raise ValueError(f"{argname} must return {what} with the structure of "
                     f"params; got {cand_def} instead of {ref_def}.")
  for r, c in zip(jax.tree.leaves(reference), jax.tree.leaves(candidate)):
    if jnp.shape(r) != jnp.shape(c):
      raise ValueError(f"{argname} returned a leaf of shape {jnp.shape(c)} "
                       f"where params has shape {jnp.shape(r)}.")


def check_scalar_loss(loss_fn, params, batch_stats, batch):
  """Abstractly evaluates ``loss_fn`` once (no FLOPs) and checks its output."""
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable as loss_fn(params, "
                    f"batch_stats, batch) -> scalar, got {loss_fn!r}.")
  out = jax.eval_shape(loss_fn, params, batch_stats, batch)
  if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(
      out.dtype, jnp.floating):
    raise ValueError(f"loss_fn must return a floating scalar, got {out}. "
                     "Reduce the per-example losses (e.g. mean) inside it.")


def to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Converts a flat metrics dict of JAX/NumPy values into JSON-ready Python
  floats and (nested) lists, e.g. for ``json.dumps`` in a logger."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, (str, bool)) or v is None:
      out[k] = v
    elif isinstance(v, numbers.Integral):
      out[k] = int(v)
    else:
      arr = np.asarray(jax.device_get(v))
      if arr.ndim == 0:
        out[k] = arr.item()
      else:
        out[k] = arr.tolist()
  return out
