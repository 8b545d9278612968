"""Starting or joining Ray: a private local instance by default, the cluster when RAY_ADDRESS / --address says so."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import ray

from ant_ray.stages.ray_logs import install_worker_log_filter


_START_ATTEMPTS = 3
TRAIN_POLL_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often a Train controller polls its workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(address: str | None = None, *, num_cpus: int | None = None, env: dict[str, str] | None = None) -> str:
    """Returns a short description of what was started. A private instance (address="local") never joins a Ray
    that happens to run on the machine; `num_cpus` sets its logical CPUs (fractional resources make room for
    concurrent trials on small machines); `env` goes to its workers.

    Joining a cluster (`address`, RAY_ADDRESS, or a `ray job submit` job, whose supervisor sets RAY_ADDRESS) passes
    no runtime env and ignores `env` and `num_cpus`: the cluster's configuration and the job's runtime env
    (working_dir, env_vars, pip) are the user's, and ray.init refuses to merge a second runtime env into a job's when
    both set env_vars ("Failed to merge the Job's runtime env"). Workers need nothing from ours: every task and
    trainer gets its MLflow tracking URI in its arguments (`TrackedRun.handle()`), not from the environment."""
    if ray.is_initialized():
        return "already connected"
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        _restore_sigterm_handler(sigterm_handler)
        install_worker_log_filter()
        return f"joined Ray at {address}"
    env_vars = dict(env or {})
    # Local clusters enable token auth from Ray 2.59; a private throwaway instance does not need it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Train V2 starts a PreemptionWatcher actor (one more process importing Ray Train) per run to follow node
    # draining on autoscaled clusters; a private one-machine Ray is never drained. A joined cluster keeps it.
    env_vars.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                                                                           "0"))
    # A Train controller learns that its workers finished at its next poll, every 2 s by default: 3-4 s of every
    # run's wall time went there (about 1 s with polls every 0.5 s; benchmarks/README.md). The driver's value
    # reaches the controller (Ray Train propagates it), and a trial's process gets it from the job's env vars.
    env_vars.setdefault(TRAIN_POLL_INTERVAL, os.environ.get(TRAIN_POLL_INTERVAL, "0.5"))
    os.environ.setdefault(TRAIN_POLL_INTERVAL, env_vars[TRAIN_POLL_INTERVAL])
    # The raylet warns on the terminal once more worker processes run than 4x the number it may start at once
    # (the machine's cores by default). Each concurrent trial runs about seven (the trial, the Train controller and
    # its helper actors, the Train workers), so allow 4 per logical CPU this Ray was given.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(4 * (num_cpus or os.cpu_count() or 1)))
    for attempt in range(_START_ATTEMPTS):
        # Train V2's placement-group cleaner asks the state API (served by the dashboard) whether its controller is
        # alive. With several Ray instances on one machine it cannot tell which to ask, so pin ours by address.
        port = _free_port()
        api = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = api
        env_vars["RAY_API_SERVER_ADDRESS"] = api
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, runtime_env={"env_vars": env_vars}, log_to_driver=True,
                     logging_level="WARNING")
            break
        except Exception as err:
            # The free port can be taken before the dashboard binds it (by another process, or by one of this
            # Ray's own, which pick ports as they start): stop the half-started instance and try another port.
            # Ray says so in one of two ways, depending on whether it noticed before starting the dashboard.
            taken = any(words in str(err) for words in ("address already in use", "already occupied"))
            if not taken or attempt + 1 == _START_ATTEMPTS:
                raise
            ray.shutdown()
    _restore_sigterm_handler(sigterm_handler)
    install_worker_log_filter()
    _start_watchdog()
    return f"started a private local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs, dashboard {api})"


def _restore_sigterm_handler(before) -> None:
    """Undo what ray.init does to SIGTERM: it installs a Python handler (sys.exit(15)) and, in C++, a crash
    reporter that prints a stack trace and aborts the process (exit status 134) if it has not exited within 3 s,
    which a search marking its MLflow runs and stopping Ray does not. Registering a Python handler again removes
    the C++ one; the handler is the one the process had (the command line's: exit status 143), else Ray's."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return
    signal.signal(signal.SIGTERM, before if callable(before) else signal.getsignal(signal.SIGTERM))


def _start_watchdog() -> None:
    """Tie the private Ray's processes to this driver's lifetime (see ray_watchdog.py); Linux only."""
    if not sys.platform.startswith("linux"):
        return
    node = ray._private.worker._global_node
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos
            if info.process is not None]
    if pids:
        subprocess.Popen([sys.executable, "-m", "ant_ray.stages.ray_watchdog", str(os.getpid()), *map(str, pids)],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
