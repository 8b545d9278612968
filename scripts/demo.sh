#!/usr/bin/env bash
# The main job on the embedded default: installs what it needs, then runs `ant-ray demo` (extra args pass through).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec ant-ray demo "$@"
