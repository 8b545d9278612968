"""A watchdog tied to the driver's lifetime: when the driver of a private local Ray dies in any way (SIGKILL
included, where no exit hook runs), it stops that Ray's processes and all their descendants, so nothing is left
running (Ray's own agents are otherwise re-parented to PID 1 and live on).

    python -m ant_ray.stages.ray_watchdog [--remove FILE] DRIVER_PID NODE_PID [NODE_PID ...]

It exits on its own once the node processes are gone (a normal `ray.shutdown()`), deleting FILE (the private Ray's
login token, which no process needs any more) either way. Linux only (reads /proc).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")  # a zombie is gone


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks: with the pid, it identifies a process (pids are reused)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(roots: set[int]) -> set[int]:
    """The roots and every process below them, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def stop(pids: set[int], grace_s: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    remove = None
    if argv[0] == "--remove":
        remove, argv = Path(argv[1]), argv[2:]
    driver, roots = int(argv[0]), {int(p) for p in argv[1:]}
    try:
        watch(driver, roots)
    finally:
        if remove is not None:
            remove.unlink(missing_ok=True)
    return 0


def watch(driver: int, roots: set[int]) -> None:
    """Return once the roots are gone; if the driver goes first, stop the roots and everything below them."""
    seen: dict[int, int | None] = {}  # pid -> start time of every process seen below the roots
    while alive(driver):
        if not any(alive(p) for p in roots):
            return  # Ray was shut down normally
        for pid in descendants(roots) - seen.keys():  # workers and agents come and go: remember them all
            seen[pid] = start_time(pid)
        time.sleep(1.0)
    same_process = {pid for pid, started in seen.items() if started is not None and start_time(pid) == started}
    stop(descendants(roots) | same_process)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
