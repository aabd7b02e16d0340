#!/usr/bin/env bash
# Regenerates the Rust code of every FlatBuffers schema with the pinned flatc:
#   formats/schema/*.fbs -> formats/src/gen/    client/schema/*.fbs -> client/src/gen/
#   client/schema/rpc.fbs -> clients/python/rankd/rpc_generated.py (one file: flatc's per-table
#   Python modules do not import each other's classes)
#   client/schema/rpc.fbs -> clients/java/src/main/java/rankd/rpc/*.java, with each class's
#   `ValidateVersion()` removed: it calls `Constants.FLATBUFFERS_25_12_19()`, which the newest
#   flatbuffers-java on Maven Central (25.2.10) lacks, and flatc has no flag to leave it out. The
#   runtime's API is unchanged between the two versions for what this code calls.
#   scripts/regen-flatbuffers.sh          rewrite the generated code
#   scripts/regen-flatbuffers.sh --check  fail if the committed code differs from flatc's output
set -euo pipefail
FLATC_VERSION="25.12.19"
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v flatc >/dev/null || [ "$(flatc --version)" != "flatc version $FLATC_VERSION" ]; then
  python3 -m pip install --quiet "flatc==${FLATC_VERSION}rc0" >&2
fi
if [ "$(flatc --version)" != "flatc version $FLATC_VERSION" ]; then
  echo "regen: need flatc $FLATC_VERSION, found: $(flatc --version 2>&1)" >&2
  exit 1
fi
status=0
for crate in formats client; do
  out="$(mktemp -d)"
  for schema in "$root/$crate"/schema/*.fbs; do
    flatc --rust --gen-all -o "$out" "$schema"
  done
  if [ "${1:-}" = "--check" ]; then
    if ! diff -ru "$out" "$root/$crate/src/gen" >&2; then
      echo "regen: $crate/src/gen is stale; run scripts/regen-flatbuffers.sh and commit" >&2
      status=1
    else
      echo "$crate/src/gen matches its schema (flatc $FLATC_VERSION)"
    fi
  else
    rm -rf "$root/$crate/src/gen"
    mkdir -p "$root/$crate/src/gen"
    cp -r "$out"/. "$root/$crate/src/gen/"
    echo "wrote $crate/src/gen"
  fi
  rm -rf "$out"
done
# The Python client's code.
out="$(mktemp -d)"
flatc --python --gen-onefile -o "$out" "$root/client/schema/rpc.fbs"
target="$root/clients/python/rankd/rpc_generated.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$out/rpc_generated.py" "$target" >&2; then
    echo "regen: $target is stale; run scripts/regen-flatbuffers.sh and commit" >&2
    status=1
  else
    echo "clients/python/rankd/rpc_generated.py matches its schema (flatc $FLATC_VERSION)"
  fi
else
  cp "$out/rpc_generated.py" "$target"
  echo "wrote $target"
fi
rm -rf "$out"

# The Java client's code.
out="$(mktemp -d)"
flatc --java --gen-all -o "$out" "$root/client/schema/rpc.fbs"
sed -i '/public static void ValidateVersion() { Constants.FLATBUFFERS_25_12_19(); }/d' "$out"/rankd/rpc/*.java
if grep -l "ValidateVersion\|FLATBUFFERS_25_12_19" "$out"/rankd/rpc/*.java >&2; then
  echo "regen: flatc's Java output changed: the version check was not removed" >&2
  exit 1
fi
target="$root/clients/java/src/main/java/rankd/rpc"
if [ "${1:-}" = "--check" ]; then
  if ! diff -ru "$out/rankd/rpc" "$target" >&2; then
    echo "regen: $target is stale; run scripts/regen-flatbuffers.sh and commit" >&2
    status=1
  else
    echo "clients/java/src/main/java/rankd/rpc matches its schema (flatc $FLATC_VERSION)"
  fi
else
  rm -rf "$target"
  mkdir -p "$target"
  cp "$out"/rankd/rpc/*.java "$target/"
  echo "wrote $target"
fi
rm -rf "$out"
exit $status
