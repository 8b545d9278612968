#!/usr/bin/env bash
# Run on a development machine (it reaches the package registry): downloads into .whl/ (git-ignored) exactly the
# wheels of benchmarks/gpu_wheels.txt, built for the lent GPU machine (CPython 3.12, manylinux x86_64), so that
# benchmarks/gpu_check.sh runs there without a registry. Fails if they exceed 30 MiB: they travel with the working
# tree, 64 MiB per call in all. PYTHON_VERSION=3.11 fetches for another interpreter (the CI check of this path).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${GPU_WHEELS_DIR:-$ROOT/.whl}"
PY="${PYTHON_VERSION:-3.12}"
LIMIT_MIB=30
rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
grep -v '^\s*#' "$ROOT/benchmarks/gpu_wheels.txt" | grep -v '^\s*$' > "$DEST/requirements.txt"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${platforms[@]}" -d "$DEST" -r "$DEST/requirements.txt"
rm "$DEST/requirements.txt"
count=$(find "$DEST" -type f -name '*.whl' | wc -l)
expected=$(grep -cv '^\s*\(#\|$\)' "$ROOT/benchmarks/gpu_wheels.txt")
if [ "$count" -ne "$expected" ]; then
  echo "fetch_gpu_wheels: got $count wheels, expected $expected (one per line of benchmarks/gpu_wheels.txt)" >&2
  exit 1
fi
size_kib=$(du -sk "$DEST" | cut -f1)
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "fetch_gpu_wheels: the wheels take $((size_kib / 1024)) MiB, over the $LIMIT_MIB MiB they may take" >&2
  exit 1
fi
echo "fetch_gpu_wheels: $count wheels, $((size_kib / 1024)) MiB in $DEST (Python $PY)"
