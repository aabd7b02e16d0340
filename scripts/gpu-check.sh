#!/usr/bin/env bash
# Every GPU test and the GPU benchmark of rankd, with a summary, in under 8 minutes on one GPU.
#
#   scripts/gpu-check.sh --prepare   build here (release) into gpu-check/: the GPU test binaries,
#                                    rankd, rankd-load and gpu_bench, stripped. For a GPU machine
#                                    without cargo or network: copy the tree with gpu-check/.
#   scripts/gpu-check.sh             run: the binaries in gpu-check/ if there, else build first.
#
# Without a GPU every part says so and the script still ends with a summary (exit 0); a failed
# test makes it exit 1.
set -uo pipefail
cd "$(dirname "$0")/.."
out=gpu-check

prepare() {
  set -e
  mkdir -p "$out"
  local json
  json=$(cargo test --release -p rankd-engine --test gpu --test multitask --test cross \
    -p rankd-serving --test gpu -p rankd-trainer --lib --test no_skew --no-run \
    --message-format=json 2>/dev/null)
  # (package, test target) -> gpu-check/<package>-<target>-tests
  for pt in engine:gpu serving:gpu engine:multitask engine:cross trainer:rankd_trainer \
    trainer:no_skew; do
    local exe p=${pt%%:*} t=${pt##*:}
    exe=$(echo "$json" | python3 -c "
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get('reason') == 'compiler-artifact' and m['target']['name'] == '$t' \
       and m['package_id'].find('rankd-$p') >= 0 and m.get('executable'):
        print(m['executable'])")
    cp "$exe" "$out/$p-$t-tests"
  done
  cargo build --release -p rankd-serving -p rankd-loadtest -p rankd-benches \
    --bin rankd --bin rankd-load --bin gpu_bench --bin gpu_train_bench
  cp target/release/rankd target/release/rankd-load target/release/gpu_bench \
    target/release/gpu_train_bench benches/torch_train_gpu.py "$out/"
  # The Adult data for the trainer's GPU tests (they read $RANKD_ADULT_DIR), when it is here.
  if [ -f ../shared/data/adult/train.csv ]; then
    mkdir -p "$out/adult" && cp ../shared/data/adult/train.csv ../shared/data/adult/test.csv "$out/adult/"
  fi
  strip "$out"/* 2>/dev/null || true
  du -sh "$out"
  set +e
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit 0
fi
[ -x "$out/gpu_train_bench" ] && [ -x "$out/trainer-no_skew-tests" ] || prepare

# cuBLAS and NVRTC: the toolkit's, or the ones the image's Python packages carry
# (nvidia-cublas, nvidia-cuda-nvrtc), when they are not on the loader path already.
extra=""
[ -d /usr/local/cuda/lib64 ] && extra=/usr/local/cuda/lib64
if command -v python3 >/dev/null; then
  found=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for d in glob.glob(os.path.join(sp, "nvidia", "**", "lib"), recursive=True):
        if glob.glob(os.path.join(d, "libcublas.so*")) or glob.glob(os.path.join(d, "libnvrtc.so*")):
            dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
  [ -n "$found" ] && extra="${extra:+$extra:}$found"
fi
[ -n "$extra" ] && export LD_LIBRARY_PATH="$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

[ -f "$out/adult/train.csv" ] && export RANKD_ADULT_DIR="$PWD/$out/adult"
start=$(date +%s)
summary=()
failed=0
echo "== GPUs"
if nvidia-smi -L 2>/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
  echo "no nvidia-smi: no GPU here; the GPU tests below skip and say why"
fi

# The GPU test binaries; the multi-task and cross ones run their GPU tests only (emulated and
# CUDA).
# The trainer's: its GPU unit tests (a step and three steps against the CPU trainer, on one GPU
# and on two) and Adult trained on cuda:0 and cuda:0,1 against the CPU run (data: ../shared/data
# or ../../shared/data beside the repository; without it those say so).
for t in engine-gpu serving-gpu "engine-multitask every_head_on" "engine-cross cross_models_on" \
  "trainer-rankd_trainer gpu::" "trainer-no_skew gpu"; do
  set -- $t
  echo "== $1 tests ${2:+(filter: $2)}"
  log=$(mktemp)
  RANKD_BIN="$PWD/$out/rankd" "$out/$1-tests" ${2:-} --test-threads 1 --nocapture 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || failed=1
  summary+=("$1 tests: $(grep -E '^test result' "$log" | tail -1) $(grep -m1 -o 'skipped: .*' "$log")")
done

echo "== GPU benchmark"
log=$(mktemp)
timeout 240 "$out/gpu_bench" 2 2>&1 | tee "$log"
summary+=("$(grep -E 'limit|dense layers|items/request|skipped' "$log" | sed 's/^/bench: /')")

echo "== training benchmark: GPUs against the CPU trainer on every core, same run"
log=$(mktemp)
timeout 150 "$out/gpu_train_bench" 10 2>&1 | tee "$log"
summary+=("$(grep -E 'samples/s|skipped|not started' "$log" | sed 's/^/train bench: /')")
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  timeout 120 python3 "$out/torch_train_gpu.py" 10 2>&1 | tee "$log"
  summary+=("train bench: $(grep -m1 -E 'samples_per_second|skipped' "$log")")
else
  summary+=("train bench: PyTorch peer skipped: no PyTorch with CUDA in this Python")
fi

echo "== daemon on the GPU: 200-item requests, p50/p99 at 50% and 80% of the max rate"
if nvidia-smi -L >/dev/null 2>&1; then
  dir=$(mktemp -d)
  "$out/gpu_bench" --write-feed "$dir"
  "$out/rankd" --device cuda --models "$dir" --listen 127.0.0.1:7490 --admin 127.0.0.1:7491 \
    2>"$dir/rankd.log" &
  pid=$!
  for _ in $(seq 100); do grep -q "serving on" "$dir/rankd.log" && break; sleep 0.1; done
  cat "$dir/rankd.log"
  load=("$out/rankd-load" --addr 127.0.0.1:7490 --model feed --model-file "$dir/feed/1/model.rkm"
    --items 200 --connections 32 --json)
  max=$("${load[@]}" --find-max-rate 10000 --trial-duration 2 --rate 2000 | tail -1 |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["max_rate"])')
  summary+=("daemon: max rate with p99 under 10 ms: $max req/s (200 items)")
  for pct in 50 80; do
    rate=$(python3 -c "print($max * $pct / 100)")
    r=$("${load[@]}" --rate "$rate" --duration 10 | tail -1)
    summary+=("daemon at $pct% ($rate req/s): $r")
  done
  summary+=("daemon metrics: $(curl -s 127.0.0.1:7491/metrics | grep -E '^rankd_gpu_|^rankd_model_backend' | tr '\n' ' ')")
  kill "$pid"; wait "$pid" 2>/dev/null
else
  summary+=("daemon: skipped: no GPU here")
fi

echo
echo "== summary ($(( $(date +%s) - start )) s)"
printf '%s\n' "${summary[@]}"
exit $failed
