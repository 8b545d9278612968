"""Starting or joining Ray: a private local instance by default, the cluster when RAY_ADDRESS / --address says so.

The private instance admits no one else. Its node address is 127.0.0.1, where Ray 2.60 then binds every server it
starts (GCS, raylet, each worker's gRPC port, dashboard, dashboard and runtime env agents, metrics; else they listen
on all interfaces). Other users of the machine reach loopback too, so it also requires Ray's token authentication,
with a random token per start in an owner-only file. Its session folders (logs, sockets, spilled objects) sit beside
that file in a folder only this user can enter, and no credential passes through a runtime env, which Ray logs."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import ray

from ant_ray.stages.ray_logs import install_worker_log_filter


_START_ATTEMPTS = 3
TRAIN_POLL_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often a Train controller polls its workers
LOOPBACK = "127.0.0.1"
# Ray Tune copies these from the driver's environment into every trial's runtime env, which the runtime env agent
# writes to its log and the GCS keeps (ray/tune/execution/class_cache.py); no setting turns that off.
TUNE_COPIED_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
# Ray's Unix sockets live at <base>/ant_ray-<uid>/ray/session_<date>_<pid>/sockets/plasma_store and must fit in
# 107 characters.
_LONGEST_TEMP_BASE = 20
_AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_private_auth_in_use = False  # whether this process's Ray auth settings are the private instance's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_ray(address: str | None = None, *, num_cpus: int | None = None, env: dict[str, str] | None = None) -> str:
    """Returns a short description of what was started. A private instance (address="local") never joins a Ray
    that happens to run on the machine; `num_cpus` sets its logical CPUs (fractional resources make room for
    concurrent trials on small machines); `env` goes to its workers.

    Joining a cluster (`address`, RAY_ADDRESS, or a `ray job submit` job, whose supervisor sets RAY_ADDRESS) passes
    no runtime env and ignores `env` and `num_cpus`: the cluster's configuration and the job's runtime env
    (working_dir, env_vars, pip) are the user's, and ray.init refuses to merge a second runtime env into a job's when
    both set env_vars ("Failed to merge the Job's runtime env"). Workers need nothing from ours: every task and
    trainer gets its MLflow tracking URI in its arguments (`TrackedRun.handle()`), not from the environment. The
    cluster's authentication settings (RAY_AUTH_MODE, its token) are the user's too."""
    if ray.is_initialized():
        return "already connected"
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _forget_private_instance()
        ray.init(address=address, log_to_driver=True)
        _restore_sigterm_handler(sigterm_handler)
        install_worker_log_filter()
        return f"joined Ray at {address}"
    env_vars = dict(env or {})
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
    # Workers of a private Ray inherit the driver's environment (credentials included) from the raylet: Tune's
    # copy in each trial's runtime env adds nothing but log lines holding the secrets.
    _stop_tune_copying(TUNE_COPIED_CREDENTIALS)
    private_root = private_temp_root()
    token_file = _new_auth_token(private_root)
    for attempt in range(_START_ATTEMPTS):
        # Train V2's placement-group cleaner asks the state API (served by the dashboard) whether its controller is
        # alive. With several Ray instances on one machine it cannot tell which to ask, so pin ours by address.
        port = _free_port()
        api = f"http://{LOOPBACK}:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = api
        env_vars["RAY_API_SERVER_ADDRESS"] = api
        try:
            with _private_instance_settings(token_file):
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK,
                         dashboard_port=port, runtime_env={"env_vars": env_vars}, log_to_driver=True,
                         logging_level="WARNING", _node_ip_address=LOOPBACK, _temp_dir=str(private_root / "ray"))
            break
        except Exception as err:
            # The free port can be taken before the dashboard binds it (by another process, or by one of this
            # Ray's own, which pick ports as they start): stop the half-started instance and try another port.
            # Ray says so in one of two ways, depending on whether it noticed before starting the dashboard.
            taken = any(words in str(err) for words in ("address already in use", "already occupied"))
            if not taken or attempt + 1 == _START_ATTEMPTS:
                token_file.unlink(missing_ok=True)
                raise
            ray.shutdown()
    _restore_sigterm_handler(sigterm_handler)
    install_worker_log_filter()
    _start_watchdog(token_file)
    return (f"started a private local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs, dashboard {api}, "
            f"its login token in {token_file})")


def private_temp_root() -> Path:
    """The folder of the private Ray's files, one per user, that only its user may enter: the token files, and in
    its `ray` subfolder the session folders (logs, sockets, spilled objects). Ray makes the folder it is given and
    everything in it world-writable, and its logs world-readable (its default is /tmp/ray); the private parent keeps
    them to this user. A name that someone else holds, or that is no plain folder, gets a fresh private folder."""
    base = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    if len(str(base)) > _LONGEST_TEMP_BASE:
        base = Path("/tmp")
    root = base / f"ant_ray-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        info = root.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            if stat.S_IMODE(info.st_mode) != 0o700:
                root.chmod(0o700)
            return root
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="ant_ray-", dir=base))  # mkdtemp makes it 0700


def _new_auth_token(folder: Path) -> Path:
    """A random token for one private Ray, in a file only this user can read (mkstemp creates it 0600)."""
    handle, path = tempfile.mkstemp(prefix="auth_token-", dir=folder)
    with os.fdopen(handle, "w") as file:
        file.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
    return Path(path)


@contextmanager
def _private_instance_settings(token_file: Path):
    """While ray.init starts the private instance: token authentication with this token file (the processes Ray
    starts inherit it; this process keeps it in Ray's caches) and a loopback node address. Afterwards the
    environment is as it was, so nothing else this process starts (a `ray job submit`, a joined cluster) sees them."""
    global _private_auth_in_use
    import ray._private.ray_constants as ray_constants

    saved = {name: os.environ.get(name) for name in (*_AUTH_VARIABLES, ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)}
    os.environ.pop("RAY_AUTH_TOKEN", None)  # a cluster's token from the user's environment would win over ours
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    # ray.init turns a loopback node address into the machine's network address unless Ray runs in its one-machine
    # mode (the default on macOS and Windows), which this switch selects. The flag is read when Ray is imported,
    # hence the module attribute for this process; the variable carries it to the processes Ray starts.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    one_machine_before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    _reload_ray_auth_settings()
    _private_auth_in_use = True
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = one_machine_before
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _forget_private_instance() -> None:
    """Before joining a cluster: drop what an earlier private Ray of this process left in Ray's caches (token mode,
    its token), so the cluster's own settings from the environment apply, and let Tune copy credentials again
    (a cluster's workers on other nodes get them no other way)."""
    global _private_auth_in_use
    if _private_auth_in_use:
        _reload_ray_auth_settings()
        _private_auth_in_use = False
    if _tune_credentials_removed:
        _stop_tune_copying(())


def _reload_ray_auth_settings() -> None:
    # Ray reads RAY_AUTH_MODE into its config and the token into a loader once per process; refresh both, in this
    # order (ray/_private/authentication_test_utils.py: the config first, or a loader reload can fail Ray's check).
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


_tune_credentials_removed: set[str] = set()


def _stop_tune_copying(names: tuple[str, ...]) -> None:
    """Tune copies the listed variables into trials' runtime envs: stop it for `names`, resume it for the others."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.update(_tune_credentials_removed - set(names))
    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(names)
    _tune_credentials_removed.clear()
    _tune_credentials_removed.update(names)


def _restore_sigterm_handler(before) -> None:
    """Undo what ray.init does to SIGTERM: it installs a Python handler (sys.exit(15)) and, in C++, a crash
    reporter that prints a stack trace and aborts the process (exit status 134) if it has not exited within 3 s,
    which a search marking its MLflow runs and stopping Ray does not. Registering a Python handler again removes
    the C++ one; the handler is the one the process had (the command line's: exit status 143), else Ray's."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return
    signal.signal(signal.SIGTERM, before if callable(before) else signal.getsignal(signal.SIGTERM))


def _start_watchdog(token_file: Path) -> None:
    """Tie the private Ray's processes to this driver's lifetime and delete its token file once they are gone
    (see ray_watchdog.py); Linux only."""
    if not sys.platform.startswith("linux"):
        return
    node = ray._private.worker._global_node
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos
            if info.process is not None]
    if pids:
        subprocess.Popen([sys.executable, "-m", "ant_ray.stages.ray_watchdog", "--remove", str(token_file),
                          str(os.getpid()), *map(str, pids)],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
