#!/usr/bin/env bash
# The hot-reload proof (docs/hot-reload.md): under constant load at about half of the maximum
# rate on the feed benchmark model, deploy 20 new versions one after another (and one corrupt
# file in the middle), and report failed requests, p99 during the reloads against p99 of the
# same run without reloads, the time from rename to the first response of each new version, and
# the daemon's resident memory.
#   scripts/reload-scenario.sh [OUT_DIR]
# rankd's worker runs on CPU 0 (one core), the load generator and the deploys on CPU 1.
#
# One load run of 92 s with a deploy every 4 s: each deploy's window (from the start of the copy
# to 1 s after the new version's first response, or 1 s after the corrupt drop) is "during
# reloads"; the rest of the run after its first 2 s is "without reloads". Interleaving the two
# in one run keeps the machine's drift (other tenants of a shared host) out of the ratio.
# RATE=R: run at R requests/s instead of half the measured maximum. VERIFY_MIBS: the daemon's
# reload_verify_mib_per_sec (default 0 = unpaced).
# RESCAN_MS (default 1000) and EXTRA_CONFIG (more lines for rankd.toml, e.g. "watch = false")
# for experiments.
# HDFS=1: the model root is on HDFS (the cluster of $RANKD_HDFS_URL, else one started here with
# scripts/hdfs.sh, its JVM kept on CPU 1): deploys go through `rankd-tool deploy --root hdfs://...`,
# the daemon polls every HDFS_POLL_MS (default 500) and downloads into a local cache; the corrupt
# drop is put there with Hadoop's FsShell.
# RENAME_ONLY=1: the copies are made before the run and each deploy is only the rename (to tell
# the daemon's share of a deploy's cost from the copy's). rankd-load's --latency-log gives every
# request's intended send time and latency, aligned with deploys.txt for a closer look.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
cargo build --release --bin rankd --bin rankd-tool --bin rankd-load >&2
bin=target/release
work="$(mktemp -d)"
root="$work/root"
mkdir -p "$root"
hdfs_extra=""
if [ "${HDFS:-0}" = 1 ]; then
  if [ -z "${RANKD_HDFS_URL:-}" ]; then
    export RANKD_HDFS_DIR="$work/hdfs"
    RANKD_HDFS_URL="$(scripts/hdfs.sh start "$RANKD_HDFS_DIR" --owner $$)"
    export RANKD_HDFS_URL
  fi
  # The NameNode and DataNode run beside the load generator, off the serving core.
  taskset -a -cp 1 "$(cat "${RANKD_HDFS_DIR:-/tmp/rankd-hdfs}/pid")" >/dev/null 2>&1 || true
  root="$RANKD_HDFS_URL/reload-scenario-$$"
  hdfs_extra="[hdfs]
cache_dir = \"$work/cache\"
poll_interval_ms = ${HDFS_POLL_MS:-500}"
fi
# The logs written during the run go to memory (when /dev/shm exists), so that their writeback
# is not part of what is measured.
logs="$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work" "$logs"' EXIT

echo "writing 21 feed model versions..." >&2
for v in $(seq 1 21); do
  "$bin/rankd-tool" synth --kind feed --name feed --version "$v" --seed "$v" -o "$work/v$v.rkm" >/dev/null
done
"$bin/rankd-tool" deploy "$work/v1.rkm" --root "$root" >/dev/null
# A corrupt drop: version 11, truncated, placed by hand (the deploy tool refuses corrupt files).
head -c 50000000 "$work/v11.rkm" > "$work/corrupt.rkm"

cat > "$work/rankd.toml" <<TOML
rescan_interval_ms = ${RESCAN_MS:-1000}
${EXTRA_CONFIG:-}
reload_verify_mib_per_sec = ${VERIFY_MIBS:-0}
[model.feed]
versions = "latest"
${hdfs_extra}
TOML
# One worker pinned to CPU 0; the reload thread keeps off it (and below its priority).
"$bin/rankd" --config "$work/rankd.toml" --models "$root" --threads 1 --pin-cores \
  --listen 127.0.0.1:7590 --admin 127.0.0.1:7591 2> "$out/rankd.log" &
rankd_pid=$!
for _ in $(seq 100); do
  grep -q "serving on" "$out/rankd.log" 2>/dev/null && break
  sleep 0.1
done
if [ "${RENAME_ONLY:-0}" = 1 ]; then  # experiment: copies made before the run, only renames in it
  for v in $(seq 2 21); do mkdir -p "$root/feed/.pre-$v"; cp "$work/v$v.rkm" "$root/feed/.pre-$v/model.rkm"; done; sync
fi
# The load generator shares CPU 1 with the deploys and the daemon's reload thread; at a real-time
# priority its sends leave on time whatever those do (the kernel here is not preemptible, so a
# normal-priority client waited behind their system calls, and that delay counted as latency).
rt=(chrt -f 1); chrt -f 1 true 2>/dev/null || rt=()
load=( "$bin/rankd-load" --addr 127.0.0.1:7590 --model feed --model-file "$work/v1.rkm" --items 200 --connections 4 --json )

if [ -n "${RATE:-}" ]; then
  rate=$RATE
  echo "running at the given rate, $rate req/s" >&2
else
  echo "finding the maximum rate (p99 <= 20 ms)..." >&2
  "${rt[@]}" taskset -c 1 "${load[@]}" --find-max-rate 20000 --rate 400 --trial-duration 2 > "$out/max.txt" 2>/dev/null
  max=$(tail -1 "$out/max.txt" | python3 -c 'import json,sys; print(json.load(sys.stdin)["max_rate"])')
  rate=$(python3 -c "print(round($max / 2))")
  echo "max rate $max req/s; running at $rate req/s" >&2
fi

echo "one run: 20 deploys, one every 4 s, under load..." >&2
# The sampler forks nothing (bash builtins only) and stays on CPU 1 beside the load generator.
taskset -c 1 bash -c '
  while [ -e /proc/'"$rankd_pid"' ]; do
    rss=; steal=
    while read -r k v _; do [ "$k" = VmRSS: ] && rss=$v; done < /proc/'"$rankd_pid"'/status
    while read -r c _ _ _ _ _ _ _ st _; do [ "$c" = cpu0 ] && steal=$st; done < /proc/stat
    [ -n "$rss" ] && echo "${EPOCHREALTIME/./} $rss $steal"
    read -r -t 0.1 <> <(:) || true
  done' | taskset -c 1 awk '{ printf "%.0f %s %s\n", $1 / 1000, $2, $3; fflush() }' > "$logs/rss.txt" &
rss_pid=$!
"${rt[@]}" taskset -c 1 "${load[@]}" --rate "$rate" --duration 92 --latency-log "$logs/latency.txt" \
  > "$out/reload.txt" 2>/dev/null &
load_pid=$!
sleep 6
: > "$out/deploys.txt"
# The deploy loop and every command in it run on CPU 1 too (nothing forks onto the serving core).
export bin root work out HDFS RANKD_HDFS_DIR
taskset -c 1 bash -c '
now() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }
for v in $(seq 2 21); do
  start=$(now)
  if [ "$v" = 11 ] && [ "${HDFS:-0}" = 1 ]; then
    scripts/hdfs.sh fs "${RANKD_HDFS_DIR:-/tmp/rankd-hdfs}" -- -mkdir -p "$root/feed/.tmp-11"
    scripts/hdfs.sh fs "${RANKD_HDFS_DIR:-/tmp/rankd-hdfs}" -- -put "$work/corrupt.rkm" "$root/feed/.tmp-11/model.rkm"
    scripts/hdfs.sh fs "${RANKD_HDFS_DIR:-/tmp/rankd-hdfs}" -- -mv "$root/feed/.tmp-11" "$root/feed/11"
    echo "11 $start $(now) corrupt" >> "$out/deploys.txt"
  elif [ "$v" = 11 ]; then
    mkdir -p "$root/feed/.tmp-11"
    cp "$work/corrupt.rkm" "$root/feed/.tmp-11/model.rkm"
    mv "$root/feed/.tmp-11" "$root/feed/11"
    echo "11 $start $(now) corrupt" >> "$out/deploys.txt"
  else
    if [ "${RENAME_ONLY:-0}" = 1 ]; then
      mv "$root/feed/.pre-$v" "$root/feed/$v"; ms=$(now)
    else
      ms=$(chrt -i 0 "$bin/rankd-tool" deploy "$work/v$v.rkm" --root "$root" | sed "s/.*renamed_at_ms=//")
    fi
    echo "$v $start $ms ok" >> "$out/deploys.txt"
  fi
  left=$(( 4000 - ($(now) - start) ))
  [ "$left" -gt 100 ] || left=100
  read -r -t "$(printf "%d.%03d" $((left / 1000)) $((left % 1000)))" <> <(:) || true
done'
wait "$load_pid"
sleep 1
kill "$rss_pid" 2>/dev/null || true
curl -s http://127.0.0.1:7591/metrics > "$out/metrics.txt" 2>/dev/null || true
kill -TERM "$rankd_pid"
wait "$rankd_pid" || true
cp "$logs/latency.txt" "$logs/rss.txt" "$out/"

python3 - "$out" "$(stat -c %s "$work/v2.rkm")" <<'PY'
import json, sys
out, size = sys.argv[1], int(sys.argv[2])
rel = json.loads(open(f"{out}/reload.txt").read().strip().splitlines()[-1])
deploys = [l.split() for l in open(f"{out}/deploys.txt")]
first = {int(k): v for k, v in rel["first_seen_ms"].items()}
delays = [first[int(v)] - int(ms) for v, st, ms, kind in deploys if kind == "ok" and int(v) in first]
missing = [v for v, st, ms, kind in deploys if kind == "ok" and int(v) not in first]
# Windows "during reloads", in microseconds since the epoch.
windows = []
for v, st, ms, kind in deploys:
    end = (first.get(int(v), int(ms)) if kind == "ok" else int(ms)) + 1000
    windows.append((int(st) * 1000, end * 1000))
samples = [l.split() for l in open(f"{out}/latency.txt")]
t0 = int(samples[0][0]) + 2_000_000
during, without = [], []
for t, lat, ver in samples:
    t, lat = int(t), int(lat)
    if t < t0:
        continue
    (during if any(a <= t < b for a, b in windows) else without).append(lat)
def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
rows = [l.split() for l in open(f"{out}/rss.txt")]
rss = [(int(r[0]), int(r[1])) for r in rows if len(r) >= 2 and r[1].isdigit()]
# CPU 0's steal time (the hypervisor running something else on the serving core), in ticks of
# 10 ms between samples, split by window: it tells host noise from the daemon's own.
steal = {"during": 0, "without": 0}
prev = None
for r in rows:
    if len(r) < 3 or not r[2].isdigit():
        continue
    t, ticks = int(r[0]) * 1000, int(r[2])
    if prev is not None and t >= t0:
        steal["during" if any(a <= t < b for a, b in windows) else "without"] += ticks - prev
    prev = ticks
d0 = int(deploys[0][1])
before = [k for t, k in rss if t < d0]
base_rss = max(before) if before else rss[0][1]
peak = max(k for _, k in rss)
end_rss = rss[-1][1]
# Per deploy: the peak between its start and the next deploy's, against the last sample
# before it (both versions overlap in between), and where RSS settles before the next one.
per_deploy = []
starts = [int(d[1]) for d in deploys] + [rss[-1][0] + 1]
for a, b in zip(starts, starts[1:]):
    pre = [k for t, k in rss if t < a]
    win = [k for t, k in rss if a <= t < b]
    if pre and win:
        per_deploy.append((max(win) - pre[-1], win[-1] - pre[-1]))
summary = {
    "rate": rel["rate"],
    "failed_requests": rel["errors"],
    "errors_by_code": rel["errors_by_code"],
    "requests_during_reloads": len(during),
    "requests_without_reloads": len(without),
    "seconds_during_reloads": round(sum(b - a for a, b in windows) / 1e6, 1),
    "p99_us_without_reloads": q(without, 0.99),
    "p99_us_during_reloads": q(during, 0.99),
    "p99_ratio": round(q(during, 0.99) / max(q(without, 0.99), 1), 3),
    "p50_us_without_reloads": q(without, 0.5),
    "p50_us_during_reloads": q(during, 0.5),
    "p999_us_without_reloads": q(without, 0.999),
    "p999_us_during_reloads": q(during, 0.999),
    "p99_us_whole_run": rel["p99_us"],
    "cpu0_steal_ms_per_s": {k: round(v * 10 / max(secs, 1e-9), 2) for k, v, secs in (
        ("during", steal["during"], sum(b - a for a, b in windows) / 1e6),
        ("without", steal["without"], (int(samples[-1][0]) - t0) / 1e6 - sum(b - a for a, b in windows) / 1e6))},
    "rename_to_first_response_ms": {"max": max(delays) if delays else None, "median": sorted(delays)[len(delays)//2] if delays else None, "all": delays},
    "versions_never_served": missing,
    "corrupt_version_served": "11" in rel["versions"],
    "model_file_bytes": size,
    "rss_kib": {"before_deploys": base_rss, "peak": peak, "end": end_rss, "peak_growth": peak - base_rss, "end_growth": end_rss - base_rss,
                "per_deploy_peak_growth_max": max(g for g, _ in per_deploy),
                "per_deploy_settled_growth_max": max(e for _, e in per_deploy),
                "mapped_kib": -(-size // 4096) * 4},
}
print(json.dumps(summary, indent=2))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
PY
