"""The training state: params, batch_stats, optimizer state, step and PRNG key.

``batch_stats`` holds everything a normalization layer keeps between steps:
BN running mean/variance, and for CBN also the window of past statistics,
their Jacobians and the past weights. It is a separate collection from
``params`` because it is updated by the forward pass, not by the optimizer.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax ``TrainState`` plus the model's ``batch_stats`` and a PRNG key.

  ``rng`` is constant; the key of step ``t`` is ``fold_in(rng, t)`` so a run
  resumed from a checkpoint draws exactly the same noise (noisy BN).
  """
  batch_stats: Any
  rng: jax.Array


def create_train_state(rng: jax.Array, model, tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initialises the model on zeros of ``input_shape`` and the optimizer.

  Args:
    rng: PRNG key; split into the parameter, init-noise and training keys.
    model: a flax module called as ``model(x, train=bool)``.
    tx: the optax transformation.
    input_shape: ``[batch, H, W, C]`` of one (per-device) batch.
  """
  params_rng, noise_rng, train_rng = jax.random.split(rng, 3)
  # Eager, not jitted: op-by-op kernels are cached across models and runs of
  # one process, while a jitted init recompiles every random initializer
  # (seconds on a CPU, for a once-per-run computation).
  variables = model.init({"params": params_rng, "noise": noise_rng},
                         jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                            batch_stats=batch_stats, rng=train_rng)
  # A device scalar (not a Python int) so checkpoints restore it exactly.
  return _unalias(state.replace(step=jnp.asarray(0, jnp.int32)))


def _unalias(tree):
  """Copies leaves that are the same array object as an earlier leaf.

  An eager init can put one array in several places (e.g. a CBN window
  initialised from the same zeros); ``donate_argnums`` refuses to donate a
  buffer twice, so every leaf of the state must own its buffer.
  """
  seen = set()

  def own(x):
    if isinstance(x, jax.Array):
      if id(x) in seen:
        return jnp.copy(x)
      seen.add(id(x))
    return x

  return jax.tree.map(own, tree)


def tree_all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def state_is_finite(state: TrainState) -> bool:
  """True when params, batch_stats and opt_state are all finite.

  Checked on the host, on the copy a checkpoint makes anyway: a jitted check
  compiles once per state structure (one per model; ~0.3-2 s each on a CPU,
  more than the check of an MLP's state costs in NumPy)."""
  leaves = jax.device_get(jax.tree.leaves(
      (state.params, state.batch_stats, state.opt_state)))
  return all(bool(np.all(np.isfinite(x))) for x in leaves
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


class TrainingDiverged(RuntimeError):
  """The loss or the state became NaN/inf; training stopped.

  Attributes:
    step: the 1-based training step whose loss (or resulting state) was not
      finite.
    last_checkpoint: step of the last checkpoint (all finite), or None.
  """

  def __init__(self, step: int, what: str, last_checkpoint, directory: str):
    self.step = int(step)
    self.last_checkpoint = last_checkpoint
    where = (f"the last good checkpoint (step {last_checkpoint}) in "
             f"{directory} is intact" if last_checkpoint is not None
             else "no checkpoint had been saved yet")
    super().__init__(
        f"Training diverged: {what} is not finite at step {self.step}; "
        f"stopped, and {where}. Lower config.learning_rate, add warm-up "
        f"(config.warmup_steps) or gradient clipping (config.grad_clip_norm).")
