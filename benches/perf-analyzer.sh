#!/usr/bin/env bash
# Triton's perf_analyzer against rankd's KServe v2 endpoints: the compatibility proof (it calls
# ServerMetadata, ModelMetadata, ModelConfig and ModelStatistics before loading) and a second
# opinion on the numbers. For each of gRPC and REST: a concurrency sweep and a fixed request rate,
# 200 items per request (the batch dimension), input data from the model's metadata (Adult test
# rows for the Adult model, random values otherwise). CSV results in OUT/.
#
# perf_analyzer comes with the tritonclient 2.41.0 wheel; it needs Debian's libb64-0d (extracted
# here with apt-get download + dpkg -x, no root needed) and the CUDA runtime library from PyPI's
# nvidia-cuda-runtime-cu12 on LD_LIBRARY_PATH, even without a GPU.
#
#   benches/perf-analyzer.sh [MODEL_FILE] [OUT]   (default: the bundled Adult model, target/perf-analyzer)
set -euo pipefail
cd "$(dirname "$0")/.."
model_file=${1:-examples/models/adult/1/model.rkm}
out=${2:-target/perf-analyzer}
mkdir -p "$out"
py=$(scripts/tritonclient-venv.sh)
venv=$(dirname "$(dirname "$py")")
"$py" -c "import nvidia.cuda_runtime" 2>/dev/null || "$venv/bin/pip" install --quiet nvidia-cuda-runtime-cu12
libs=target/perf-analyzer-libs
if [ ! -e "$libs/usr/lib/x86_64-linux-gnu/libb64.so.0d" ]; then
  mkdir -p "$libs"
  (cd "$libs" && apt-get download libb64-0d >/dev/null && dpkg -x libb64-0d_*.deb .)
fi
cudart=$("$py" -c "import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], 'lib'))")
export LD_LIBRARY_PATH="$PWD/$libs/usr/lib/x86_64-linux-gnu:$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
pa="$venv/bin/perf_analyzer"

cargo build --release -p rankd-serving -p rankd-tools --bin rankd --bin rankd-tool 2>&1 | tail -1
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
name=$(target/release/rankd-tool inspect --json "$model_file" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["name"])')
mkdir -p "$work/models/$name/1"
cp "$model_file" "$work/models/$name/1/model.rkm"
taskset -c 0 target/release/rankd --models "$work/models" --threads 1 --listen 127.0.0.1:7690 \
  --admin 127.0.0.1:7691 --grpc 127.0.0.1:7692 --http 127.0.0.1:7693 2>"$work/rankd.log" &
pid=$!
for _ in $(seq 100); do curl -sf 127.0.0.1:7693/v2/health/ready >/dev/null && break; sleep 0.1; done

# Input data from the metadata: one entry per Adult row (perf_analyzer cycles through them).
"$py" - "$work/input.json" "$name" <<'PY'
import json, os, sys, random
import tritonclient.http as th
path, name = sys.argv[1:3]
meta = th.InferenceServerClient("127.0.0.1:7693").get_model_metadata(name)
rows = []
csv = "../shared/data/adult/test.csv"
if name == "adult" and os.path.exists(csv):
    lines = open(csv).read().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, l.split(","))) for l in lines[1:201]]
random.seed(7)
data = []
for k in range(max(len(rows), 50)):
    entry = {}
    for t in meta["inputs"]:
        if t["shape"][-1] == -1:
            continue  # lists: optional, left out
        n, dt = t["name"], t["datatype"]
        if rows:
            v = rows[k][n]
            entry[n] = [float(v)] if dt == "FP64" else [v]
        elif dt == "FP64":
            entry[n] = [random.uniform(0, 100)]
        elif dt == "INT64":
            entry[n] = [random.randrange(10**6)]
        else:
            entry[n] = [f"w{random.randrange(40)}"]
    data.append(entry)
json.dump({"data": data}, open(path, "w"))
PY

common=(-m "$name" -b 200 --input-data "$work/input.json" --measurement-interval 3000)
for proto in grpc http; do
  url=127.0.0.1:7692; [ $proto = http ] && url=127.0.0.1:7693
  echo "== perf_analyzer $proto: concurrency 1, 2, 4, 8"
  taskset -c 1 "$pa" "${common[@]}" -i $proto -u $url --concurrency-range 1:8:2 \
    -f "$out/$name-$proto-concurrency.csv" | grep -E "^Concurrency|Throughput|p99"
  echo "== perf_analyzer $proto: 200 requests/s"
  taskset -c 1 "$pa" "${common[@]}" -i $proto -u $url --request-rate-range 200 \
    -f "$out/$name-$proto-rate.csv" | grep -E "^Request Rate|Throughput|p99"
done
echo "CSV results in $out:"
ls "$out"
