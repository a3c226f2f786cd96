#!/usr/bin/env bash
# The GPU run, from the checkout (the GPU machine has jax, flax, optax, torch, torchvision):
#   bash benchmarks/gpu.sh                  throughput, parity and memory: about 15 minutes on an H100/H200
#   bash benchmarks/gpu.sh --only memory    the memory figures alone: about 8-10 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec python3 benchmarks/gpu.py "$@"
