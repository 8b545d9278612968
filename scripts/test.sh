#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest (extra args pass through).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest -q --durations=30 "$@"
