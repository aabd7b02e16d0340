#!/usr/bin/env bash
# rankd's CPU engine against onnxruntime and PyTorch on the same whole feed model, one thread each,
# rounds alternating, medians (issue #18; see benches/engine_peers.py for what each peer runs).
#   benches/engine-peers.sh [ROUNDS [SECONDS [ISA [CROSS]]]]  ISA: avx2 to force the AVX2 build on
#                                                       an AVX-512 machine; default: the widest.
#                                                       CROSS (e.g. 3:0:parallel): a DCN-v2 feed
#                                                       model (#21), whole models only
# Installs the peers (onnxruntime, onnx, numpy, torch) into benches/.venv like benches/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=benches/.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet onnxruntime onnx numpy threadpoolctl torch
fi
cargo build --release -p rankd-benches --bin engine_sizes
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
target/release/engine_sizes --export "$dir" ${4:+--cross "$4"}
grep -o -m1 -w 'avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/CPU flags seen: /'
echo
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
  "$venv/bin/python" benches/engine_peers.py "$dir" target/release/engine_sizes \
  "${1:-5}" "${2:-0.4}" "${3:-}"
