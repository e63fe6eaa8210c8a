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

Where the per-batch moments come from: the Flax modules of :mod:`bn_jax.nn`
store them in the ``batch_moments`` collection in training mode when that
collection is mutable (``batch_moments/<layer path>/{mean,var,count}``).
``precise_batch_stats`` drives a whole model through this hook; functional
users who thread their own state can call ``aggregate_batch_moments`` (or the
streaming ``population_stats_init/update/result``) on moments they computed
with :func:`bn_jax.core.batch_statistics`.

Reference API users know: fvcore's
``fvcore.nn.precise_bn.update_bn_stats(model, data_loader, num_iters=200)``;
here ``precise_batch_stats(apply_fn, variables, batches, num_batches=200)``
returns the new ``batch_stats`` instead of mutating a model.
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


def _write_back(batch_stats, population, path=()):
  """Copy of ``batch_stats`` with every layer's mean/var replaced."""
  where = "/".join(path) or "<root>"
  if not isinstance(batch_stats, Mapping):
    raise ValueError(f"batch_stats has no layer at {where} for the batch "
                     "moments stored there.")
  if _is_result_layer(population):
    for k in ("mean", "var"):
      if k not in batch_stats:
        raise ValueError(f"batch_stats/{where} has no '{k}' entry to receive "
                         "the population statistics.")
      if jnp.shape(batch_stats[k]) != jnp.shape(population[k]):
        raise ValueError(
            f"batch_stats/{where}/{k} has shape {jnp.shape(batch_stats[k])} "
            f"but the batch moments have shape {jnp.shape(population[k])}.")
    new = dict(batch_stats)
    for k in ("mean", "var"):
      new[k] = population[k].astype(jnp.result_type(batch_stats[k]))
    return new
  new = dict(batch_stats)
  for k, v in population.items():
    if k not in batch_stats:
      raise ValueError(f"batch_stats has no entry {'/'.join(path + (k,))} for "
                       "the batch moments stored there.")
    new[k] = _write_back(batch_stats[k], v, path + (str(k),))
  return new


def _is_result_layer(node) -> bool:
  return isinstance(node, Mapping) and set(node) == {"mean", "var"} and all(
      not isinstance(v, Mapping) for v in node.values())


def precise_batch_stats(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    num_batches: Optional[int] = None,
    **apply_kwargs,
) -> dict:
  """PreciseBN: recomputes every layer's ``mean``/``var`` as population stats.

  Runs ``apply_fn(variables, batch, mutable=['batch_stats', 'batch_moments'],
  **apply_kwargs)`` under one ``jax.jit`` (one compilation per batch shape)
  for each batch, with the weights and the incoming ``batch_stats`` frozen
  (the EMA updates the forward pass computes are discarded), and aggregates
  the moments every batch-statistics layer stores in ``batch_moments`` (see
  the module docstring for the formula).

  Example (the reference is fvcore's ``update_bn_stats(model, loader,
  num_iters=200)``)::

    batch_stats = precise_batch_stats(
        lambda v, b, **kw: model.apply(v, b['image'], **kw),
        {'params': params, 'batch_stats': batch_stats}, batches,
        num_batches=200, train=True)

  Args:
    apply_fn: ``apply_fn(variables, batch, *, mutable, **apply_kwargs)``
      returning ``(output, mutated_collections)``, a training-mode forward
      (e.g. ``model.apply`` with ``train=True`` in ``apply_kwargs``).
    variables: the model variables; must contain ``batch_stats``.
    batches: an iterable of batches, passed to ``apply_fn`` as they are.
    num_batches: use the first ``num_batches`` batches (all if None). A
      ValueError is raised if ``batches`` runs out before.
    **apply_kwargs: passed to ``apply_fn`` (e.g. ``train=True``, ``rngs=``).
      They are closed over: the same ``rngs`` are used for every batch.

  Returns:
    A copy of ``variables['batch_stats']`` in which the ``mean`` and ``var``
    of every layer that stored batch moments are the population statistics
    (cast to their previous dtype); other entries are unchanged.
  """
  if not isinstance(variables, Mapping) or "batch_stats" not in variables:
    raise ValueError("variables must be a mapping with a 'batch_stats' "
                     "collection (the model's running statistics).")
  if "mutable" in apply_kwargs:
    raise ValueError("do not pass mutable=: precise_batch_stats sets "
                     "mutable=['batch_stats', 'batch_moments'] itself.")
  if num_batches is not None:
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or (
        num_batches < 1):
      raise ValueError(f"num_batches must be an int >= 1 or None, got "
                       f"{num_batches!r}.")
    batches = itertools.islice(batches, num_batches)

  def batch_moments_of(variables, batch):
    _, mutated = apply_fn(variables, batch,
                          mutable=["batch_stats", "batch_moments"],
                          **apply_kwargs)
    moments = mutated.get("batch_moments") if isinstance(
        mutated, Mapping) else None
    if not moments:
      raise ValueError(
          "apply_fn stored no batch moments: run it in training mode (e.g. "
          "train=True / use_running_average=False) on a model built from "
          "bn_jax.nn batch-statistics modules, which fill the 'batch_moments' "
          "collection.")
    return moments

  @jax.jit
  def step(stats, variables, batch):
    return population_stats_update(stats, batch_moments_of(variables, batch))

  stats, seen = None, 0
  for batch in batches:
    if stats is None:
      shapes = jax.eval_shape(batch_moments_of, variables, batch)
      stats = population_stats_init(shapes)
    stats = step(stats, variables, batch)
    seen += 1
  if seen == 0:
    raise ValueError("batches is empty: PreciseBN needs at least one batch.")
  if num_batches is not None and seen < num_batches:
    raise ValueError(f"num_batches={num_batches} but batches yielded only "
                     f"{seen}.")
  return _write_back(variables["batch_stats"], population_stats_result(stats))
