"""What every experiment script shares: command line, library settings,
cached runs, results files and plots.

Used by ``experiments/bn_mnist.py``, ``bn_learning_rates.py``,
``santurkar_{vgg,dln,lp,noise}.py``, ``cbn_small_batch.py`` and
``rethinking_batch.py``. Training is the library's:
``bn_jax.training.loop`` (``create_state``, ``train_loop``, ``Trainer``,
``evaluate``), its data helpers in
``bn_jax.training.input_pipeline``, the models ``bn_jax.models.create_model``,
all configured by one :func:`library_config` (``bn_jax.training.base_config``
with the experiment's values). This file holds no training loop.

The command line of every script is the same::

  python experiments/<name>.py [--workdir DIR] [--scale cpu|paper] \
      [--seeds 0,1,2] [--config.key=value ...]

``--scale`` picks ``get_config(scale)`` of the script's config file
(``configs/exp_<name>.py``); ``--config.key=value`` overrides after that.
``--seeds`` runs the whole experiment once per seed (``config.seed``) into
``<workdir>/seed_<s>/`` and writes ``<workdir>/seeds.json`` (every number
of each run's ``summary``, per seed, with mean, sample standard deviation,
min and max over the seeds) and ``seeds.md`` (the scalar ones as a table).
A seed whose ``results.json`` is already there with the same config is read
back, not rerun (an interrupted run resumes; delete the folder to rerun).

``--sweep key=v1,v2,...`` (a config field, values as Python literals)
repeats that for every value into ``<workdir>/<key>_<value>/`` and writes
``<workdir>/sweep.json`` (each value's seed statistics), ``sweep.md``
(mean +- std per value) and ``sweep.png`` (the quantities the script names,
against the swept value).
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Callable, Iterable, Optional

import jax
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python experiments/x.py` from anywhere
  sys.path.insert(0, _REPO)

from bn_jax.training import base_config  # noqa: E402

SCALES = ("cpu", "paper")


# ---------------------------------------------------------------------------
# Command line: --workdir, --scale, --config (a config file with
# get_config(scale)).

def scale_from_argv(argv) -> str:
  """The ``--scale`` value in ``argv`` (read before absl parses the config
  flag, whose default ``<file>:<scale>`` depends on it)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--scale="):
      value = arg.split("=", 1)[1]
    elif arg == "--scale" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    if value not in SCALES:
      raise SystemExit(f"--scale must be one of {SCALES}, got {value!r}.")
    return value
  return "cpu"


def config_path(name: str) -> str:
  """``configs/<name>`` of this checkout."""
  return os.path.join(_REPO, "configs", name)


def define_flags(name: str, config_file: str):
  """Defines --workdir, --scale and --config (``config_file:<scale>``).

  Only called when a script runs as ``__main__``: importing a script (tests,
  other experiments) must not define absl flags twice.
  """
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", os.path.join(".", "workdir", "experiments",
                                              name),
                      "Output directory (plots, results.json, per-run files).")
  flags.DEFINE_enum("scale", "cpu", list(SCALES),
                    "cpu: the reduced CPU setting; paper: the paper's scale "
                    "(meant for an accelerator).")
  flags.DEFINE_list("seeds", [], "Run the experiment once per seed "
                    "(config.seed) into <workdir>/seed_<s> and summarize "
                    "over the seeds in <workdir>/seeds.json and seeds.md; "
                    "empty: one run with config.seed.")
  flags.DEFINE_string("sweep", "", "key=v1,v2,...: run the experiment (with "
                      "--seeds) once per value of config field `key` into "
                      "<workdir>/<key>_<value> and compare the values in "
                      "<workdir>/sweep.json, sweep.md and sweep.png.")
  config_flags.DEFINE_config_file(
      "config", f"{config_file}:{scale_from_argv(sys.argv)}",
      "Experiment config; override fields with --config.<key>=<value>.",
      lock_config=True)
  return flags.FLAGS


def run_script(name: str, config_name: str,
               experiment: Callable[..., dict], *,
               sweep_quantities: Iterable[str] = ("final_test_accuracy",),
               resummarize: Optional[Callable[[dict], dict]] = None,
               plot_seeds: Optional[Callable[[dict, str], str]] = None
               ) -> None:
  """The ``__main__`` of a script: flags, then ``experiment(config, workdir)``.

  Args:
    name: the script's name (the default workdir
      ``./workdir/experiments/<name>``).
    config_name: its config file under ``configs/``.
    experiment: ``(config, workdir) -> results``.
    sweep_quantities: summary paths below each run label (``<label>/<path>``)
      that ``--sweep`` plots against the swept value.
    resummarize: ``results -> summary`` for a seed read back from its
      ``results.json`` (so its summary is this code's); None: the saved one.
    plot_seeds: ``(seeds.json contents, workdir) -> path``: a figure over
      the seeds, drawn after ``seeds.json`` is written.
  """
  from absl import app
  flags = define_flags(name, config_path(config_name))

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.config
    if config.scale != flags.scale:
      raise app.UsageError(f"--scale={flags.scale} but the config was built "
                           f"for scale {config.scale!r}.")
    if not flags.seeds and not flags.sweep:
      experiment(config, flags.workdir)
      return
    if "seeds" in config:
      raise app.UsageError(f"{name} runs its own seeds (config.seeds); set "
                           "--config.seeds instead of --seeds/--sweep.")
    try:
      seeds = [int(s) for s in flags.seeds] or [int(config.seed)]
    except ValueError:
      raise app.UsageError(f"--seeds must be integers, got {flags.seeds}")
    if not flags.sweep:
      run_seeds(experiment, config, flags.workdir, seeds, name,
                resummarize, plot_seeds)
      return
    try:
      key, values = parse_sweep(flags.sweep, config)
    except ValueError as e:
      raise app.UsageError(str(e))
    run_sweep(experiment, config, flags.workdir, key, values, seeds, name,
              sweep_quantities, resummarize, plot_seeds)

  app.run(main)


def run_sweep(experiment: Callable[..., dict], config, workdir: str,
              key: str, values: list, seeds: list[int], name: str,
              quantities: Iterable[str], resummarize=None,
              plot_seeds=None) -> dict:
  """:func:`run_seeds` for every value of config field ``key`` (into
  ``<workdir>/<key>_<value>``), then :func:`write_sweep_summary`."""
  stats = {}
  for value in values:
    set_field(config, key, value)
    stats[value] = run_seeds(experiment, config, os.path.join(
        workdir, sweep_dirname(key, value)), seeds, name, resummarize,
        plot_seeds)["stats"]
  return write_sweep_summary(workdir, name, key, values, stats, quantities)


def run_seeds(experiment: Callable[..., dict], config, workdir: str,
              seeds: list[int], name: str,
              resummarize: Optional[Callable[[dict], dict]] = None,
              plot_seeds: Optional[Callable[[dict, str], str]] = None
              ) -> dict:
  """``experiment`` once per seed into ``<workdir>/seed_<s>``, then
  :func:`write_seed_summary`. A seed folder whose ``results.json`` was
  written with this very config is read back instead of rerun (its summary
  recomputed by ``resummarize`` when given)."""
  summaries = {}
  for seed in seeds:
    config.seed = seed
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    results = previous_results(seed_dir, config)
    if results is None:
      results = experiment(config, seed_dir)
    else:
      log(f"[seed {seed}] done before: reading {seed_dir}/results.json "
          "(delete the folder to rerun)")
      if resummarize is not None:
        results["summary"] = resummarize(results)
    summaries[seed] = results.get("summary", results)
  out = write_seed_summary(workdir, name, summaries)
  if plot_seeds is not None:
    plot_seeds(out, workdir)
  return out


def previous_results(workdir: str, config) -> Optional[dict]:
  """``<workdir>/results.json`` if it holds ``config`` (as written), else
  None."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    old = json.load(f)
  # As save_results wrote it: write_json's 7 significant digits.
  same = old.get("config") == _jsonable(to_dict(config), 7)
  return old if same else None


def parse_sweep(text: str, config) -> tuple[str, list]:
  """``'key=v1,v2,...'`` -> ``(key, [v1, v2, ...])``: values are Python
  literals (``0.01,0.02``; ``(0, 0.1),(0, 0.5)``; ``'a','b'``), or bare
  words taken as strings. ``key`` (dotted for nested fields) must be in
  ``config``."""
  key, sep, rest = text.partition("=")
  key = key.strip()
  if not sep or not key or not rest.strip():
    raise ValueError(f"--sweep must be key=v1,v2,..., got {text!r}.")
  get_field(config, key)  # raises for an unknown key
  try:
    values = ast.literal_eval(f"[{rest}]")
  except (ValueError, SyntaxError):
    values = [v.strip() for v in rest.split(",")]
  if not values or len(set(map(repr, values))) != len(values):
    raise ValueError(f"--sweep needs distinct values, got {rest!r}.")
  return key, values


def get_field(config, key: str):
  node = config
  for part in key.split("."):
    if part not in node:
      raise ValueError(f"--sweep: {key!r} is not a config field.")
    node = node[part]
  return node


def set_field(config, key: str, value) -> None:
  *parents, last = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = value


def sweep_dirname(key: str, value) -> str:
  """``learning_rate_0.01``: the folder of one swept value."""
  text = value if isinstance(value, str) else repr(value)
  return f"{key}_" + re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def write_sweep_summary(workdir: str, name: str, key: str, values: list,
                        stats: dict, quantities: Iterable[str]) -> dict:
  """``sweep.json`` (per value: the seed statistics of
  :func:`write_seed_summary`), ``sweep.md`` (per scalar path, mean +- std
  per value) and ``sweep.png`` (each of ``quantities`` -- a path below the
  run label -- against the value, one line per label, error bars = std)."""
  out = {"experiment": name, "key": key, "values": values,
         "stats": {repr(v): stats[v] for v in values}}
  write_json(os.path.join(workdir, "sweep.json"), out)
  paths = sorted(set().union(*(stats[v] for v in values)))
  lines = [f"# {name}: sweep of {key}", "",
           "mean +- sample std over the seeds (per-seed values in "
           "sweep.json and each value's seeds.json).", "",
           "| quantity | " + " | ".join(f"{key}={v!r}" for v in values) + " |",
           "|---|" + "---|" * len(values)]
  for path in paths:
    if any(part.isdigit() for part in path.split("/")):
      continue
    cells = [(f"{stats[v][path]['mean']:.4g} +- {stats[v][path]['std']:.2g}"
              if path in stats[v] else "-") for v in values]
    lines.append(f"| {path} | " + " | ".join(cells) + " |")
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot_sweep(out, list(quantities), os.path.join(workdir, "sweep.png"))
  log(f"wrote {os.path.abspath(os.path.join(workdir, 'sweep.md'))}")
  return out


def plot_sweep(sweep: dict, quantities: list[str], path: str) -> str:
  """One panel per quantity: mean +- std against the swept value, one line
  per run label (log x when the values are positive numbers spanning more
  than 3x; categorical x otherwise)."""
  values = sweep["values"]
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values)
  x = np.asarray(values, float) if numeric else np.arange(len(values))
  fig, axes = figure(max(len(quantities), 1), width=3.8)
  # One color per run label in every panel (a label may lack a quantity).
  labels_of = {q: sorted({p[:-len(q) - 1] for st in sweep["stats"].values()
                          for p in st if p.endswith("/" + q)})
               for q in quantities}
  colors = {label: f"C{i}" for i, label in enumerate(sorted(
      set().union(*labels_of.values())))}
  for ax, quantity in zip(axes[0], quantities):
    for label in labels_of[quantity]:
      rows = [sweep["stats"][repr(v)].get(f"{label}/{quantity}")
              for v in values]
      have = [i for i, r in enumerate(rows) if r is not None]
      ax.errorbar(x[have], [rows[i]["mean"] for i in have],
                  yerr=[rows[i]["std"] for i in have], marker="o",
                  capsize=3, label=label, color=colors[label])
    if numeric and x.min() > 0 and x.max() > 3 * x.min():
      ax.set_xscale("log")
    if not numeric:
      ax.set_xticks(x, [str(v) for v in values], rotation=30, fontsize=7)
    ax.set_title(quantity, fontsize=9)
    ax.set_xlabel(sweep["key"])
    ax.grid(alpha=0.3)
  if colors:
    from matplotlib.lines import Line2D
    fig.legend([Line2D([], [], color=c, marker="o") for c in colors.values()],
               list(colors), fontsize=7, loc="outside lower center",
               ncols=len(colors))
  fig.suptitle(f"{sweep['experiment']}: mean +- std over seeds")
  return save(fig, path)


def _numeric_leaves(tree, prefix=""):
  """``{path: number}`` for every int/float leaf of nested dicts/lists
  (list items by index), bools and strings skipped."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    if isinstance(tree, (int, float, np.number)) and not isinstance(
        tree, (bool, np.bool_)):
      return {prefix: float(tree)}
    return {}
  out = {}
  for key, value in items:
    out.update(_numeric_leaves(value, f"{prefix}/{key}" if prefix
                               else str(key)))
  return out


def write_seed_summary(workdir: str, name: str,
                       summaries: dict[int, dict]) -> dict:
  """``seeds.json`` and ``seeds.md`` in `workdir` from each seed's summary:
  per path, the values per seed, mean, sample std (ddof=1; 0 for one
  seed), min and max. Paths missing from some seed are listed with the seeds
  that have them."""
  seeds = sorted(summaries)
  leaves = {s: _numeric_leaves(summaries[s]) for s in seeds}
  paths = sorted(set().union(*leaves.values()))
  stats = {}
  for path in paths:
    have = [s for s in seeds if path in leaves[s]]
    values = np.array([leaves[s][path] for s in have])
    stats[path] = {
        "seeds": have, "values": values.tolist(),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()), "max": float(values.max())}
  out = {"experiment": name, "seeds": seeds, "stats": stats}
  write_json(os.path.join(workdir, "seeds.json"), out)
  lines = [f"# {name}: {len(seeds)} seeds ({', '.join(map(str, seeds))})",
           "", "Every scalar of the runs' summaries whose path has no "
           "numeric part (list items and numeric keys such as "
           "accuracy_at/<step> are in seeds.json only). std: sample "
           "standard deviation over the seeds.", "",
           "| quantity | mean | std | min | max | per seed |",
           "|---|---|---|---|---|---|"]
  for path, st in stats.items():
    # List indices and numeric keys: curves, too long for the table.
    if any(part.isdigit() for part in path.split("/")):
      continue
    lines.append(f"| {path} | {st['mean']:.4g} | {st['std']:.2g} | "
                 f"{st['min']:.4g} | {st['max']:.4g} | "
                 f"{', '.join(f'{v:.4g}' for v in st['values'])} |")
  with open(os.path.join(workdir, "seeds.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  log(f"wrote {os.path.abspath(os.path.join(workdir, 'seeds.md'))}")
  return out


# ---------------------------------------------------------------------------
# Library settings.

def library_config(base=None, **fields):
  """``bn_jax.training.base_config()`` (or a copy of ``base``, an earlier
  result) with ``fields`` set: what the library's optimizer, schedule and
  input pipeline read.

  One experiment trains several runs (other learning rates, batch sizes), so
  each run gets its own. Raises KeyError for a field the library does not
  know (a typo would otherwise be silently ignored).
  """
  settings = (base_config() if base is None
              else base.copy_and_resolve_references())
  for key, value in fields.items():
    if key not in settings:
      raise KeyError(f"library_config: {key!r} is not a key of "
                     f"bn_jax.training.base_config().")
    settings[key] = value
  return settings


# ---------------------------------------------------------------------------
# Runs cached on disk (an interrupted sweep resumes).

def fingerprint(config, extra, *, ignore: Iterable[str] = ()) -> str:
  """A hash of ``config`` (without the keys ``ignore``: those that select
  runs or only change logging) and ``extra`` (the run's own settings)."""
  ignore = set(ignore)
  keys = {k: v for k, v in config.to_dict().items() if k not in ignore}
  text = json.dumps([keys, extra], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_run(path: str, run_fingerprint: str, train: Callable[[], dict], *,
               log=print) -> dict:
  """The record in ``path`` if it was made with ``run_fingerprint``, else
  ``train()``'s record, saved there (with its fingerprint)."""
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("fingerprint") == run_fingerprint:
      log(f"[{os.path.splitext(os.path.basename(path))[0]}] done before")
      return old
  record = train()
  record["fingerprint"] = run_fingerprint
  write_json(path, record, significant_digits=None)
  return record


# ---------------------------------------------------------------------------
# Results.

def steps_to_reach(steps, accuracies, target: float) -> Optional[int]:
  """First logged step whose accuracy is >= target (None if never)."""
  for s, a in zip(steps, accuracies):
    if a >= target:
      return int(s)
  return None


def write_json(path: str, obj, *, significant_digits: Optional[int] = 7
               ) -> str:
  """Writes ``obj`` (NumPy/JAX values allowed) as JSON: floats rounded to
  ``significant_digits`` (None: exact), NaN/inf as strings, innermost lists
  on one line."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = json.dumps(_jsonable(obj, significant_digits), indent=1)
  # Innermost lists (of numbers/strings) on one line: readable and compact.
  text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]",
                lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]",
                text)
  with open(path, "w") as f:
    f.write(text)
  return path


def _jsonable(obj, digits):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v, digits) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v, digits) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(obj).tolist(), digits)
  if isinstance(obj, (np.floating, float)):
    value = float(obj)
    if not math.isfinite(value):
      return str(value)
    # 7 significant digits: float32 precision, and a JSON a third the size.
    return value if digits is None else float(f"{value:.{digits}g}")
  if isinstance(obj, (np.integer,)):
    return int(obj)
  return obj


def save_results(workdir: str, results: dict, t0: float, *,
                 summary: Iterable[str] = ()) -> dict:
  """Adds ``total_wall_seconds`` (since ``t0``) to ``results``, writes
  ``<workdir>/results.json``, logs the ``summary`` lines and where it all
  went."""
  results["total_wall_seconds"] = time.perf_counter() - t0
  write_json(os.path.join(workdir, "results.json"), results)
  for line in summary:
    log(line)
  log(f"wrote {os.path.abspath(workdir)} in "
      f"{results['total_wall_seconds']:.0f}s")
  return results


def log(message: str) -> None:
  print(message, flush=True)


def to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


# ---------------------------------------------------------------------------
# Plots (matplotlib's object API on Agg: no pyplot state, no display).

def figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.2,
           **subplots_kwargs):
  """A Figure and its ``[nrows, ncols]`` axes grid (``subplots_kwargs``, e.g.
  ``sharey=True``, go to ``Figure.subplots``)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False, **subplots_kwargs)
  return fig, axes


def save(fig, path: str, dpi: int = 90) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path
