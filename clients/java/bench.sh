#!/usr/bin/env bash
# The Java client against the Rust client on the same daemon, same requests (Adult, 40 rows),
# same window of requests in flight, one run: requests/s and p50/p99 of each, and the ratio.
# The daemon is pinned to CPU 0, the clients to CPU 1.
#   clients/java/bench.sh [SECONDS] [WINDOW] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-5}
window=${2:-32}
conns=${3:-2}
cargo build --release -p rankd-serving -p rankd-benches --bin rankd --bin client_bench 2>&1 | tail -1
(cd clients/java && mvn -q -B test-compile dependency:build-classpath -Dmdep.outputFile=target/cp.txt)
cp="$PWD/clients/java/target/classes:$PWD/clients/java/target/test-classes:$(cat clients/java/target/cp.txt)"
log=$(mktemp)
taskset -c 0 target/release/rankd --models examples/models --threads 1 --listen 127.0.0.1:7790 \
  --admin 127.0.0.1:7791 2>"$log" &
pid=$!
trap 'kill $pid; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q "serving on" "$log" && break; sleep 0.1; done
out=()
for round in 1 2; do
  out+=("$(taskset -c 1 target/release/client_bench 127.0.0.1:7790 "$secs" "$window" "$conns")")
  out+=("$(cd clients/java && taskset -c 1 java -cp "$cp" rankd.client.ClientBench 127.0.0.1:7790 "$secs" "$window" "$conns")")
done
printf '%s\n' "${out[@]}"
printf '%s\n' "${out[@]}" | python3 -c '
import sys
r = {"rust": [], "java": []}
for line in sys.stdin:
    f = line.split()
    r[f[0]].append(float(f[2]))
j, t = max(r["java"]), max(r["rust"])
print("java/rust throughput: %.2f (best of 2 rounds each)" % (j / t))'
