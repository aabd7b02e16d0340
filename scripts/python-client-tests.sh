#!/usr/bin/env bash
# The Python client's tests (clients/python, pytest) against the real daemon: builds rankd and
# rankd-tool (debug) if needed, installs the client with its test extras into a virtualenv
# (target/pyclient-venv), runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bin rankd --bin rankd-tool 2>&1 | tail -1
venv=target/pyclient-venv
if ! "$venv/bin/python" -c "import rankd, pytest, numpy" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -e "clients/python[test]"
fi
cd clients/python
RANKD_BIN="$PWD/../../target/debug/rankd" RANKD_TOOL_BIN="$PWD/../../target/debug/rankd-tool" \
  "../../$venv/bin/python" -m pytest tests
