r"""The training loop: the one place where training steps are run.

``train.py`` and every script in ``experiments/`` train through this module:

* :func:`create_state`: optimizer, schedule and :class:`TrainState` of a model
  under a training config.
* :func:`train_loop`: ``(state, batches) -> state``, one jitted step per
  dispatch, or ``steps_per_dispatch`` steps in one jitted ``lax.scan``
  (:func:`step_runner`), the host reading the metrics back only at *sync*
  steps (every
  ``sync_every`` steps, at ``sync_at`` and at the end: a read-back per step
  would stall the dispatch queue). At a sync it checks every pending loss for
  NaN/inf (training stops at the first non-finite one, named exactly) and
  calls the periodic hooks (``on_sync``: logging, evaluation, PreciseBN,
  checkpoints); ``before_step`` runs before an update (analysis instruments,
  which measure the state a step starts from).
* :class:`Trainer`: the same steps over device-resident data, optionally
  ``n`` steps in one jitted ``lax.scan`` (:func:`step_runner`), equal to as
  many single steps (tests/test_experiments_bn_santurkar.py,
  tests/test_multistep.py). Tiny dense models
  (the BN paper's 3x100 MLP, ~0.1 ms of math per step) are dominated by
  Python dispatch otherwise; XLA:CPU runs convolutions inside a scanned loop
  ~100x slower than in a plain jitted step, so conv nets dispatch one step at
  a time (``scan=False``).
* :func:`evaluate` (exact, padded and masked, totals added in float64) and
  :func:`precise_bn_state` (PreciseBN population statistics, Wu & Johnson
  2021).

The step functions themselves are :func:`bn_jax.training.steps.train_step` /
``eval_step``, jitted by :func:`bn_jax.training.parallel.make_step_functions`.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax.training import input_pipeline, optim, parallel
from bn_jax.training.steps import eval_step, train_step
from bn_jax.training.train_state import create_train_state


def create_state(config, model, *, input_shape: tuple, num_train_steps: int,
                 seed: Optional[int] = None):
  """``(state, learning_rate_fn, tx)`` of ``model`` under ``config`` (the
  optimizer and schedule keys of ``bn_jax.training.base_config()``),
  initialized from ``PRNGKey(seed)`` (default ``config.seed``) on zeros of
  ``input_shape`` (one per-device batch)."""
  learning_rate_fn = optim.create_learning_rate_fn(config, num_train_steps)
  tx = optim.create_optimizer(config, learning_rate_fn)
  seed = config.seed if seed is None else seed
  state = create_train_state(jax.random.PRNGKey(seed), model, tx,
                             tuple(input_shape))
  return state, learning_rate_fn, tx


def evaluate(eval_fn, state, batches: Iterable[dict]) -> dict:
  """Exact loss/accuracy over ``batches`` (the last one padded and masked):
  the sums of ``eval_fn`` (a jitted ``eval_step``), totals added in float64,
  divided at the end."""
  totals = np.zeros(3, np.float64)
  for batch in batches:
    sums = eval_fn(state, batch)
    totals += np.asarray(jax.device_get(
        (sums["loss_sum"], sums["correct"], sums["count"])), np.float64)
  count = max(totals[2], 1.0)
  return {"test_loss": float(totals[0] / count),
          "test_accuracy": float(totals[1] / count),
          "test_examples": int(totals[2])}


def precise_bn_state(state, apply_fn: Callable, batches: Iterator[dict], *,
                     num_batches: int):
  """``state`` with PreciseBN population statistics (Wu & Johnson, 2021):
  the exact average of the per-batch moments of ``num_batches`` training
  ``batches`` under the frozen weights. For evaluation only; training goes
  on from the EMA statistics.

  Args:
    state: a :class:`TrainState`.
    apply_fn: ``model.apply`` of a model without ``axis_name`` (PreciseBN
      runs on one device over the global batch).
    batches: training batches (``image``; the noise key of noisy BN is
      derived from ``state.rng``).
    num_batches: how many.
  """
  from bn_jax import precise_batch_stats
  if not jax.tree.leaves(state.batch_stats):
    return state  # no batch-statistics layer (none/gn/ln)
  batch_stats = precise_batch_stats(
      lambda v, b, **kw: apply_fn(v, b["image"], **kw),
      {"params": state.params, "batch_stats": state.batch_stats},
      (jax.tree.map(jnp.asarray, b) for b in batches),
      num_batches=num_batches, train=True,
      rngs={"noise": jax.random.fold_in(state.rng, 2)})
  return state.replace(batch_stats=batch_stats)


def precise_bn_state_from_dataset(state, apply_fn: Callable, train_ds,
                                  config, *, samples: int, batch_size: int,
                                  seed_offset: int):
  """:func:`jitted_precise_bn_state` over ``samples`` training samples of
  ``train_ds`` (rounded up to whole batches of ``batch_size``, at most the
  dataset), drawn by :func:`input_pipeline.train_iterator` with ``config``'s
  seed and augmentation from the stream ``seed_offset`` (> 0: not the
  training order)."""
  import ml_collections
  batch_size = min(int(batch_size), len(train_ds.images))
  precise_config = ml_collections.ConfigDict(config.to_dict())
  precise_config.batch_size = batch_size
  batches = input_pipeline.train_iterator(train_ds, precise_config,
                                          start_step=0,
                                          seed_offset=seed_offset)
  num_batches = -(-int(samples) // batch_size)
  images = np.stack([next(batches)["image"] for _ in range(num_batches)])
  return jitted_precise_bn_state(apply_fn)(state, images)


@functools.lru_cache(maxsize=16)
def jitted_precise_bn_state(apply_fn: Callable) -> Callable:
  """:func:`precise_bn_state` as one jitted ``(state, images) -> state``
  over stacked batches ``images`` [num_batches, batch, ...]: compiled once
  per ``apply_fn`` (cached; Flax models compare by value) and batch shape,
  so periodic PreciseBN evaluations do not retrace."""

  @jax.jit
  def precise(state, images):
    batches = ({"image": images[i]} for i in range(images.shape[0]))
    return precise_bn_state(state, apply_fn, batches,
                            num_batches=images.shape[0])
  return precise


def step_runner(step_fn: Callable, *, scan: bool,
                gather: Optional[Callable] = None,
                donate: bool = False) -> Callable:
  """``step_fn`` as one jitted dispatch: ``run(state, batch, data)``.

  Args:
    step_fn: ``(state, batch) -> (state, metrics)``, not jitted (e.g.
      ``functools.partial(steps.train_step, learning_rate_fn=...)``).
    scan: False: ``run`` makes one step. True: ``batch`` is stacked along a
      leading axis of length ``n`` and ``run`` makes the ``n`` steps in one
      ``lax.scan``; it returns the final state and the ``n`` steps' metrics
      stacked. The scanned body is the same computation as one step
      (tests/test_multistep.py compares them).
    gather: ``gather(data, batch) -> {'image', 'label'}``, the step's batch
      made inside jit from device-resident ``data`` (:func:`index_gather`,
      :func:`device_pipeline_gather`); None: ``batch`` is the batch and
      ``data`` is ignored.
    donate: donate ``state`` (the caller must not reuse it).

  Returns:
    The jitted ``run(state, batch, data) -> (state, metrics)``; one
    compilation per scan length and batch shape.
  """
  def one(state, batch, data):
    if gather is not None:
      batch = gather(data, batch)
    return step_fn(state, batch)

  def many(state, batches, data):
    return jax.lax.scan(lambda s, b: one(s, b, data), state, batches)

  return jax.jit(many if scan else one,
                 donate_argnums=(0,) if donate else ())


def index_gather(data, index):
  """The batch of example indices ``index`` of ``data = (images, labels)``
  (:func:`input_pipeline.normalized_arrays`): the host pipeline's batch
  without augmentation, bit for bit (the same table lookup)."""
  images, labels = data
  return {"image": images[index], "label": labels[index]}


def device_pipeline_gather(*, batch_size: int, seed: int, augment: bool):
  """``gather(device_dataset, step)``: the batch of (0-based) ``step`` from
  :func:`bn_jax.data.batch_at` (order, crops and flips from ``(seed,
  step)``)."""
  from bn_jax.data import batch_at
  return lambda data, step: batch_at(data, step, batch_size=batch_size,
                                     seed=seed, augment=augment)


# Models without convolutions: XLA:CPU runs them inside lax.scan as fast as
# outside (the slow loop emitter hits convolutions only).
DENSE_MODELS = ("mlp", "deep_linear")
# steps_per_dispatch=0 (auto) where scanning pays: at most this many steps
# per dispatch (a dispatch also ends at every sync, evaluation, checkpoint).
AUTO_STEPS_PER_DISPATCH = 100


def resolve_steps_per_dispatch(config, platform: Optional[str] = None) -> int:
  """``config.steps_per_dispatch``, its 0 (auto) made concrete.

  Auto: 1 with analysis instruments (they see every step's state) or data
  parallelism; else :data:`AUTO_STEPS_PER_DISPATCH` on GPU/TPU, and on CPU
  for :data:`DENSE_MODELS`; 1 for conv nets on CPU (module docstring).
  ``platform`` defaults to ``jax.default_backend()``.
  """
  if config.steps_per_dispatch > 0:
    return int(config.steps_per_dispatch)
  if config.analysis or config.data_parallel:
    return 1
  platform = jax.default_backend() if platform is None else platform
  if platform != "cpu" or config.model in DENSE_MODELS:
    return AUTO_STEPS_PER_DISPATCH
  return 1


def is_due(step: int, every: int, last: int) -> bool:
  """Whether to measure at ``step``: every ``every`` steps and at ``last``."""
  return (every > 0 and step % every == 0) or step == last


class LoopResult(NamedTuple):
  """What :func:`train_loop` returns.

  Attributes:
    state: the state after the last step run.
    curve: ``(step, mean loss, mean accuracy)`` per sync, over the steps since
      the previous sync.
    status: ``'ok'`` or ``'diverged at step N'`` (the first step whose loss
      was not finite; training stopped at the sync that saw it).
    diverged: ``(step, loss)`` of that step, or None.
    first_step_seconds: time to the end of the first step (compilation).
    train_seconds: time in training steps after the first one, the hooks
      excluded.
    timed_steps: the steps ``train_seconds`` covers.
  """
  state: object
  curve: list
  status: str
  diverged: Optional[tuple]
  first_step_seconds: float
  train_seconds: float
  timed_steps: int


def _next_sync(step: int, sync_every: int, sync_at: list, end_step: int
               ) -> int:
  """The first sync step after ``step``."""
  candidates = [end_step] + [s for s in sync_at if s > step]
  if sync_every > 0:
    candidates.append((step // sync_every + 1) * sync_every)
  return min(candidates)


def _dispatch_length(start_step: int, end_step: int, sync_every: int,
                     sync_at: list, most: int) -> int:
  """The largest ``n <= most`` dividing every distance between consecutive
  sync steps from ``start_step`` to ``end_step``: dispatches of ``n`` steps
  then end exactly at every sync, and the scan compiles for one length."""
  gap, step = 0, start_step
  while step < end_step:
    following = _next_sync(step, sync_every, sync_at, end_step)
    gap = math.gcd(gap, following - step)
    if gap <= 1:
      return 1
    step = following
  return max(d for d in range(1, min(most, max(gap, 1)) + 1)
             if gap % d == 0) if gap else 1


def stack_batches(batches: list):
  """``n`` batches (dicts of arrays, or index / step arrays) stacked along a
  new leading axis, on the host (one transfer per dispatch)."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                      *batches)


def train_loop(step_fn: Optional[Callable], state, batches: Iterator, *,
               end_step: int, start_step: int = 0, sync_every: int = 0,
               sync_at: Iterable[int] = (),
               on_sync: Optional[Callable] = None,
               before_step: Optional[Callable] = None,
               steps_per_dispatch: int = 1,
               multi_step_fn: Optional[Callable] = None) -> LoopResult:
  """Steps ``start_step + 1 .. end_step``, one jitted dispatch each, or
  ``steps_per_dispatch`` steps per dispatch.

  Args:
    step_fn: ``(state, batch) -> (state, metrics)`` (jitted; ``metrics``
      holds scalar ``loss`` and ``accuracy``, optionally ``learning_rate``).
      Unused (may be None) when ``steps_per_dispatch > 1``.
    state: the state after ``start_step`` steps.
    batches: batches with ``image`` and ``label`` (other keys are dropped),
      the first one for step ``start_step + 1``; or whatever ``step_fn``
      takes as its batch (example indices, step numbers: see
      :func:`step_runner`'s ``gather``).
    end_step: the last step to run.
    start_step: steps already done (a resumed run).
    sync_every, sync_at: the sync steps (see the module docstring); the last
      step always syncs.
    on_sync: ``on_sync(step, state, window)`` at each sync, ``window`` the
      means over the steps since the previous sync (``train_loss``,
      ``train_accuracy``), the last ``learning_rate`` and, when timed,
      ``steps_per_sec``. Its time is not training time.
    before_step: ``before_step(step, state, batch)`` before step ``step``'s
      update (not timed either); only with ``steps_per_dispatch=1``.
    steps_per_dispatch: ``n >= 1``: up to ``n`` steps per dispatch through
      ``multi_step_fn``; a dispatch never crosses a sync step, so metrics,
      evaluations, checkpoints and the divergence check happen at the same
      steps, on the same states, as with one step per dispatch. Every
      dispatch has the same length (the largest divisor of the gaps between
      syncs up to ``n``): one compilation.
    multi_step_fn: ``(state, stacked batches) -> (state, stacked metrics)``
      (:func:`step_runner` with ``scan=True``), for ``steps_per_dispatch > 1``.

  Returns:
    A :class:`LoopResult`. With ``n > 1``, ``first_step_seconds`` is the
    first dispatch's time (it compiles) and its steps are not timed.
  """
  if isinstance(steps_per_dispatch, bool) or not isinstance(
      steps_per_dispatch, int) or steps_per_dispatch < 1:
    raise ValueError(f"steps_per_dispatch must be an int >= 1, got "
                     f"{steps_per_dispatch!r}.")
  multi = steps_per_dispatch > 1
  if multi and multi_step_fn is None:
    raise ValueError("steps_per_dispatch > 1 needs multi_step_fn (a "
                     "step_runner with scan=True).")
  if multi and before_step is not None:
    raise ValueError("before_step needs steps_per_dispatch=1 (it sees the "
                     "state before every step).")
  if not multi and step_fn is None:
    raise ValueError("step_fn is None but steps_per_dispatch=1.")
  sync_at = sorted(set(sync_at))
  if multi:
    steps_per_dispatch = _dispatch_length(start_step, end_step, sync_every,
                                          sync_at, steps_per_dispatch)
  curve, pending, status, diverged = [], [], "ok", None
  first_step_seconds = train_seconds = 0.0
  timed_steps = window_steps = 0
  window_start = time.perf_counter()
  step = start_step
  while step < end_step:
    sync = _next_sync(step, sync_every, sync_at, end_step)
    count = min(steps_per_dispatch, sync - step) if multi else 1
    chunk = []
    for _ in range(count):
      batch = next(batches)
      if isinstance(batch, dict):
        batch = {"image": batch["image"], "label": batch["label"]}
      chunk.append(batch)
    if multi:
      state, metrics = multi_step_fn(state, stack_batches(chunk))
    else:
      if before_step is not None:
        t0 = time.perf_counter()
        before_step(step + 1, state, chunk[0])
        window_start += time.perf_counter() - t0
      state, metrics = step_fn(state, chunk[0])
    pending.append(metrics)
    first = step == start_step
    step += count
    if first:
      # The first dispatch compiles: keep it out of the throughput.
      jax.block_until_ready(metrics)
      first_step_seconds = time.perf_counter() - window_start
      window_start = time.perf_counter()
    else:
      window_steps += count
    if step != sync:
      continue
    host = jax.device_get(pending)
    pending = []
    # One record per step: a dispatch's metrics are stacked [count].
    host = ([{k: v[i] for k, v in m.items()} for m in host
             for i in range(len(m["loss"]))] if multi else host)
    losses = np.asarray([m["loss"] for m in host], np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      first_bad = step - len(host) + 1 + int(bad[0])
      status = f"diverged at step {first_bad}"
      diverged = (first_bad, float(losses[bad[0]]))
      break
    elapsed = time.perf_counter() - window_start
    # Plain left-to-right sums (not NumPy's pairwise ones): the logged means
    # are reproducible to the last bit across versions of this loop.
    window = {"train_loss": sum(float(m["loss"]) for m in host) / len(host),
              "train_accuracy": sum(float(m["accuracy"]) for m in host)
                                / len(host)}
    if "learning_rate" in host[-1]:
      window["learning_rate"] = float(host[-1]["learning_rate"])
    if window_steps and elapsed > 0:
      window["steps_per_sec"] = window_steps / elapsed
    train_seconds += elapsed
    timed_steps += window_steps
    window_steps = 0
    curve.append((step, window["train_loss"], window["train_accuracy"]))
    if on_sync is not None:
      on_sync(step, state, window)
    window_start = time.perf_counter()
  return LoopResult(state, curve, status, diverged, first_step_seconds,
                    train_seconds, timed_steps)


DIVERGED = "diverged (non-finite loss) before step {step}"


class Trainer:
  """One model + optimizer, trained ``train(n)`` steps at a time.

  Without augmentation the whole (normalized) training set lives on the
  device and a step's batch is gathered inside jit from its example indices
  (the library's order, :func:`input_pipeline.epoch_index_batches`); with
  augmentation the batches come from ``input_pipeline.train_iterator``.

  Args:
    model: a flax module from ``create_model``.
    settings: a training config (optimizer, schedule, ``batch_size``,
      ``seed`` of the data order, ``augment``, ``eval_batch_size``).
    train_ds, test_ds: datasets (``input_pipeline.load_train_test``).
    num_train_steps: length of the schedule.
    seed: parameter init / noise seed.
    device_data: ``(images, labels)`` from
      :func:`input_pipeline.normalized_arrays`, to share one device copy
      between runs (computed if None).
    scan: run ``train(n)`` as one ``lax.scan`` of ``n`` steps (one dispatch;
      best for tiny dense models and accelerators). ``False`` dispatches one
      jitted step at a time (conv nets on XLA:CPU, see the module docstring).

  Attributes:
    curve: ``(step, mean train loss, mean train accuracy)`` per ``train``.
    status: ``'ok'`` or, after a ``train`` with a non-finite loss,
      ``'diverged (non-finite loss) before step N'``.
  """

  def __init__(self, model, settings, train_ds, test_ds, *,
               num_train_steps: int, seed: int = 0, device_data=None,
               scan: bool = True):
    self.model = model
    self.settings = settings
    self.train_ds, self.test_ds = train_ds, test_ds
    self.num_train_steps = int(num_train_steps)
    input_shape = (settings.batch_size,) + tuple(train_ds.images.shape[1:])
    self.state, self.learning_rate_fn, self.tx = create_state(
        settings, model, num_train_steps=self.num_train_steps,
        input_shape=input_shape, seed=seed)
    self.step = 0
    self.curve = []
    self.status = "ok"
    self.on_device = not settings.augment
    if self.on_device:
      self._images, self._labels = (
          device_data if device_data is not None
          else input_pipeline.normalized_arrays(train_ds))
      self._batches = input_pipeline.epoch_index_batches(
          len(train_ds.labels), settings.batch_size, seed=settings.seed)
    else:
      self._batches = input_pipeline.train_iterator(train_ds, settings)
    step_fn = functools.partial(train_step,
                                learning_rate_fn=self.learning_rate_fn)
    self.scan = bool(scan)
    self._dispatch = step_runner(
        step_fn, scan=self.scan,
        gather=index_gather if self.on_device else None)
    self._eval_step = jax.jit(eval_step)
    self.train_seconds = 0.0
    self.timed_steps = 0
    self._compiled_for = set()
    self._eval_batches = {}

  def _next(self):
    """The next step's batch: example indices (device data) or a batch."""
    if self.on_device:
      return next(self._batches)
    batch = next(self._batches)
    return {"image": batch["image"], "label": batch["label"]}

  def _run(self, state, batch):
    data = (self._images, self._labels) if self.on_device else None
    state, metrics = self._dispatch(state, batch, data)
    return state, (metrics["loss"], metrics["accuracy"])

  def train(self, num_steps: int) -> dict:
    """Trains ``num_steps`` steps; returns their mean loss/accuracy and
    whether every loss stayed finite (and appends them to ``curve``)."""
    t0 = time.perf_counter()
    batches = [self._next() for _ in range(num_steps)]
    if self.scan:
      state, (losses, accs) = self._run(self.state, stack_batches(batches))
      compiled_for = num_steps  # one compilation per scan length
    else:
      state, metrics = self.state, []
      for batch in batches:
        state, m = self._run(state, batch)
        metrics.append(m)
      losses, accs = zip(*metrics)
      compiled_for = 1  # one compilation for every length
    losses, accs = (np.asarray(v) for v in jax.device_get((losses, accs)))
    elapsed = time.perf_counter() - t0
    # The first call of a compiled shape compiles; keep it out of the timing.
    if compiled_for in self._compiled_for:
      self.train_seconds += elapsed
      self.timed_steps += num_steps
    self._compiled_for.add(compiled_for)
    self.state = state
    self.step += num_steps
    finite = bool(np.all(np.isfinite(losses)))
    out = {"train_loss": float(np.mean(losses)) if finite else float("nan"),
           "train_accuracy": float(np.mean(accs)), "finite": finite}
    self.curve.append((self.step, out["train_loss"], out["train_accuracy"]))
    if not finite:
      self.status = DIVERGED.format(step=self.step)
    return out

  def train_chunks(self, until: int, chunk_steps: int) -> Iterator[dict]:
    """Trains up to step ``until`` in chunks of at most ``chunk_steps``,
    yielding each chunk's :meth:`train` output (measure between chunks);
    stops at the first chunk whose loss is not finite (``status``)."""
    while self.step < until and self.status == "ok":
      out = self.train(min(chunk_steps, until - self.step))
      if out["finite"]:
        yield out

  def evaluate(self, ds=None) -> dict:
    """Loss/accuracy over ``ds`` (default: the test set), running stats."""
    ds = self.test_ds if ds is None else ds
    if id(ds) not in self._eval_batches:  # normalize once, keep on device
      self._eval_batches[id(ds)] = [
          jax.tree.map(jnp.asarray, b)
          for b in input_pipeline.eval_iterator(ds, self.settings)]
    out = evaluate(self._eval_step, self.state, self._eval_batches[id(ds)])
    return {"test_loss": out["test_loss"],
            "test_accuracy": out["test_accuracy"]}

  @property
  def variables(self) -> dict:
    return {"params": self.state.params, "batch_stats": self.state.batch_stats}

  def seconds_per_step(self) -> Optional[float]:
    return (self.train_seconds / self.timed_steps) if self.timed_steps else None


def step_functions(learning_rate_fn) -> parallel.StepFunctions:
  """Single-device jitted ``train_step`` (state donated) / ``eval_step``."""
  return parallel.make_step_functions(learning_rate_fn, data_parallel=False)
