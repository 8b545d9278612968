"""How to name one of this installation's commands (ant-ray, mlflow) in a hint the user copies: the bare name when
the shell finds this very installation's command, else its path, e.g. `.venv/bin/ant-ray` after `scripts/demo.sh`,
which runs the virtualenv's command without activating it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def command(name: str) -> str:
    ours = Path(sys.executable).parent / name
    if not ours.is_file():
        return name  # not installed beside this Python (a source checkout): the bare name is the best guess
    found = shutil.which(name)
    if found and Path(found).resolve() == ours.resolve():
        return name
    try:
        return str(ours.relative_to(Path.cwd()))
    except ValueError:
        return str(ours)
