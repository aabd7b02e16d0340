#!/usr/bin/env bash
# The Java client's tests (clients/java, JUnit 5 with Maven Surefire) against the real daemon:
# builds rankd and rankd-tool (debug) if needed, then `mvn -B test` (not -q: Surefire's
# "Tests run:" summary stays visible).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bin rankd --bin rankd-tool 2>&1 | tail -1
cd clients/java
RANKD_BIN="$PWD/../../target/debug/rankd" RANKD_TOOL_BIN="$PWD/../../target/debug/rankd-tool" \
  mvn -B test
