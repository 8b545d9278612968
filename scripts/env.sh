#!/usr/bin/env bash
# Creates .venv (once) and installs ant_ray with the pinned versions of constraints/ci.txt.
# Sourced by scripts/demo.sh and scripts/test.sh; re-runs the install only when pyproject or constraints change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ANT_RAY_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.ant_ray-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints/ci.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing ant_ray and its dependencies into $VENV (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints/ci.txt" -e "$ROOT[test]" >&2
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
