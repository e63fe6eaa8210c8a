"""The training configuration: every key with its default, and its validation.

Every file in ``configs/`` starts from :func:`base_config` and changes values,
so the set of keys is defined once, here. :func:`validate_config` runs before
any data is loaded or anything is compiled and raises ``ValueError`` (or
``TypeError``) naming the offending key (``config.batch_size``, ...).

``ml_collections`` already refuses command-line overrides of keys that do not
exist (``--config.batchsize=8`` is an error); :func:`validate_config` also
catches unknown keys added by a config file and bad values.
"""
from __future__ import annotations

import math
import numbers

import ml_collections

# Names known to the other layers. Kept here (not imported from models/data) so
# that validation needs no heavy imports; tests check they agree.
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
            "synthetic_gaussian")
DATA_SOURCES = ("auto", "local", "tfds")
MODELS = ("mlp", "vgg", "resnet20", "resnet18", "deep_linear")
NORMS = ("none", "bn", "cbn", "gn", "ln", "brn", "noisy_bn", "lp", "frozen",
         "ghost")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step", "linear")
ANALYSES = ("ics", "landscape", "percentiles")


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
  # Per-norm constructor arguments, e.g. norm_kwargs.cbn = {window: 4, ...}.
  c.norm_kwargs = ml_collections.ConfigDict()

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

  # Bookkeeping.
  c.log_every = 50              # steps between train-metric lines
  c.eval_every = 0              # steps between evaluations; 0 = at the end
  c.checkpoint_every = 0        # steps between checkpoints; 0 = at the end
  c.keep_checkpoints = 3
  c.save_checkpoints = True
  c.precise_bn_batches = 0      # > 0: also evaluate with PreciseBN stats (this many train batches)
  c.analysis = ()               # subset of ANALYSES
  c.analysis_every = 0          # steps between analysis calls; 0 = never
  c.progress_bar = True
  c.plots = True
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
    if key not in reference:
      raise ValueError(
          f"config.{prefix}{key} is not a known config key; known keys: "
          f"{sorted(reference.keys())}.")
    if isinstance(reference[key], ml_collections.ConfigDict) and key not in (
        "model_kwargs", "norm_kwargs"):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise TypeError(f"config.{prefix}{key} must be a ConfigDict, got "
                        f"{config[key]!r}.")
      _check_keys(config[key], reference[key], prefix=f"{prefix}{key}.")


# Numeric arguments of the normalization modules that can be checked here,
# before the model is built: key -> (kind, minimum).
_NORM_KWARG_CHECKS = {
    "window": ("int", 1),
    "burn_in": ("int", 0),
    "num_groups": ("int", 1),
    "group_size": ("int", 1),
    "ghost_batch_size": ("int", 1),
}


def _check_norm_kwargs(config) -> None:
  for norm in config.norm_kwargs.keys():
    if norm not in NORMS:
      _fail(f"norm_kwargs.{norm}", f"is keyed by an unknown norm (known: "
            f"{NORMS})", norm)
    kwargs = config.norm_kwargs[norm]
    if not isinstance(kwargs, (ml_collections.ConfigDict, dict)):
      raise TypeError(f"config.norm_kwargs.{norm} must be a dict of the norm "
                      f"module's arguments, got {kwargs!r}.")
    for name, value in kwargs.items():
      key = f"norm_kwargs.{norm}.{name}"
      if name in _NORM_KWARG_CHECKS:
        _, minimum = _NORM_KWARG_CHECKS[name]
        _int(config, key, minimum=minimum)
      elif name == "momentum":
        _number(config, key, low=0.0, high=1.0, high_open=True)
      elif name == "epsilon":
        _number(config, key, low=0.0, low_open=True)
      elif name == "p" and not (isinstance(value, numbers.Real) and
                                math.isinf(value)):
        _number(config, key, low=1.0)
  ghost = config.norm_kwargs.get("ghost", {}).get("ghost_batch_size")
  if "ghost" in config.norms and ghost is not None:
    per_device = config.batch_size // _num_shards(config)
    if per_device % ghost:
      _fail("norm_kwargs.ghost.ghost_batch_size",
            f"must divide the per-device batch size {per_device}", ghost)


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

  _int(config, "log_every", minimum=1)
  _int(config, "eval_every", minimum=0)
  _int(config, "checkpoint_every", minimum=0)
  _int(config, "keep_checkpoints", minimum=1)
  _bool(config, "save_checkpoints")
  _int(config, "precise_bn_batches", minimum=0)
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
  _check_model_construction(config)


def _check_model_construction(config) -> None:
  """Builds (does not initialise) each model: create_model rejects unknown
  model/norm keyword arguments; the error is re-raised naming the key."""
  from bn_jax.models import create_model
  model_kwargs = config.model_kwargs.to_dict()
  for norm in config.norms:
    norm_kwargs = config.norm_kwargs.get(norm)
    try:
      create_model(config.model, num_classes=10, norm=norm,
                   norm_kwargs=None if norm_kwargs is None
                   else norm_kwargs.to_dict(), **model_kwargs)
    except (TypeError, ValueError) as e:
      key = ("model_kwargs" if "model" in str(e).split("norm")[0]
             else f"norm_kwargs.{norm}")
      raise ValueError(f"config.{key} (model={config.model!r}, "
                       f"norm={norm!r}) is not accepted: {e}") from e
