"""What a worker shows on the terminal: one line of training progress (a bar, the step, the loss, the throughput
and the time left), written so that the driver shows it once."""

from __future__ import annotations

import sys


def progress_line(name: str, step: int, total: int, loss: float, images_per_s: float, seconds_left: float,
                  width: int = 20) -> str:
    filled = round(width * step / max(total, 1))
    left = int(max(seconds_left, 0))
    eta = f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}" if left >= 3600 else f"{left // 60}:{left % 60:02d}"
    return (f"[{name}] {'█' * filled}{'░' * (width - filled)} {step}/{total} loss {loss:.4f} | "
            f"{images_per_s:.0f} img/s | ETA {eta}")


def show_progress(line: str) -> None:
    """Print one progress line from any process (driver, Tune trial, Ray Train worker). Written to stdout
    directly: inside a Ray Train worker `print` is patched to also log the line, which Ray then forwards a
    second time."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
