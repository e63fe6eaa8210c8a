"""The training configuration: every key with its default, and its validation.

Every file in ``configs/`` starts from :func:`base_config` and changes values,
so the set of keys is defined once, here, including every keyword argument of
every norm module with its default (``norm_kwargs.<norm>.<name>``, read from
the modules by :func:`bn_jax.models.norms.configurable_norm_kwargs`), so any
of them can be overridden from the command line
(``--config.norm_kwargs.cbn.momentum=0.9``).

:func:`validate_config` runs before any data is loaded or anything is
compiled and raises ``ValueError`` (or ``TypeError``) naming the offending key
(``config.batch_size``, ...). It checks the scalar keys here, then builds each
model abstractly (``jax.eval_shape`` of init and of a training-mode forward on
one batch of the dataset's shape): the models and norm modules check their own
arguments, and an error is reported under the key that causes it, found by
elimination (the same build with that key at its default succeeds), never by
reading the error's text.

``ml_collections`` already refuses command-line overrides of keys that do not
exist (``--config.batchsize=8`` is an error); :func:`validate_config` also
catches unknown keys added by a config file and bad values.
"""
from __future__ import annotations

import math
import numbers

import ml_collections

from bn_jax import data as data_lib
from bn_jax import models
from bn_jax.models import norms as norms_lib
from bn_jax.training import synthetic_data

# The names are defined next to what they name; imported here.
DATASETS = tuple(data_lib.DATASETS) + (synthetic_data.NAME,)
DATA_SOURCES = data_lib.datasets.SOURCES
MODELS = models.MODELS
NORMS = models.NORMS
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step", "linear")
ANALYSES = ("ics", "landscape", "percentiles")
INPUT_PIPELINES = ("host", "device")


def _norm_kwargs_defaults() -> ml_collections.ConfigDict:
  """``{norm: {argument: default}}`` of every norm module; an argument whose
  default is None is a typed placeholder (command-line overridable)."""
  out = ml_collections.ConfigDict()
  for norm in NORMS:
    if norm == "none":
      continue
    out[norm] = ml_collections.ConfigDict({
        name: (ml_collections.config_dict.placeholder(kind)
               if default is None else default)
        for name, (kind, default)
        in norms_lib.configurable_norm_kwargs(norm).items()})
  return out


def base_config() -> ml_collections.ConfigDict:
  """All keys of a training config with their defaults (a small BN MLP run)."""
  c = ml_collections.ConfigDict()

  # Data.
  c.dataset = "digits"          # one of DATASETS
  c.data_dir = ""               # '' = the data helper's default location
  c.data_source = "auto"        # one of DATA_SOURCES (ignored by digits)
  c.augment = False             # random crop + flip (CIFAR)
  # Only used by dataset='synthetic_gaussian' (see training/synthetic_data.py).
  c.synthetic = ml_collections.ConfigDict(dict(
      num_train=2048, num_test=512, dim=64, num_classes=10, noise=0.0))

  # Model.
  c.model = "mlp"               # one of MODELS
  c.model_kwargs = ml_collections.ConfigDict()  # passed to create_model
  c.norms = ("bn",)             # one run per entry (a comparison when > 1)
  # Per-norm constructor arguments with their defaults (every argument of
  # every norm module): set e.g. norm_kwargs.cbn.window = 4.
  c.norm_kwargs = _norm_kwargs_defaults()

  # Optimisation.
  c.batch_size = 128            # global (over all devices when data parallel)
  c.eval_batch_size = 256
  c.num_train_steps = -1        # -1: derived from num_epochs
  c.num_epochs = 1.0
  c.optimizer = "sgd"           # one of OPTIMIZERS
  c.learning_rate = 0.1
  c.momentum = 0.9              # sgd only; 0 = plain SGD
  c.nesterov = False
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.weight_decay = 0.0          # on kernels only (ndim > 1), not on BN/bias
  c.grad_clip_norm = 0.0        # 0 = no clipping
  c.schedule = "constant"       # one of SCHEDULES
  c.warmup_steps = 0            # linear warm-up from 0 before the schedule
  c.decay_boundaries = (0.5, 0.75)  # 'step': fractions of num_train_steps
  c.decay_factor = 0.1          # 'step': multiply at each boundary

  # Execution.
  c.seed = 0
  c.half_precision = False      # bfloat16 activations; f32 params/statistics
  c.data_parallel = False       # shard the batch over all local devices, SyncBN
  # Train steps per dispatch (one jitted lax.scan over that many steps; equal
  # to as many single steps): 0 = auto, i.e. up to 100 (never across a
  # sync, evaluation or checkpoint) on GPU/TPU and, on CPU, for models
  # without convolutions (mlp, deep_linear); 1 for conv nets on CPU, where
  # XLA runs convolutions inside a loop ~10-100x slower (loop.Trainer).
  c.steps_per_dispatch = 0
  # Where the training batches are made (INPUT_PIPELINES):
  # 'host': NumPy order and augmentation (bn_jax.data.epoch_batches); without
  #   augmentation the normalized set stays on the device and only each
  #   step's example indices travel (the same batches, bit for bit).
  # 'device': the uint8 set on the device, order and crops/flips drawn in jit
  #   from (seed, step) (bn_jax.data.batch_at; image datasets, one device):
  #   the same distribution of batches as 'host', not the same draws.
  c.input_pipeline = "host"

  # Bookkeeping.
  c.log_every = 50              # steps between train-metric lines
  c.eval_every = 0              # steps between evaluations; 0 = at the end
  c.checkpoint_every = 0        # steps between checkpoints; 0 = at the end
  c.keep_checkpoints = 3
  c.save_checkpoints = True
  # Also evaluate with PreciseBN population statistics (Wu & Johnson 2021:
  # 10^3-10^4 samples suffice) of this many training samples, in batches of
  # precise_bn_batch_size (independent of the training batch); 0 = off.
  c.precise_bn_samples = 1024
  c.precise_bn_batch_size = 128
  c.analysis = ()               # subset of ANALYSES
  c.analysis_every = 0          # steps between analysis calls; 0 = never
  c.progress_bar = True
  c.plots = True

  # A comparison in several parts (e.g. the default run: batch 16 and batch
  # 2): part name -> overrides of the keys above (nested like them, e.g.
  # {'batch_size': 2, 'norm_kwargs': {'cbn': {'window': 8}}}). Each part
  # trains its config.norms in <workdir>/<part>/<norm>; one results table
  # and one figure. Empty: one part, the config itself (<workdir>/<norm>).
  c.parts = ml_collections.ConfigDict()
  return c


def _fail(key: str, message: str, value) -> None:
  raise ValueError(f"config.{key} {message}, got {value!r}.")


def _int(config, key, *, minimum=None, allow=()):
  value = _lookup(config, key)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"config.{key} must be an int, got {value!r}.")
  if value in allow:
    return value
  if minimum is not None and value < minimum:
    extra = f" (or one of {allow})" if allow else ""
    _fail(key, f"must be >= {minimum}{extra}", value)
  return value


def _number(config, key, *, low=None, high=None, low_open=False,
            high_open=False):
  value = _lookup(config, key)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"config.{key} must be a number, got {value!r}.")
  value = float(value)
  if not math.isfinite(value):
    _fail(key, "must be finite", value)
  if low is not None and (value < low or (low_open and value == low)):
    _fail(key, f"must be {'>' if low_open else '>='} {low}", value)
  if high is not None and (value > high or (high_open and value == high)):
    _fail(key, f"must be {'<' if high_open else '<='} {high}", value)
  return value


def _choice(config, key, choices):
  value = _lookup(config, key)
  if value not in choices:
    _fail(key, f"must be one of {choices}", value)
  return value


def _bool(config, key):
  value = _lookup(config, key)
  if not isinstance(value, bool):
    raise TypeError(f"config.{key} must be True or False, got {value!r}.")
  return value


def _lookup(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _check_keys(config, reference, prefix="") -> None:
  """Unknown keys (typos in a config file) fail with their full name."""
  for key in config.keys():
    if not prefix and key == "parts":
      continue  # each part is checked as a whole config (validate_config)
    if key not in reference:
      raise ValueError(
          f"config.{prefix}{key} is not a known config key; known keys: "
          f"{sorted(reference.keys())}.")
    if isinstance(reference[key], ml_collections.ConfigDict) and (
        prefix or key != "model_kwargs"):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise TypeError(f"config.{prefix}{key} must be a ConfigDict, got "
                        f"{config[key]!r}.")
      _check_keys(config[key], reference[key], prefix=f"{prefix}{key}.")


def _check_norm_kwargs(config) -> None:
  """Every entry of ``config.norm_kwargs`` is keyed by a norm and is a dict
  (the values are checked by the modules themselves: :func:`check_model`)."""
  for norm in config.norm_kwargs.keys():
    if norm not in NORMS or norm == "none":
      _fail(f"norm_kwargs.{norm}", f"is keyed by an unknown norm (known: "
            f"{NORMS[1:]})", norm)
    kwargs = config.norm_kwargs[norm]
    if not isinstance(kwargs, (ml_collections.ConfigDict, dict)):
      raise TypeError(f"config.norm_kwargs.{norm} must be a dict of the norm "
                      f"module's arguments, got {kwargs!r}.")


def _num_shards(config) -> int:
  if not config.data_parallel:
    return 1
  import jax  # only imported when data parallelism asks for the device count
  return jax.local_device_count()


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError/TypeError naming the first bad key of ``config``."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"config must be an ml_collections.ConfigDict, got "
                    f"{type(config).__name__}.")
  _check_keys(config, base_config())
  if not isinstance(config.parts, ml_collections.ConfigDict):
    raise TypeError(f"config.parts must be a ConfigDict of part name -> "
                    f"overrides, got {config.parts!r}.")
  if config.parts:
    for name, part in config_parts(config):
      try:
        validate_config(part)
      except (ValueError, TypeError) as e:
        raise type(e)(f"{e} (in part {name!r}: config.parts.{name} "
                      f"overrides the keys above)") from e
    return

  _choice(config, "dataset", DATASETS)
  _choice(config, "data_source", DATA_SOURCES)
  if not isinstance(config.data_dir, str):
    raise TypeError(f"config.data_dir must be a string ('' for the default), "
                    f"got {config.data_dir!r}.")
  _bool(config, "augment")
  if config.dataset == "synthetic_gaussian":
    for key in ("num_train", "num_test", "dim"):
      _int(config, f"synthetic.{key}", minimum=1)
    _int(config, "synthetic.num_classes", minimum=2)
    _number(config, "synthetic.noise", low=0.0)

  _choice(config, "model", MODELS)
  if not isinstance(config.model_kwargs, ml_collections.ConfigDict):
    raise TypeError(f"config.model_kwargs must be a ConfigDict, got "
                    f"{config.model_kwargs!r}.")
  norms = config.norms
  if isinstance(norms, str):
    raise TypeError(f"config.norms must be a tuple of norm names, e.g. "
                    f"('{norms}',), got the string {norms!r}.")
  if not norms:
    _fail("norms", "must name at least one norm", norms)
  for norm in norms:
    if norm not in NORMS:
      _fail("norms", f"contains an unknown norm {norm!r} (known: {NORMS})",
            norms)
  if len(set(norms)) != len(norms):
    _fail("norms", "repeats a norm", norms)
  _check_norm_kwargs(config)

  batch_size = _int(config, "batch_size", minimum=1)
  eval_batch_size = _int(config, "eval_batch_size", minimum=1)
  _int(config, "num_train_steps", minimum=1, allow=(-1,))
  if config.num_train_steps == -1:
    _number(config, "num_epochs", low=0.0, low_open=True)
  _choice(config, "optimizer", OPTIMIZERS)
  _number(config, "learning_rate", low=0.0, low_open=True)
  _number(config, "momentum", low=0.0, high=1.0, high_open=True)
  _bool(config, "nesterov")
  _number(config, "adam_b1", low=0.0, high=1.0, high_open=True)
  _number(config, "adam_b2", low=0.0, high=1.0, high_open=True)
  _number(config, "weight_decay", low=0.0)
  _number(config, "grad_clip_norm", low=0.0)
  _choice(config, "schedule", SCHEDULES)
  _int(config, "warmup_steps", minimum=0)
  if config.schedule == "step":
    boundaries = config.decay_boundaries
    if not isinstance(boundaries, (tuple, list)) or not boundaries:
      _fail("decay_boundaries", "must be a non-empty tuple of fractions of "
            "training in (0, 1)", boundaries)
    for b in boundaries:
      if isinstance(b, bool) or not isinstance(b, numbers.Real) or not (
          0.0 < b < 1.0):
        _fail("decay_boundaries", "must hold fractions of training in (0, 1)",
              boundaries)
    if list(boundaries) != sorted(boundaries):
      _fail("decay_boundaries", "must be increasing", boundaries)
    _number(config, "decay_factor", low=0.0, low_open=True)

  _int(config, "seed", minimum=0)
  _bool(config, "half_precision")
  _bool(config, "data_parallel")
  shards = _num_shards(config)
  if batch_size % shards:
    _fail("batch_size", f"must be divisible by the {shards} local devices "
          f"when config.data_parallel=True", batch_size)
  if eval_batch_size % shards:
    _fail("eval_batch_size", f"must be divisible by the {shards} local "
          f"devices when config.data_parallel=True", eval_batch_size)

  if _int(config, "steps_per_dispatch", minimum=0) > 1:
    if config.data_parallel:
      _fail("steps_per_dispatch", "must be 0 (auto) or 1 when "
            "config.data_parallel=True", config.steps_per_dispatch)
    if config.analysis:
      _fail("steps_per_dispatch", "must be 0 (auto) or 1 with config.analysis "
            "(the instruments measure the state before a step)",
            config.steps_per_dispatch)
  _choice(config, "input_pipeline", INPUT_PIPELINES)
  if config.input_pipeline == "device":
    if config.dataset == synthetic_data.NAME:
      _fail("input_pipeline", "must be 'host' for the synthetic dataset (not "
            "an image dataset)", config.input_pipeline)
    if config.data_parallel:
      _fail("input_pipeline", "must be 'host' when config.data_parallel=True "
            "(the device pipeline runs on one device)", config.input_pipeline)
    if config.analysis:
      _fail("input_pipeline", "must be 'host' with config.analysis (the "
            "instruments measure on the step's batch of images)",
            config.input_pipeline)

  _int(config, "log_every", minimum=1)
  _int(config, "eval_every", minimum=0)
  _int(config, "checkpoint_every", minimum=0)
  _int(config, "keep_checkpoints", minimum=1)
  _bool(config, "save_checkpoints")
  _int(config, "precise_bn_samples", minimum=0)
  _int(config, "precise_bn_batch_size", minimum=1)
  analysis = config.analysis
  if isinstance(analysis, str) or not isinstance(analysis, (tuple, list)):
    raise TypeError(f"config.analysis must be a tuple of analysis names "
                    f"(subset of {ANALYSES}), got {analysis!r}.")
  for name in analysis:
    if name not in ANALYSES:
      _fail("analysis", f"contains an unknown analysis {name!r} (known: "
            f"{ANALYSES})", analysis)
  _int(config, "analysis_every", minimum=0)
  if analysis and config.analysis_every == 0:
    _fail("analysis_every", "must be >= 1 when config.analysis is not empty",
          config.analysis_every)
  _bool(config, "progress_bar")
  _bool(config, "plots")
  check_model(config)


def config_parts(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """``[(part name, its config)]`` of a comparison in parts (``config.parts``:
  name -> overrides merged into a copy of ``config``); ``[('', config)]``
  when ``config.parts`` is empty.

  Raises:
    ValueError: an override names a key that is not a config key (named as
      ``config.parts.<name>.<key>``).
  """
  if not config.parts:
    return [("", config)]
  out = []
  for name, overrides in config.parts.items():
    part = ml_collections.ConfigDict(config.to_dict())
    part.parts = ml_collections.ConfigDict()
    _merge(part, overrides, f"parts.{name}.", top=True)
    out.append((name, part))
  return out


def _merge(config, overrides, prefix: str, top: bool = False) -> None:
  """Writes ``overrides`` into ``config`` key by key (nested dicts merge)."""
  for key, value in overrides.items():
    if key == "parts" or key not in config:
      raise ValueError(f"config.{prefix}{key} is not a config key a part "
                       f"can override; known keys: "
                       f"{sorted(k for k in config.keys() if k != 'parts')}.")
    if top and key == "model_kwargs":
      config[key].update(dict(value))  # free-form: keys may be new
    elif isinstance(value, (ml_collections.ConfigDict, dict)) and isinstance(
        config[key], ml_collections.ConfigDict):
      _merge(config[key], value, f"{prefix}{key}.")
    else:
      config[key] = value


def input_shape_of(config) -> tuple[tuple[int, ...], int]:
  """``(one per-device batch's shape, num_classes)`` of ``config.dataset``,
  without loading it."""
  if config.dataset == synthetic_data.NAME:
    image_shape = (1, 1, config.synthetic.dim)
    num_classes = config.synthetic.num_classes
  else:
    image_shape, num_classes = data_lib.dataset_shape(config.dataset)
  batch = config.batch_size // _num_shards(config)
  return (batch,) + tuple(image_shape), num_classes


def _build(config, norm: str, norm_kwargs: dict, model_kwargs: dict,
           input_shape, num_classes: int) -> None:
  """Constructs the model and traces (abstractly: ``jax.eval_shape``, no
  compute, no compilation) its init and a training-mode forward on one batch:
  every argument check of the models and norm modules runs."""
  import jax
  import jax.numpy as jnp
  model = models.create_model(
      config.model, num_classes=num_classes, norm=norm,
      norm_kwargs=norm_kwargs or None,
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      **model_kwargs)

  def init_and_forward():
    x = jnp.zeros(input_shape, jnp.float32)
    keys = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    variables = model.init(keys, x, train=False)
    return model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"noise": keys["noise"]})

  jax.eval_shape(init_and_forward)


def _builds(*args) -> bool:
  try:
    _build(*args)
  except Exception:  # noqa: BLE001 -- any failure means "does not build"
    return False
  return True


def check_model(config) -> None:
  """Builds every ``(model, norm)`` of ``config`` abstractly on one batch of
  the dataset's shape; a failure is raised as a ValueError naming the key
  that causes it: ``config.model_kwargs`` when the model fails without any
  normalization, else the ``config.norm_kwargs.<norm>.<name>`` whose reset to
  its default makes the build succeed (else ``config.norm_kwargs.<norm>``),
  with the model's keys, which the norm's arguments must fit."""
  input_shape, num_classes = input_shape_of(config)
  model_kwargs = config.model_kwargs.to_dict()
  model_ok = None
  for norm in config.norms:
    given = config.norm_kwargs.get(norm)
    kwargs = {} if given is None else given.to_dict()
    try:
      _build(config, norm, kwargs, model_kwargs, input_shape, num_classes)
      continue
    except Exception as e:  # noqa: BLE001 -- re-raised naming the key
      error = e
    where = (f"config.model={config.model!r}, config.model_kwargs="
             f"{model_kwargs}, input {input_shape}")
    if model_ok is None:
      model_ok = _builds(config, "none", {}, model_kwargs, input_shape,
                         num_classes)
    if not model_ok:
      raise ValueError(f"config.model_kwargs ({where}) does not build: "
                       f"{type(error).__name__}: {error}") from error
    defaults = norms_lib.configurable_norm_kwargs(norm)
    key, culprit = f"norm_kwargs.{norm}", ""
    for name, value in kwargs.items():
      default = defaults.get(name, (None, None))[1]
      if value != default and _builds(
          config, norm, {**kwargs, name: default}, model_kwargs, input_shape,
          num_classes):
        key = f"{key}.{name}"
        culprit = (f"={value!r} (the model builds with its default "
                   f"{default!r})")
        break
    raise ValueError(f"config.{key}{culprit} does not fit norm={norm!r} "
                     f"with {where}: {type(error).__name__}: {error}"
                     ) from error
