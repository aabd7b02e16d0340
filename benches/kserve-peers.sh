#!/usr/bin/env bash
# rankd against the servers a team would otherwise deploy, side by side in one run on this
# machine, with one load tool (rankd-load: open loop, HDR histograms) for every server:
#   rankd: binary RPC, KServe v2 gRPC, KServe v2 REST
#   MLServer 1.7.1 with a custom runtime (benches/peers/rankd_mlserver.py): gRPC, REST
#   KServe's Python model server 0.21 (benches/peers/rankd_kserve.py): gRPC, REST
# Each peer computes the same features and network in Python (benches/peers/rankd_model.py);
# its scores are checked against rankd's first. Every server gets CPU 0 (one process, one worker),
# the load generator CPU 1. Models: the bundled Adult W&D model and the feed bench model, 200
# items per request.
#
#   benches/kserve-peers.sh [OUT.md]        (default: target/kserve-peers.md)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/kserve-peers.md}
trial=${TRIAL_SECONDS:-3}
fixed=${FIXED_SECONDS:-5}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

py=$(scripts/tritonclient-venv.sh)
for peer in mlserver kserve; do
  v=target/peer-$peer
  if [ ! -x "$v/bin/python" ]; then
    python3 -m venv "$v"
    case $peer in
      mlserver) "$v/bin/pip" install --quiet "mlserver==1.7.1" numpy xxhash ;;
      kserve) "$v/bin/pip" install --quiet "kserve==0.21.0" numpy xxhash ;;
    esac
  fi
done
cargo build --release -p rankd-serving -p rankd-loadtest -p rankd-tools \
  --bin rankd --bin rankd-load --bin rankd-tool 2>&1 | tail -1
bin=target/release

for m in adult feed; do
  mkdir -p "$work/models/$m/1" "$work/peer/$m"
  if [ $m = adult ]; then
    cp examples/models/adult/1/model.rkm "$work/models/$m/1/"
  else
    $bin/rankd-tool synth --kind feed --name feed --output "$work/models/$m/1/model.rkm" >/dev/null
  fi
  cp "$work/models/$m/1/model.rkm" "$work/peer/$m/"
  $bin/rankd-tool inspect --json "$work/peer/$m/model.rkm" >"$work/peer/$m/inspect.json"
  printf '{"name": "%s", "implementation": "rankd_mlserver.RankdRuntime", "parameters": {"uri": "%s"}}\n' \
    $m "$work/peer/$m" >"$work/peer/$m/model-settings.json"
done
printf '{"http_port": 8190, "grpc_port": 8191, "metrics_port": 8192, "parallel_workers": 0}\n' \
  >"$work/peer/settings.json"

wait_http() { for _ in $(seq 200); do curl -sf "http://$1/v2/health/ready" >/dev/null && return 0; sleep 0.1; done; echo "no $1" >&2; return 1; }

taskset -c 0 $bin/rankd --models "$work/models" --threads 1 --listen 127.0.0.1:7590 \
  --admin 127.0.0.1:7591 --grpc 127.0.0.1:7592 --http 127.0.0.1:7593 2>"$work/rankd.log" &
pids+=($!)
repo=$PWD
(cd "$work/peer" && PYTHONPATH="$repo/benches/peers" \
  taskset -c 0 "$repo/target/peer-mlserver/bin/mlserver" start . >"$work/mlserver.log" 2>&1) &
pids+=($!)
PYTHONPATH=benches/peers taskset -c 0 target/peer-kserve/bin/python benches/peers/rankd_kserve.py \
  --model_name adult --model_dir "$work/peer/adult" --http_port 8195 --grpc_port 8196 --workers 1 \
  >"$work/kserve-adult.log" 2>&1 &
pids+=($!)
PYTHONPATH=benches/peers taskset -c 0 target/peer-kserve/bin/python benches/peers/rankd_kserve.py \
  --model_name feed --model_dir "$work/peer/feed" --http_port 8197 --grpc_port 8198 --workers 1 \
  >"$work/kserve-feed.log" 2>&1 &
pids+=($!)
wait_http 127.0.0.1:7593; wait_http 127.0.0.1:8190; wait_http 127.0.0.1:8195; wait_http 127.0.0.1:8197

echo "== scores: every peer equals rankd first"
checks=()
for m in adult feed; do
  mode=random; [ $m = adult ] && mode=adult
  kport=8195; [ $m = feed ] && kport=8197
  for peer in 127.0.0.1:8190 127.0.0.1:$kport; do
    checks+=("$("$py" benches/peers/check_scores.py 127.0.0.1:7593 $peer $m $mode 5)")
  done
done
printf '%s\n' "${checks[@]}"

# server name, protocol, address, first trial rate of the max-rate search
runs=(
  "rankd rpc 127.0.0.1:7590 400" "rankd grpc 127.0.0.1:7592 400" "rankd rest 127.0.0.1:7593 400"
  "MLServer grpc 127.0.0.1:8191 5" "MLServer rest 127.0.0.1:8190 5"
  "KServe grpc KPORT_GRPC 5" "KServe rest KPORT_REST 5"
)
load() { taskset -c 1 $bin/rankd-load --model "$1" --model-file "$work/models/$1/1/model.rkm" \
  --items 200 --connections 8 --json "${@:2}" 2>/dev/null | tail -1; }
{
  echo "| model | server | protocol | max req/s (p99 ≤ 1 s) | items/s | p50 / p99 at 20 req/s (µs) | p50 / p99 at 50% of max (µs) |"
  echo "| --- | --- | --- | ---: | ---: | ---: | ---: |"
} >"$work/table.md"
for m in adult feed; do
  for r in "${runs[@]}"; do
    read -r name proto addr start <<<"$r"
    [ "$addr" = KPORT_GRPC ] && { addr=127.0.0.1:8196; [ $m = feed ] && addr=127.0.0.1:8198; }
    [ "$addr" = KPORT_REST ] && { addr=127.0.0.1:8195; [ $m = feed ] && addr=127.0.0.1:8197; }
    echo "== $m: $name $proto"
    max=$(load $m --protocol "$proto" --addr "$addr" --find-max-rate 1000000 --rate "$start" \
      --trial-duration "$trial" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["max_rate"]))')
    low=$(load $m --protocol "$proto" --addr "$addr" --rate 20 --duration "$fixed")
    hi_rate=$(( max / 2 )); [ "$hi_rate" -lt 1 ] && hi_rate=1
    high=$(load $m --protocol "$proto" --addr "$addr" --rate "$hi_rate" --duration "$fixed")
    q() { python3 -c "import json,sys; j=json.loads(sys.argv[1]); print(f\"{j['p50_us']} / {j['p99_us']}\" + ('' if j['errors']==0 else f\" ({j['errors']} errors)\"))" "$1"; }
    echo "| $m | $name | $proto | $max | $(( max * 200 )) | $(q "$low") | $(q "$high") |" | tee -a "$work/table.md"
  done
done
{
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); $(grep -o -m1 'avx512f' /proc/cpuinfo || echo 'no AVX-512')."
  echo
  printf '%s\n\n' "${checks[@]}"
  cat "$work/table.md"
} >"$out"
echo "written $out"
cat "$out"
