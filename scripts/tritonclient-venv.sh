#!/usr/bin/env bash
# A Python virtualenv with Triton's clients (tritonclient 2.41.0, gRPC and HTTP; its wheel also
# carries perf_analyzer) for the KServe v2 tests and benchmarks. Prints the interpreter's path.
#   scripts/tritonclient-venv.sh [DIR]     (default: target/oip-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/oip-venv}
if ! "$dir/bin/python" -c "import tritonclient.grpc, tritonclient.http, numpy" 2>/dev/null; then
  python3 -m venv "$dir" >&2
  # tritonclient 2.41's generated code needs protobuf below 5; its extras do not pin it.
  "$dir/bin/pip" install --quiet "tritonclient[all]==2.41.0" "protobuf>=3.5,<5" numpy >&2
fi
echo "$PWD/$dir/bin/python"
