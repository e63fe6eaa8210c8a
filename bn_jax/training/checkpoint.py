"""Checkpoints of the full TrainState with orbax, in ``<workdir>/checkpoints``.

Saved: params, batch_stats (CBN windows included), opt_state, step and the
PRNG key -- everything needed for a bit-identical resume. The data order is
not saved: it is a function of (seed, step) (see ``train.py``). Saves are
synchronous so that a donated state cannot be freed while it is written and
a crash never leaves a half-written "latest" checkpoint (orbax writes to a
temporary directory and renames it atomically).

A checkpoint can still be damaged afterwards (a full disk, a copy cut short,
files overwritten). Restoring the latest one then falls back to the newest
checkpoint that restores, with a warning naming the skipped ones, which are
moved aside to ``<directory>.unrestorable/<step>`` (kept for inspection, and
out of the way: otherwise the run would never rewrite that step and every
restart would trip over it again). If none restores, the error names the
directory and what to do.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional
import warnings

import jax


def _orbax():
  """``orbax.checkpoint``, imported when first used (~1-2 s: ``train.py``
  starts the import in a background thread, overlapping data loading and
  compilation)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in a directory could be restored."""


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager``."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    ocp = _orbax()
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
    self.manager.save(step, args=_orbax().args.StandardSave(state))
    self.manager.wait_until_finished()

  def restore(self, target, step: Optional[int] = None):
    """Restores into the structure, dtypes and shardings of ``target``.

    With ``step=None``: the newest checkpoint that restores. Newer ones that
    fail (damaged or half-written files) are skipped with a warning naming
    them and moved to ``<directory>.unrestorable/``. An explicit ``step`` is
    restored or raises (no fallback).

    Raises:
      CheckpointRestoreError: no checkpoint restores (the message names the
        directory, every step tried and the ways out).
    """
    abstract = jax.tree.map(_orbax().utils.to_shape_dtype_struct, target)
    if step is not None:
      return self._restore_step(step, abstract)
    failures = []
    for candidate in sorted(self.all_steps(), reverse=True):
      try:
        restored = self._restore_step(candidate, abstract)
      except Exception as e:  # orbax/tensorstore raise many types
        failures.append((candidate, e))
        continue
      for bad, error in failures:
        moved = self._move_aside(bad)
        warnings.warn(
            f"Checkpoint step {bad} in {self.directory} could not be restored "
            f"({type(error).__name__}: {_first_line(error)}); resuming from "
            f"step {candidate} instead. The damaged checkpoint was moved to "
            f"{moved}.", RuntimeWarning, stacklevel=2)
      return restored
    tried = "; ".join(f"step {s}: {type(e).__name__}: {_first_line(e)}"
                      for s, e in failures) or "no checkpoints"
    raise CheckpointRestoreError(
        f"No checkpoint in {self.directory} could be restored ({tried}). "
        "Either delete that directory to start the run from scratch, or use "
        "a fresh --workdir and keep this one for inspection.")

  def _restore_step(self, step: int, abstract):
    return self.manager.restore(step,
                                args=_orbax().args.StandardRestore(abstract))

  def _move_aside(self, step: int) -> str:
    """Moves checkpoint ``step`` out of the manager's directory."""
    source = os.path.join(self.directory, str(step))
    destination = os.path.join(self.directory + ".unrestorable", str(step))
    if os.path.exists(destination):
      shutil.rmtree(destination)
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    if os.path.isdir(source):
      shutil.move(source, destination)
    self.manager.reload()
    return destination

  def close(self) -> None:
    self.manager.close()


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else "")[:limit]
