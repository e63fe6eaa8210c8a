r"""PreciseBN: population statistics instead of EMA running statistics.

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), section 4: the EMA
running statistics average over many past models (with large momentum they
lag, with small momentum they are noisy). PreciseBN freezes the weights, runs
the model in training-statistics mode over N batches and aggregates the
per-batch statistics ``(mu_B, var_B)`` (biased, i.e. Bessel's correction
undone) with batch ``B`` weighted by its sample count ``n_B``:

.. math::

   \mu_{pop} = \frac{\sum_B n_B\,\mu_B}{\sum_B n_B},\qquad
   \sigma^2_{pop} = \frac{\sum_B n_B\,(\mu_B^2 + \sigma_B^2)}{\sum_B n_B}
                    - \mu_{pop}^2 .

When every layer sees the same batches this is exactly the mean and biased
variance of the layer's input over the union of the batches (law of total
variance). About 10^3 to 10^4 samples suffice.

The sums are accumulated around a per-feature pivot ``K`` (the first batch's
mean): ``sum n_B (mu_B - K)`` and ``sum n_B ((mu_B - K)^2 + var_B)``, so the
final subtraction does not cancel catastrophically when ``|mu| >> sigma``
(the same trick as :mod:`bn_jax.core.moments`).

Where the per-batch moments come from is the front-ends' business: the Flax
modules record them (Linen: :func:`bn_jax.nn.precise_batch_stats`; NNX:
:func:`bn_jax.nnx.precise_batch_stats`), both drive
:func:`accumulate_population_stats` and :func:`write_population_stats` of
this module, which know trees of layers but no collection names. Functional
users who thread their own state can call ``aggregate_batch_moments`` (or the
streaming ``population_stats_init/update/result``) on moments they computed
with :func:`bn_jax.core.batch_statistics`.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

_MOMENT_KEYS = ("mean", "var", "count")


class PopulationStats(NamedTuple):
  """Running sums of one layer's per-batch moments (per feature).

  Attributes:
    shift: pivot ``K`` (the first batch's mean), all sums are around it.
    count: ``sum_B n_B``.
    sum_shifted: ``sum_B n_B (mu_B - K)``.
    sum_shifted_sq: ``sum_B n_B ((mu_B - K)^2 + var_B)``.
  """
  shift: jax.Array
  count: jax.Array
  sum_shifted: jax.Array
  sum_shifted_sq: jax.Array


def _is_moments_layer(node) -> bool:
  return isinstance(node, Mapping) and all(k in node for k in _MOMENT_KEYS)


def _map_layers(fn, tree, *rest, is_layer, path=()):
  """Applies ``fn`` to every layer of a nested mapping (and the ``rest``)."""
  if is_layer(tree):
    return fn(tree, *rest)
  if not isinstance(tree, Mapping):
    raise ValueError(
        f"batch moments at {'/'.join(path) or '<root>'} must be a mapping of "
        f"layers, each with the keys {_MOMENT_KEYS}; got {type(tree).__name__}.")
  return {k: _map_layers(fn, v, *[r[k] for r in rest], is_layer=is_layer,
                         path=path + (str(k),))
          for k, v in tree.items()}


def pool_moments(mean, var, count, *, axis=0):
  """Pools moments of disjoint sample sets along ``axis`` (count-weighted).

  ``mean = sum(n mean) / sum(n)``, ``var = sum(n (var + (mean_i - mean)^2)) /
  sum(n)``: the mean and biased variance of the union of the sets. Sets with
  ``n = 0`` drop out; an all-empty pool gives mean 0 and variance 0.

  Returns:
    ``(mean, var, count)`` with ``axis`` reduced.
  """
  count = jnp.broadcast_to(count, jnp.shape(mean)).astype(jnp.result_type(mean))
  total = jnp.sum(count, axis=axis)
  safe_total = jnp.maximum(total, 1.0)
  pooled_mean = jnp.sum(count * mean, axis=axis) / safe_total
  dev = mean - jnp.expand_dims(pooled_mean, axis)
  pooled_var = jnp.sum(count * (var + dev * dev), axis=axis) / safe_total
  return pooled_mean, pooled_var, total


def population_stats_init(batch_moments) -> Any:
  """Empty accumulators shaped like ``batch_moments`` (a tree of layers).

  Args:
    batch_moments: a nested mapping whose layers are mappings with ``mean``,
      ``var`` and ``count`` (arrays or ``jax.ShapeDtypeStruct``), e.g. one
      batch's ``batch_moments`` collection, or a single layer's dict.
  """
  def init(layer):
    mean = layer["mean"]
    if not isinstance(mean, jax.ShapeDtypeStruct):
      mean = jnp.asarray(mean)
    # Sums in at least float32 whatever the dtype of the stored moments.
    zeros = jnp.zeros(mean.shape, jnp.promote_types(mean.dtype, jnp.float32))
    return PopulationStats(zeros, zeros, zeros, zeros)
  return _map_layers(init, batch_moments, is_layer=_is_moments_layer)


def _check_layer(layer):
  mean, var, count = (layer[k] for k in _MOMENT_KEYS)
  if jnp.shape(var) != jnp.shape(mean):
    raise ValueError(f"batch moments: var has shape {jnp.shape(var)} but mean "
                     f"has shape {jnp.shape(mean)}; they must match.")
  try:
    jnp.broadcast_shapes(jnp.shape(count), jnp.shape(mean))
  except ValueError:
    raise ValueError(
        f"batch moments: count has shape {jnp.shape(count)}, which does not "
        f"broadcast to the mean's shape {jnp.shape(mean)} (use a scalar or a "
        "per-feature count).") from None


def population_stats_update(stats, batch_moments):
  """Adds one batch's moments (same tree structure as at init)."""
  def update(acc: PopulationStats, layer):
    _check_layer(layer)
    dtype = acc.count.dtype
    mean = jnp.asarray(layer["mean"], dtype)
    var = jnp.asarray(layer["var"], dtype)
    n = jnp.broadcast_to(jnp.asarray(layer["count"], dtype), mean.shape)
    # The first batch with samples sets the pivot (branch-free, jit-friendly).
    shift = jnp.where(acc.count > 0, acc.shift, mean)
    d = mean - shift
    return PopulationStats(shift, acc.count + n, acc.sum_shifted + n * d,
                           acc.sum_shifted_sq + n * (d * d + var))
  return _map_layers(update, stats, batch_moments,
                     is_layer=lambda n: isinstance(n, PopulationStats))


def population_stats_result(stats):
  """Tree of ``{'mean': mu_pop, 'var': sigma2_pop}`` per layer (biased var)."""
  def result(acc: PopulationStats):
    safe = jnp.maximum(acc.count, 1.0)
    d = acc.sum_shifted / safe
    var = jnp.maximum(acc.sum_shifted_sq / safe - d * d, 0.0)
    return {"mean": acc.shift + d, "var": var}
  return _map_layers(result, stats,
                     is_layer=lambda n: isinstance(n, PopulationStats))


def aggregate_batch_moments(batch_moments_seq):
  """Population mean and variance from a sequence of per-batch moments.

  Args:
    batch_moments_seq: a non-empty sequence of trees of the same structure,
      one per batch; each layer is a mapping ``{'mean', 'var', 'count'}`` with
      the batch's per-feature mean, biased variance and sample count (scalar
      or per feature). A single layer's dict is a tree too.

  Returns:
    The same tree structure with ``{'mean', 'var'}`` per layer: the
    count-weighted population statistics of the module docstring.
  """
  seq = list(batch_moments_seq)
  if not seq:
    raise ValueError("batch_moments_seq must contain at least one batch.")
  stats = population_stats_init(seq[0])
  for batch_moments in seq:
    stats = population_stats_update(stats, batch_moments)
  return population_stats_result(stats)


def write_population_stats(running_stats, population, *,
                           name: str = "running statistics"):
  """Copy of ``running_stats`` with every layer's ``mean``/``var`` replaced.

  Args:
    running_stats: nested mapping of the layers' running statistics (e.g. a
      Linen ``batch_stats`` collection); every layer of ``population`` must
      be there with ``mean`` and ``var`` entries of the same shapes.
    population: the tree ``population_stats_result`` returns.
    name: what ``running_stats`` is called in error messages.

  Returns:
    The new tree; replaced values keep their previous dtype, other entries
    are unchanged.
  """
  return _write_back(running_stats, population, name)


def _write_back(running_stats, population, name, path=()):
  where = "/".join(path) or "<root>"
  if not isinstance(running_stats, Mapping):
    raise ValueError(f"{name} has no layer at {where} for the batch moments "
                     "stored there.")
  if _is_result_layer(population):
    for k in ("mean", "var"):
      if k not in running_stats:
        raise ValueError(f"{name}/{where} has no '{k}' entry to receive the "
                         "population statistics.")
      if jnp.shape(running_stats[k]) != jnp.shape(population[k]):
        raise ValueError(
            f"{name}/{where}/{k} has shape {jnp.shape(running_stats[k])} "
            f"but the batch moments have shape {jnp.shape(population[k])}.")
    new = dict(running_stats)
    for k in ("mean", "var"):
      new[k] = population[k].astype(jnp.result_type(running_stats[k]))
    return new
  new = dict(running_stats)
  for k, v in population.items():
    if k not in running_stats:
      raise ValueError(f"{name} has no entry {'/'.join(path + (str(k),))} "
                       "for the batch moments stored there.")
    new[k] = _write_back(running_stats[k], v, name, path + (str(k),))
  return new


def _is_result_layer(node) -> bool:
  return isinstance(node, Mapping) and set(node) == {"mean", "var"} and all(
      not isinstance(v, Mapping) for v in node.values())


def accumulate_population_stats(
    moments_fn: Callable[[Any, Any], Any],
    frozen: Any,
    batches: Iterable[Any],
    *,
    num_batches: Optional[int] = None,
):
  """PreciseBN's loop: population statistics of every layer over ``batches``.

  Calls ``moments_fn(frozen, batch)`` -- a training-mode forward pass that
  returns the tree of per-layer batch moments (layers ``{'mean', 'var',
  'count'}``) -- under one ``jax.jit`` (one compilation per batch shape), and
  accumulates the moments count-weighted (see the module docstring).

  Args:
    moments_fn: ``moments_fn(frozen, batch) -> tree of layer moments``; it
      must not depend on anything but its arguments (it is traced).
    frozen: the pytree of arrays ``moments_fn`` reads (the frozen weights
      and running statistics), passed as a ``jit`` argument.
    batches: an iterable of batches, passed to ``moments_fn`` as they are.
    num_batches: use the first ``num_batches`` batches (all if None). A
      ValueError is raised if ``batches`` runs out before.

  Returns:
    ``population_stats_result`` of the accumulated sums: per layer
    ``{'mean', 'var'}`` (biased variance).
  """
  if num_batches is not None:
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or (
        num_batches < 1):
      raise ValueError(f"num_batches must be an int >= 1 or None, got "
                       f"{num_batches!r}.")
    batches = itertools.islice(batches, num_batches)

  @jax.jit
  def step(stats, frozen, batch):
    return population_stats_update(stats, moments_fn(frozen, batch))

  stats, seen = None, 0
  for batch in batches:
    if stats is None:
      stats = population_stats_init(jax.eval_shape(moments_fn, frozen, batch))
    stats = step(stats, frozen, batch)
    seen += 1
  if seen == 0:
    raise ValueError("batches is empty: PreciseBN needs at least one batch.")
  if num_batches is not None and seen < num_batches:
    raise ValueError(f"num_batches={num_batches} but batches yielded only "
                     f"{seen}.")
  return population_stats_result(stats)
