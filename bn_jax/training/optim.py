r"""Learning-rate schedules and optimizers (optax) from a training config.

Schedules (``config.schedule``), each optionally preceded by a linear warm-up
from 0 to ``learning_rate`` over ``warmup_steps`` (the schedule then runs over
the remaining ``T - warmup_steps`` steps, ``T = num_train_steps``):

* ``constant``: :math:`\eta_t = \eta`.
* ``cosine``: :math:`\eta_t = \tfrac{\eta}{2}(1 + \cos(\pi t / T'))`.
* ``step``: :math:`\eta_t = \eta \cdot f^{\#\{b:\ t \ge b T\}}` for the
  boundaries ``decay_boundaries`` (fractions of ``T``) and ``decay_factor`` f.
* ``linear``: :math:`\eta_t = \eta (1 - t / T')`.

Optimizers (``config.optimizer``): ``sgd`` (heavy-ball momentum
``config.momentum``, optionally Nesterov; plain SGD when momentum is 0),
``adam``, ``adamw`` (decoupled decay). For ``sgd``/``adam`` a positive
``weight_decay`` adds :math:`\lambda w` to the gradient (L2 regularisation).
Weight decay only touches kernels (``ndim > 1``): decaying the BN scale/shift
and biases is not what the papers do.
"""
from __future__ import annotations

import jax
import optax


def create_learning_rate_fn(config, num_train_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step count."""
  base = float(config.learning_rate)
  warmup = int(config.warmup_steps)
  remaining = max(num_train_steps - warmup, 1)
  if config.schedule == "constant":
    main = optax.constant_schedule(base)
  elif config.schedule == "cosine":
    main = optax.cosine_decay_schedule(base, decay_steps=remaining)
  elif config.schedule == "linear":
    main = optax.linear_schedule(base, 0.0, transition_steps=remaining)
  elif config.schedule == "step":
    boundaries = {}
    for fraction in config.decay_boundaries:
      # Boundaries count from the start of training, warm-up included.
      at = max(int(round(fraction * num_train_steps)) - warmup, 0)
      boundaries[at] = boundaries.get(at, 1.0) * float(config.decay_factor)
    main = optax.piecewise_constant_schedule(base, boundaries)
  else:
    raise ValueError(f"config.schedule must be one of constant, cosine, step, "
                     f"linear, got {config.schedule!r}.")
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, base, transition_steps=warmup)
  return optax.join_schedules([ramp, main], boundaries=[warmup])


def kernel_mask(params):
  """True for the leaves that weight decay applies to (kernels, ndim > 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """The optax transformation named by ``config.optimizer``."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
  wd = float(config.weight_decay)
  if config.optimizer == "adamw":
    parts.append(optax.adamw(learning_rate_fn, b1=config.adam_b1,
                             b2=config.adam_b2, weight_decay=wd,
                             mask=kernel_mask))
  else:
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=kernel_mask))
    if config.optimizer == "sgd":
      momentum = float(config.momentum) or None
      parts.append(optax.sgd(learning_rate_fn, momentum=momentum,
                             nesterov=bool(config.nesterov) and bool(momentum)))
    elif config.optimizer == "adam":
      parts.append(optax.adam(learning_rate_fn, b1=config.adam_b1,
                              b2=config.adam_b2))
    else:
      raise ValueError(f"config.optimizer must be one of sgd, adam, adamw, "
                       f"got {config.optimizer!r}.")
  return parts[0] if len(parts) == 1 else optax.chain(*parts)
