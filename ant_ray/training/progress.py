"""One line of training progress for the terminal: a bar, the step, the loss, the throughput and the time left."""

from __future__ import annotations


def progress_line(name: str, step: int, total: int, loss: float, images_per_s: float, seconds_left: float,
                  width: int = 20) -> str:
    filled = round(width * step / max(total, 1))
    left = int(max(seconds_left, 0))
    eta = f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}" if left >= 3600 else f"{left // 60}:{left % 60:02d}"
    return (f"[{name}] {'█' * filled}{'░' * (width - filled)} {step}/{total} loss {loss:.4f} | "
            f"{images_per_s:.0f} img/s | ETA {eta}")
