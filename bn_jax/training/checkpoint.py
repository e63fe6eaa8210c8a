"""Checkpoints of the full TrainState with orbax, in ``<workdir>/checkpoints``.

Saved: params, batch_stats (CBN windows included), opt_state, step and the
PRNG key -- everything needed for a bit-identical resume. The data order is
not saved: it is a function of (seed, step) (see ``train.py``). Saves are
synchronous so that a donated state cannot be freed while it is written and
a crash never leaves a half-written "latest" checkpoint (orbax writes to a
temporary directory and renames it atomically).
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager``."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state) -> None:
    """Saves ``state`` under its step (overwriting nothing)."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state))
    self.manager.wait_until_finished()

  def restore(self, target, step: Optional[int] = None):
    """Restores into the structure, dtypes and shardings of ``target``."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.close()
