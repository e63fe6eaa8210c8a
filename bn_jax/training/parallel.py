"""Data parallelism over all local devices with synchronized batch statistics.

One switch, ``config.data_parallel``. When on, the global batch is split along
axis 0 over a 1-D mesh of the local devices (axis ``'batch'``); the state is
replicated. ``train_step``/``eval_step`` run under ``jax.shard_map`` with
``axis_name='batch'``, and the model is built with the same ``axis_name`` so
its batch-statistics layers ``psum`` their moments (SyncBN): the trajectory
is that of one device on the whole batch (up to float summation order).

``check_vma=False``: the step functions make every output replicated
themselves (``psum`` of gradients and metrics, synced statistics), and the
transpose of ``psum`` must sum the per-device cotangents of the local losses.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bn_jax.training import steps

AXIS_NAME = "batch"


class StepFunctions(NamedTuple):
  """Jitted steps and how to place their inputs.

  Attributes:
    train_step: ``(state, batch) -> (state, metrics)``, state donated.
    eval_step: ``(state, batch) -> sums`` (state not donated: it is reused).
    put_state: places a state (replicated over the mesh, or as it is).
    batch_sharding: sharding for ``prefetch_to_device`` (None: default device).
    num_shards: devices the batch is split over (1 without data parallelism).
    axis_name: the model's ``axis_name`` (None without data parallelism).
  """
  train_step: Callable
  eval_step: Callable
  put_state: Callable
  batch_sharding: Optional[jax.sharding.Sharding]
  num_shards: int
  axis_name: Optional[str]


def make_step_functions(learning_rate_fn, *, data_parallel: bool,
                        devices=None) -> StepFunctions:
  """``train_step``/``eval_step`` jitted, single-device or data parallel."""
  if not data_parallel:
    train = jax.jit(functools.partial(steps.train_step,
                                      learning_rate_fn=learning_rate_fn),
                    donate_argnums=(0,))
    evaluate = jax.jit(steps.eval_step)
    return StepFunctions(train, evaluate, lambda s: s, None, 1, None)

  devices = jax.local_devices() if devices is None else devices
  mesh = Mesh(np.asarray(devices), (AXIS_NAME,))
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(AXIS_NAME))
  train = jax.jit(
      jax.shard_map(
          functools.partial(steps.train_step,
                            learning_rate_fn=learning_rate_fn,
                            axis_name=AXIS_NAME),
          mesh=mesh, in_specs=(P(), P(AXIS_NAME)), out_specs=(P(), P()),
          check_vma=False),
      donate_argnums=(0,))
  evaluate = jax.jit(
      jax.shard_map(
          functools.partial(steps.eval_step, axis_name=AXIS_NAME),
          mesh=mesh, in_specs=(P(), P(AXIS_NAME)), out_specs=P(),
          check_vma=False))
  put_state = lambda state: jax.device_put(state, replicated)
  return StepFunctions(train, evaluate, put_state, sharded, len(devices),
                       AXIS_NAME)
