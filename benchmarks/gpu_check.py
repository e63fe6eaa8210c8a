"""One check of the accelerator path: memory bandwidth of batch norm, then
every benchmark, sized for the device found (GPU/TPU, or small on CPU).

  bash benchmarks/gpu_check.sh            # full sizes on a GPU/TPU
  bash benchmarks/gpu_check.sh --quick    # small shapes (CPU: ~2-4 minutes)
  python benchmarks/gpu_check.py --only_bandwidth

1. Copy bandwidth: ``y = x + 1`` over a large float32 array (read + write:
   2 x bytes), the practical ceiling of any memory-bound kernel here. The
   device's nominal peak is printed too when its kind is in `PEAK_GBPS`.
2. Batch norm forward + backward in train mode (``value_and_grad`` of
   ``sum(y**2)`` with respect to x, scale and bias, from bench_norm.py) for
   bn_jax and flax (fast and two-pass variance). Any implementation moves at
   least ``5 x elements x bytes per element``: the forward reads x and writes
   y, the backward reads x and dy and writes dx (statistics are per channel,
   negligible). Printed: achieved GB/s = that lower bound / time, and its
   fraction of the measured copy bandwidth and of the nominal peak.
3. bench_norm, bench_cbn, bench_train and bench_input_pipeline as
   subprocesses (their own output), with small sizes under ``--quick``.

It prints; it does not assert (a benchmark on a shared machine is not a
test). Exit status: non-zero if a subprocess failed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_norm  # noqa: E402  pylint: disable=wrong-import-position

# Nominal DRAM bandwidth, GB/s (vendor data sheets), by device_kind substring
# (first match wins: more specific names first).
PEAK_GBPS = (
    ("H200", 4800), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
    ("A10G", 600), ("A10", 600), ("L40S", 864), ("L4", 300), ("T4", 320),
    ("V100", 900), ("RTX 4090", 1008), ("RTX 3090", 936),
    ("TPU v5 lite", 819), ("TPU v5e", 819), ("TPU v5p", 2765),
    ("TPU v4", 1200), ("TPU v6", 1640),
)


def nominal_peak_gbps(kind: str):
  for name, gbps in PEAK_GBPS:
    if name.lower() in kind.lower():
      return gbps
  return None


def _median_seconds(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def copy_bandwidth_gbps(num_bytes: int, repeats: int) -> float:
  # Donated: the output reuses the input's buffer (no fresh allocation, whose
  # page faults dominate on a CPU).
  add = jax.jit(lambda v: v + 1, donate_argnums=0)
  box = [jnp.zeros(num_bytes // 4, jnp.float32)]

  def step():
    box[0] = jax.block_until_ready(add(box[0]))
  seconds = _median_seconds(step, repeats)
  return 2 * num_bytes / seconds / 1e9


def bn_bandwidth(shapes, dtypes, rounds, sample_ms, copy_gbps, peak_gbps):
  print("\nBN train forward+backward: median ms, achieved GB/s (>= 5 x "
        "elements x bytes moved / time), fraction of copy bandwidth "
        "[of nominal peak]")
  print(f"{'shape':>18} {'dtype':>8} {'impl':>7} {'ms':>8} {'GB/s':>8} "
        f"{'copy %':>7} {'peak %':>7}")
  for dtype in dtypes:
    for shape in shapes:
      med, _, ratio, _ = bench_norm.bench_case(shape, dtype, rounds,
                                               sample_ms, torch=None)
      elements = 1
      for d in shape:
        elements *= d
      min_bytes = 5 * elements * jnp.dtype(dtype).itemsize
      for impl in ("ours", "flax", "flax2p"):
        gbps = min_bytes / (med[impl] * 1e-3) / 1e9
        peak = (f"{100 * gbps / peak_gbps:6.1f}%" if peak_gbps else
                f"{'-':>7}")
        print(f"{'x'.join(map(str, shape)):>18} {jnp.dtype(dtype).name:>8} "
              f"{impl:>7} {med[impl]:8.3f} {gbps:8.1f} "
              f"{100 * gbps / copy_gbps:6.1f}% {peak}", flush=True)
      print(f"{'':>18} {'':>8} ours/flax time ratio {ratio:.3f}")


def run_benchmarks(quick: bool, accelerator: bool, timeout_s: int) -> int:
  python = sys.executable
  if accelerator:
    commands = [
        ["bench_norm.py"] + (["--quick"] if quick else []),
        ["bench_cbn.py"] + (["--quick"] if quick else []),
        ["bench_train.py", "--steps", "20" if quick else "50", "--no_torch"],
        ["bench_input_pipeline.py"] + (["--quick"] if quick else []),
    ]
  else:  # small enough for a couple of minutes on a 2-core CPU
    commands = [
        ["bench_norm.py", "--quick", "--rounds", "3", "--dtypes", "float32",
         "--shapes", "32x8x8x16,60x100", "--no_torch"],
        ["bench_cbn.py", "--quick", "--batches", "4"],
        ["bench_train.py", "--batch_size", "16", "--steps", "2",
         "--warmup", "1", "--norms", "bn", "--no_torch"],
        ["bench_input_pipeline.py", "--quick"],
    ]
  failures = 0
  for command in commands:
    print(f"\n$ python benchmarks/{' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
      code = subprocess.run([python, str(HERE / command[0])] + command[1:],
                            cwd=HERE.parent, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
      code = "timeout"
    print(f"[exit {code}, {time.perf_counter() - start:.0f} s]", flush=True)
    failures += code != 0
  return failures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small shapes and short runs")
  parser.add_argument("--only_bandwidth", action="store_true",
                      help="skip the benchmark subprocesses")
  parser.add_argument("--timeout_s", type=int, default=900,
                      help="per benchmark subprocess")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  accelerator = device.platform != "cpu"
  kind = device.device_kind
  peak = nominal_peak_gbps(kind) if accelerator else None
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{len(jax.devices())} x {kind}; nominal peak "
        f"{f'{peak} GB/s' if peak else 'unknown'}; "
        f"{os.cpu_count()} host CPUs; load {os.getloadavg()[0]:.1f}")
  if accelerator:
    copy_bytes = 2**28 if args.quick else 2**30
    shapes = [(128, 32, 32, 64), (256, 56, 56, 64), (256, 28, 28, 256)]
    dtypes = [jnp.float32, jnp.bfloat16]
    rounds, sample_ms = (7, 20.0) if args.quick else (15, 50.0)
  else:
    copy_bytes = 2**26 if args.quick else 2**28  # beyond the caches
    shapes = [(32, 16, 16, 32)] if args.quick else [(128, 32, 32, 64)]
    dtypes = [jnp.float32]
    rounds, sample_ms = (3, 3.0) if args.quick else (9, 6.0)
  copy_gbps = copy_bandwidth_gbps(copy_bytes, repeats=20)
  print(f"copy bandwidth (x + 1 over {copy_bytes / 2**20:.0f} MiB f32, read "
        f"+ write): {copy_gbps:.1f} GB/s"
        + (f" = {100 * copy_gbps / peak:.0f}% of nominal" if peak else ""))
  bn_bandwidth(shapes, dtypes, rounds, sample_ms, copy_gbps, peak)
  if args.only_bandwidth:
    return 0
  return 1 if run_benchmarks(args.quick, accelerator, args.timeout_s) else 0


if __name__ == "__main__":
  sys.exit(main())
