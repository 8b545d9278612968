#!/usr/bin/env bash
# The one-call GPU check (see benchmarks/gpu_check.py); arguments pass through (e.g. --out DIR).
#
# On the lent GPU machine (no package registry; torch, torchvision and the rest of its image, but not diffusers or
# pydantic): installs the wheels that benchmarks/fetch_gpu_wheels.sh put in .whl/ into a folder of their own
# (`pip install --no-index --no-deps --target`) and runs on the image's own python3 and torch. Elsewhere (a registry
# is reachable): builds the project's environment as the README's commands do (scripts/env.sh), then runs there.
# Exits cleanly where there is no GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

registry_reachable() {
  # One small look-up through pip's own configured index, bounded in time (no host is named here).
  timeout 25 python3 -m pip download -q --no-deps --no-cache-dir --retries 0 --timeout 5 \
    -d "$(mktemp -d)" six >/dev/null 2>&1
}

WHEELS="${GPU_WHEELS_DIR:-$ROOT/.whl}"
if [ "${GPU_CHECK_WHEELS:-}" = 1 ] || { compgen -G "$WHEELS/*.whl" >/dev/null && ! registry_reachable; }; then
  compgen -G "$WHEELS/*.whl" >/dev/null || {
    echo "gpu_check: no wheels in $WHEELS: run benchmarks/fetch_gpu_wheels.sh on a machine with a registry" >&2
    exit 2
  }
  SITE="${GPU_CHECK_SITE:-/tmp/ant_ray_gpu_site}"
  echo "[gpu_check] no registry: installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE" >&2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  RUN=python3
else
  source "$ROOT/scripts/env.sh"
  RUN=python
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$RUN" -m benchmarks.gpu_check "$@"
