#!/usr/bin/env bash
# Runs the engine benchmarks and their peers back to back on this machine, so ratios compare
# numbers from the same run. Installs the peers (onnxruntime, onnx, numpy) into benches/.venv.
#   benches/run.sh                 engine + peers
#   benches/run.sh all             every criterion bench + peers + the daemon bench (rpc_bench)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=benches/.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet onnxruntime onnx numpy threadpoolctl torch
fi
if [ "${1:-}" = "all" ]; then
  cargo bench -p rankd-benches
  cargo run --release -p rankd-benches --bin rpc_bench -- 5
  cargo run --release -p rankd-benches --bin train_bench -- 5
else
  cargo bench -p rankd-benches --bench engine
fi
# One thread for every peer; OPENBLAS_CORETYPE pins an old kernel on some hosts (see
# docs/benchmarks.md), so it is unset here, for the peers only.
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
  "$venv/bin/python" benches/peers.py
if [ "${1:-}" = "all" ]; then
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 "$venv/bin/python" benches/torch_train.py
fi
