#!/usr/bin/env bash
# The one-call GPU check (see benchmarks/gpu_check.py): builds the project's environment if it is missing (the same
# install as `bash scripts/test.sh --collect-only`), then prints one table. Under 10 minutes on one GPU; exits
# cleanly where there is no GPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$ROOT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python -m benchmarks.gpu_check "$@"
