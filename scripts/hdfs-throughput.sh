#!/usr/bin/env bash
# Download throughput from HDFS, rankd against Hadoop's own FsShell, same file, same run
# (docs/hdfs.md): the 86 MB feed benchmark model, ROUNDS times each, alternating:
#   rankd     `rankd-tool validate hdfs://.../model.rkm`: hdfs-native download into a temporary
#             file with the model checks on the stream (header, body checksum, verifier), then
#             the same checks again on open; the time of the whole command
#   fsshell   `hadoop fs -get` of the same file (HDFS's own CRC checks), whole command
#   jvm       `hadoop fs -get` of a 1-byte file: FsShell's fixed cost (JVM start, connection)
# FsShell's net transfer time is fsshell - jvm.
#   scripts/hdfs-throughput.sh [OUT_DIR]    (ROUNDS=5 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
cargo build --release --bin rankd-tool >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -z "${RANKD_HDFS_URL:-}" ]; then
  export RANKD_HDFS_DIR="$work/hdfs"
  RANKD_HDFS_URL="$(scripts/hdfs.sh start "$RANKD_HDFS_DIR" --owner $$)"
fi
dir="${RANKD_HDFS_DIR:-/tmp/rankd-hdfs}"
root="$RANKD_HDFS_URL/throughput-$$"
target/release/rankd-tool synth --kind feed --name feed --version 1 -o "$work/feed.rkm" >/dev/null
size=$(stat -c %s "$work/feed.rkm")
target/release/rankd-tool deploy "$work/feed.rkm" --root "$root" >/dev/null
printf x > "$work/one"
scripts/hdfs.sh fs "$dir" -- -put "$work/one" "$root/one" >/dev/null
now() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }
: > "$out/throughput.txt"
for r in $(seq 1 "${ROUNDS:-5}"); do
  a=$(now); target/release/rankd-tool validate "$root/feed/1/model.rkm" >/dev/null; b=$(now)
  rm -f "$work/got.rkm"
  c=$(now); scripts/hdfs.sh fs "$dir" -- -get "$root/feed/1/model.rkm" "$work/got.rkm" >/dev/null; d=$(now)
  rm -f "$work/got1"
  e=$(now); scripts/hdfs.sh fs "$dir" -- -get "$root/one" "$work/got1" >/dev/null; f=$(now)
  cmp -s "$work/got.rkm" "$work/feed.rkm"
  echo "$r $((b - a)) $((d - c)) $((f - e))" | tee -a "$out/throughput.txt" >&2
done
scripts/hdfs.sh fs "$dir" -- -rm -r -f "$root" >/dev/null 2>&1 || true
python3 - "$out/throughput.txt" "$size" <<'PY'
import json, statistics, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1])]
size = int(sys.argv[2])
mib = size / 2**20
rankd = [r[1] for r in rows]; fs = [r[2] for r in rows]; jvm = [r[3] for r in rows]
net = [a - b for a, b in zip(fs, jvm)]
med = statistics.median
summary = {
    "file_bytes": size,
    "rounds": len(rows),
    "rankd_validate_ms": {"median": med(rankd), "all": rankd},
    "rankd_mib_per_s_whole_command": round(mib / (med(rankd) / 1e3), 1),
    "fsshell_get_ms": {"median": med(fs), "all": fs},
    "fsshell_fixed_cost_ms": {"median": med(jvm), "all": jvm},
    "fsshell_net_mib_per_s": round(mib / (max(med(net), 1) / 1e3), 1),
    "fsshell_whole_command_mib_per_s": round(mib / (med(fs) / 1e3), 1),
    "ratio_rankd_whole_to_fsshell_whole": round(med(fs) / med(rankd), 2),
}
print(json.dumps(summary, indent=2))
PY
