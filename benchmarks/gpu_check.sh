#!/usr/bin/env bash
# Accelerator check: BN forward+backward memory-bandwidth fraction (bn_jax vs
# flax) and every benchmark (bench_norm, bench_cbn, bench_train,
# bench_input_pipeline), sized for the device found. See gpu_check.py.
#   bash benchmarks/gpu_check.sh [--quick] [--only_bandwidth]
# On a CPU-only machine it runs the same code on small shapes (--quick: a
# few minutes on 2 cores), so that the script keeps working.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  source .venv/bin/activate
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  2>/dev/null || echo "(no nvidia-smi: not an NVIDIA GPU machine)"
exec python benchmarks/gpu_check.py "$@"
