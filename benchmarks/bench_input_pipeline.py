"""Input pipeline throughput on CIFAR-10: host (NumPy) against device (jit).

  python benchmarks/bench_input_pipeline.py [--rounds 5 --batches 96]
      [--batch_size 128] [--data_dir ../shared/data] [--quick] [--json F]
      [--hold_batches]

Contenders, run in interleaved rounds (round r runs every contender once, so
load changes on a shared machine hit all of them alike; the ratios of the
same round are what to compare):

* ``host``: `bn_jax.data.epoch_batches` (per-epoch NumPy draws, gather,
  crop/flip, table normalization in one host thread) yielding NumPy float32
  batches; ``--batches`` batches from the start of an epoch (the epoch's
  NumPy draws are included, as in training).
* ``host+put``: the same, each batch then copied to the default device
  (``jax.device_put``), which is what a training step consumes.
* ``device``: `bn_jax.data.device_pipeline.batch_at` jitted, one dispatch per
  batch (step t passed as an int32 array); the batch stays on the device.
  Each batch is consumed as a train step consumes it: once batch t + 1 is
  dispatched, batch t is waited for and released, so one batch is computed
  while the next is dispatched and every batch of the round is finished
  before the clock stops.
* ``device_scan8``: eight batches per dispatch (``lax.scan`` over steps,
  batches stacked as the scan's output) -- what a multi-step train loop does;
  consumed the same way.

``--hold_batches`` instead keeps every device batch of a round alive until
the round ends (this script's measurement before 2026-12-02). A training
loop never does that: 96 batches of 128 CIFAR images are 151 MB, so each
new batch is written into pages the process has not touched yet, and the
page faults (385 per batch in the first round, ``getrusage``) made the
device rate 1.6-1.7x slower (benchmarks/RESULTS.md). The host contenders
keep only the last batch either way.

Each contender is run with augmentation (random crop with 4-pixel zero
padding + flip) and without. Reported: images/s per round and the median,
plus the per-round ratio device / host; each also per CPU second of this
process (``time.process_time``), which a shared machine's load disturbs much
less than wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from bn_jax.data import device_pipeline
from bn_jax.data import epoch_batches
from bn_jax.data import load_dataset

SCAN_STEPS = 8


def _rates(images, wall_start, cpu_start):
  """(images per wall second, images per CPU second of this process)."""
  return (images / (time.perf_counter() - wall_start),
          images / max(time.process_time() - cpu_start, 1e-9))


def host_round(ds, batch_size, batches, augment, epoch, put):
  start, cpu = time.perf_counter(), time.process_time()
  last = None
  iterator = epoch_batches(ds, batch_size, seed=0, epoch=epoch,
                           augment=augment)
  for _, batch in zip(range(batches), iterator):
    last = jax.device_put(batch) if put else batch
  jax.block_until_ready(last)
  return _rates(batches * batch_size, start, cpu)


def make_device_round(data, batch_size, augment, hold=False):
  one = jax.jit(lambda d, t: device_pipeline.batch_at(
      d, t, batch_size=batch_size, seed=0, augment=augment))

  def scan_fn(d, t0):
    def body(_, t):
      return None, device_pipeline.batch_at(d, t, batch_size=batch_size,
                                            seed=0, augment=augment)
    return jax.lax.scan(body, None, t0 + jnp.arange(SCAN_STEPS))[1]
  many = jax.jit(scan_fn)
  jax.block_until_ready((one(data, jnp.int32(0)), many(data, jnp.int32(0))))

  def run(batches, first_step, scan):
    steps = [jnp.int32(first_step + k) for k in range(0, batches,
                                                      SCAN_STEPS if scan
                                                      else 1)]
    start, cpu = time.perf_counter(), time.process_time()
    if hold:
      jax.block_until_ready([many(data, t) if scan else one(data, t)
                             for t in steps])
    else:
      previous = None
      for t in steps:
        current = many(data, t) if scan else one(data, t)
        # The previous batch is consumed: wait for it and let it go, so that
        # its buffer is reused, as in a training loop.
        jax.block_until_ready(previous)
        previous = current
      jax.block_until_ready(previous)
    done = len(steps) * (SCAN_STEPS if scan else 1)
    return _rates(done * batch_size, start, cpu)
  return run


def machine() -> dict:
  info = {"python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind),
          "cpu_count": os.cpu_count(), "processor": platform.processor()}
  try:
    info["loadavg"] = os.getloadavg()
  except OSError:
    pass
  return info


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batches", type=int, default=96)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--quick", action="store_true",
                      help="2 rounds of 16 batches (a smoke run)")
  parser.add_argument("--json", default=None, help="write results here")
  parser.add_argument("--hold_batches", action="store_true",
                      help="keep every device batch of a round alive until "
                      "the round ends (module docstring)")
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.batches = 2, 16
  if args.batches % SCAN_STEPS:
    parser.error(f"--batches must be a multiple of {SCAN_STEPS}")

  ds = load_dataset("cifar10", "train", data_dir=args.data_dir)
  data = device_pipeline.put_on_device(ds)
  per_epoch = len(ds) // args.batch_size
  print(f"CIFAR-10 train {ds.images.shape}, batch {args.batch_size}, "
        f"{args.batches} batches per round, {args.rounds} rounds; "
        f"{machine()}", flush=True)
  rounds = {}
  device_runs = {aug: make_device_round(data, args.batch_size, aug,
                                        hold=args.hold_batches)
                 for aug in (True, False)}
  for r in range(args.rounds):
    for augment in (True, False):
      tag = "aug" if augment else "noaug"
      first = (r * args.batches) % per_epoch
      results = {
          "host": host_round(ds, args.batch_size, args.batches, augment,
                             r, put=False),
          "host+put": host_round(ds, args.batch_size, args.batches,
                                 augment, r, put=True),
          "device": device_runs[augment](args.batches, first, scan=False),
          "device_scan8": device_runs[augment](args.batches, first,
                                               scan=True),
      }
      for name, (wall, cpu) in results.items():
        rounds.setdefault(f"{name}/{tag}", []).append(wall)
        rounds.setdefault(f"{name}/{tag}/cpu", []).append(cpu)
      print(f"round {r} {tag:5s} " + "  ".join(
          f"{k} {w:9,.0f} ({c:9,.0f} cpu)" for k, (w, c) in results.items())
            + f"  load {os.getloadavg()[0]:.1f}", flush=True)

  summary = {}
  print("\nmedian over rounds of images/s (wall) and of images per CPU "
        "second of this process (cpu: steadier under load); device/host = "
        "median of per-round ratios:")
  for tag in ("aug", "noaug"):
    for unit in ("", "/cpu"):
      ratios = [d / h for d, h in zip(rounds[f"device/{tag}{unit}"],
                                      rounds[f"host/{tag}{unit}"])]
      row = {name: statistics.median(rounds[f"{name}/{tag}{unit}"])
             for name in ("host", "host+put", "device", "device_scan8")}
      row["device/host"] = statistics.median(ratios)
      summary[tag + unit] = row
      print(f"  {tag + (unit or '/wall'):10s} " + "  ".join(
          f"{k} {v:,.0f}" if k != "device/host" else f"{k} {v:.1f}x"
          for k, v in row.items()))
  result = {"summary": summary, "rounds": rounds, "machine": machine(),
            "args": vars(args)}
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
