r"""Where the wall time of the default ``python train.py`` goes.

  python benchmarks/profile_main_job.py [--workdir DIR] [train.py flags...]

Runs ``train.main`` in this process (fresh workdir by default) with wall-clock
timers around its phases and prints a table of *exclusive* seconds per phase
(a phase's time minus the phases it calls; phases in a background thread,
the plots, are listed apart and overlap the others), plus, per phase, the
seconds
spent in JAX tracing / lowering / XLA compilation (``jax.monitoring``
duration events, attributed to the innermost running phase). The remainder
(``train steps``) is the training loop's own time: dispatch, the steps'
arithmetic and the host syncs.

Phases (the functions timed): imports (``import train`` and what it pulls
in), data loading, model + state creation, training loop, evaluation
(``evaluate``), PreciseBN (``precise_bn_state``), checkpoints
(``Checkpointer`` init/save/close/restore), metrics writing (``MetricsWriter``
init/write/flush/close, TensorBoard included), plots, summaries.
"""
from __future__ import annotations

import collections
import functools
import os
import resource
import sys
import tempfile
import threading
import time

T_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

_exclusive = collections.Counter()
_compile = collections.Counter()
_calls = collections.Counter()
_compilations = collections.Counter()
_by_function = collections.defaultdict(lambda: [0, 0.0])  # name: [n, s]
_local = threading.local()  # per thread: stack of [phase, start, children]


def _stack():
  if not hasattr(_local, "stack"):
    _local.stack = []
  return _local.stack


def _enter(phase):
  if threading.current_thread() is not threading.main_thread():
    phase += " (background thread, overlaps the rest)"
  _stack().append([phase, time.perf_counter(), 0.0])


def _exit():
  stack = _stack()
  phase, start, children = stack.pop()
  elapsed = time.perf_counter() - start
  _exclusive[phase] += elapsed - children
  _calls[phase] += 1
  if stack:
    stack[-1][2] += elapsed


def timed(phase, fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    _enter(phase)
    try:
      return fn(*args, **kwargs)
    finally:
      _exit()
  return wrapper


def patch(obj, name, phase):
  setattr(obj, name, timed(phase, getattr(obj, name)))


_enter("imports")
import jax  # noqa: E402
from jax import monitoring  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _on_duration(event, seconds, fun_name=None, **_):
  if event == COMPILE_EVENTS[-1]:
    _by_function[fun_name][0] += 1
    _by_function[fun_name][1] += seconds
  if event in COMPILE_EVENTS:
    stack = _stack()
    phase = stack[-1][0] if stack else "other"
    _compile[phase] += seconds
    if event == COMPILE_EVENTS[-1]:
      _compilations[phase] += 1


monitoring.register_event_duration_secs_listener(_on_duration)
import train  # noqa: E402
from absl import app  # noqa: E402
from bn_jax.training import (checkpoint, input_pipeline, loop,  # noqa: E402
                             metrics, plots)
_exit()

patch(input_pipeline, "load_train_test", "data loading")
patch(train, "create_model", "model + state")
patch(train, "create_state", "model + state")
patch(loop, "train_loop", "train steps (loop)")
patch(loop, "evaluate", "evaluation")
patch(train, "precise_bn_state", "PreciseBN")
for name in ("__init__", "save", "close", "restore", "latest_step"):
  patch(checkpoint.Checkpointer, name, "checkpoints")
for name in ("__init__", "write", "flush", "close", "truncate_after"):
  patch(metrics.MetricsWriter, name, "metrics/TensorBoard")
patch(metrics, "read_metrics", "metrics/TensorBoard")
patch(plots, "plot_runs", "plots")
patch(plots, "plot_comparison", "plots")
# Names train.py bound at import time.
train.plots = plots


def main():
  argv = [sys.argv[0]] + sys.argv[1:]
  if not any(a.startswith("--workdir") for a in argv):
    argv.append(f"--workdir={tempfile.mkdtemp(prefix='bn_jax_profile_')}")
  _enter("other (train.main)")
  try:
    app.run(train.main, argv=argv)
  except SystemExit as e:
    if e.code:
      raise
  finally:
    _exit()
  total = time.perf_counter() - T_START
  usage = resource.getrusage(resource.RUSAGE_SELF)
  load = os.getloadavg()
  print(f"\n## Wall-time breakdown of `python train.py {' '.join(argv[1:])}`"
        f"\n\nload average at the end: {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; {os.cpu_count()} CPUs\n")
  print("| phase | calls | seconds (exclusive) | of which tracing+compiling "
        "| XLA compilations |")
  print("|---|---|---|---|---|")
  for phase, seconds in sorted(_exclusive.items(), key=lambda kv: -kv[1]):
    print(f"| {phase} | {_calls[phase]} | {seconds:.2f} | "
          f"{_compile.get(phase, 0.0):.2f} | {_compilations[phase]} |")
  print(f"| **total wall (process, after interpreter start)** | | "
        f"{total:.2f} | "
        f"{sum(_compile.values()):.2f} | {sum(_compilations.values())} |")
  print(f"\nprocess CPU time: user {usage.ru_utime:.1f} s + system "
        f"{usage.ru_stime:.1f} s\n")
  print("| jitted function (XLA compilations) | count | backend compile s |")
  print("|---|---|---|")
  for name, (count, seconds) in sorted(_by_function.items(),
                                       key=lambda kv: -kv[1][1])[:12]:
    print(f"| {name} | {count} | {seconds:.2f} |")


if __name__ == "__main__":
  main()
