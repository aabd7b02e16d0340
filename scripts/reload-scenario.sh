#!/usr/bin/env bash
# The hot-reload proof (docs/hot-reload.md): under constant load at about half of the maximum
# rate on the feed benchmark model, deploy 20 new versions one after another (and one corrupt
# file in the middle), and report failed requests, p99 against a run without reloads, the time
# from rename to the first response of each new version, and the daemon's resident memory.
#   scripts/reload-scenario.sh [OUT_DIR]
# rankd's worker runs on CPU 0 (one core), the load generator and the deploys on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
cargo build --release --bin rankd --bin rankd-tool --bin rankd-load >&2
bin=target/release
work="$(mktemp -d)"
root="$work/root"
mkdir -p "$root"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

echo "writing 21 feed model versions..." >&2
for v in $(seq 1 21); do
  "$bin/rankd-tool" synth --kind feed --name feed --version "$v" --seed "$v" -o "$work/v$v.rkm" >/dev/null
done
"$bin/rankd-tool" deploy "$work/v1.rkm" --root "$root" >/dev/null
# A corrupt drop: version 11, truncated, placed by hand (the deploy tool refuses corrupt files).
head -c 50000000 "$work/v11.rkm" > "$work/corrupt.rkm"

cat > "$work/rankd.toml" <<TOML
rescan_interval_ms = 1000
[model.feed]
versions = "latest"
TOML
# One worker pinned to CPU 0; the reload thread keeps off it (and below its priority).
"$bin/rankd" --config "$work/rankd.toml" --models "$root" --threads 1 --pin-cores \
  --listen 127.0.0.1:7590 --admin 127.0.0.1:7591 2> "$out/rankd.log" &
rankd_pid=$!
for _ in $(seq 100); do
  grep -q "serving on" "$out/rankd.log" 2>/dev/null && break
  sleep 0.1
done
load=( "$bin/rankd-load" --addr 127.0.0.1:7590 --model feed --model-file "$work/v1.rkm" --items 200 --connections 4 --json )

echo "finding the maximum rate (p99 <= 20 ms)..." >&2
taskset -c 1 "${load[@]}" --find-max-rate 20000 --rate 400 --trial-duration 2 > "$out/max.txt" 2>/dev/null
max=$(tail -1 "$out/max.txt" | python3 -c 'import json,sys; print(json.load(sys.stdin)["max_rate"])')
rate=$(python3 -c "print(round($max / 2))")
echo "max rate $max req/s; running at $rate req/s" >&2

echo "baseline: 20 s without reloads..." >&2
taskset -c 1 "${load[@]}" --rate "$rate" --duration 20 > "$out/baseline.txt" 2>/dev/null

echo "reload run: 20 deploys under load..." >&2
( while kill -0 "$rankd_pid" 2>/dev/null; do
    echo "$(date +%s%3N) $(awk '/VmRSS/ {print $2}' /proc/$rankd_pid/status)"
    sleep 0.1
  done ) > "$out/rss.txt" &
rss_pid=$!
taskset -c 1 "${load[@]}" --rate "$rate" --duration 50 > "$out/reload.txt" 2>/dev/null &
load_pid=$!
sleep 4
: > "$out/deploys.txt"
for v in $(seq 2 21); do
  if [ "$v" = 11 ]; then
    mkdir -p "$root/feed/.tmp-11"
    cp "$work/corrupt.rkm" "$root/feed/.tmp-11/model.rkm"
    mv "$root/feed/.tmp-11" "$root/feed/11"
    echo "11 $(date +%s%3N) corrupt" >> "$out/deploys.txt"
  else
    ms=$(taskset -c 1 chrt -i 0 "$bin/rankd-tool" deploy "$work/v$v.rkm" --root "$root" | sed 's/.*renamed_at_ms=//')
    echo "$v $ms ok" >> "$out/deploys.txt"
  fi
  sleep 2
done
wait "$load_pid"
sleep 1
kill "$rss_pid" 2>/dev/null || true
curl -s http://127.0.0.1:7591/metrics > "$out/metrics.txt" 2>/dev/null || true
kill -TERM "$rankd_pid"
wait "$rankd_pid" || true

python3 - "$out" "$(stat -c %s "$work/v2.rkm")" <<'PY'
import json, sys
out, size = sys.argv[1], int(sys.argv[2])
last = lambda f: json.loads(open(f"{out}/{f}").read().strip().splitlines()[-1])
base, rel = last("baseline.txt"), last("reload.txt")
deploys = [l.split() for l in open(f"{out}/deploys.txt")]
first = {int(k): v for k, v in rel["first_seen_ms"].items()}
delays = [first[int(v)] - int(ms) for v, ms, kind in deploys if kind == "ok" and int(v) in first]
missing = [v for v, ms, kind in deploys if kind == "ok" and int(v) not in first]
rss = [(int(t), int(k)) for t, k in (l.split() for l in open(f"{out}/rss.txt")) if k.isdigit()]
t0 = int(deploys[0][1])
before = [k for t, k in rss if t < t0]
base_rss = max(before) if before else rss[0][1]
peak = max(k for _, k in rss)
end_rss = rss[-1][1]
summary = {
    "rate": rel["rate"],
    "failed_requests": rel["errors"],
    "errors_by_code": rel["errors_by_code"],
    "p99_us_baseline": base["p99_us"],
    "p99_us_during_reloads": rel["p99_us"],
    "p99_ratio": rel["p99_us"] / max(base["p99_us"], 1),
    "p999_us_baseline": base["p999_us"],
    "p999_us_during_reloads": rel["p999_us"],
    "rename_to_first_response_ms": {"max": max(delays) if delays else None, "median": sorted(delays)[len(delays)//2] if delays else None, "all": delays},
    "versions_never_served": missing,
    "corrupt_version_served": "11" in rel["versions"],
    "model_file_bytes": size,
    "rss_kib": {"before_deploys": base_rss, "peak": peak, "end": end_rss, "peak_growth": peak - base_rss, "end_growth": end_rss - base_rss},
}
print(json.dumps(summary, indent=2))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
PY
