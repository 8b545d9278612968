"""Starting the private local Ray: a dashboard port taken between choosing it and binding it (by another process, or
by one of Ray's own as they start) costs a retry on another port, not the user's run; Ray Train's poll interval is
shortened for the private Ray, in the driver and in every worker. The private Ray admits no one else: every socket its
processes listen on is a loopback one, its API refuses a request without its token, the token sits in an owner-only
file in a folder only the user can enter (with Ray's session folders), and the file goes when Ray stops."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ant_ray.stages.ray_runtime import TRAIN_POLL_INTERVAL

# Run in the child process right after the private Ray started (one Ray start serves every check of this file).
LISTENING_SOCKETS = """
    def listening_addresses(pids):
        # (address, pid) of every listening TCP socket the processes hold: /proc/net/tcp{,6} rows in state 0A
        # (LISTEN), matched to the processes' open sockets by inode.
        listening = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for row in open(table).read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A":
                    listening[fields[9]] = fields[1].rsplit(":", 1)[0]
        found = []
        for pid in pids:
            try:
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:  # gone meanwhile
                continue
            found += [(listening[link[8:-1]], pid) for link in links
                      if link.startswith("socket:[") and link[8:-1] in listening]
        return found

    def is_loopback(hex_address):
        # 127.0.0.0/8 is 7F in the lowest byte of the little-endian IPv4 word; ::1, and ::ffff:127.x.x.x (an IPv6
        # socket bound to the IPv4 loopback) as /proc writes them.
        if len(hex_address) == 8:
            return hex_address.endswith("7F")
        return hex_address == "00000000000000000000000001000000" or (
            hex_address.startswith("0000000000000000FFFF0000") and hex_address.endswith("7F"))
"""


def test_the_private_ray_retries_a_taken_dashboard_port_admits_no_one_else_and_polls_train_workers_often():
    code = textwrap.dedent("""
        import os
        import socket
        import stat
        import subprocess
        import urllib.error
        import urllib.request
        from pathlib import Path

        import ray
        from ant_ray.stages import ray_runtime
        from ant_ray.stages.ray_watchdog import descendants
    """) + textwrap.dedent(LISTENING_SOCKETS) + textwrap.dedent("""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        choices = iter([port])
        real_free_port = ray_runtime._free_port
        ray_runtime._free_port = lambda: next(choices, None) or real_free_port()
        started = ray_runtime.start_ray(None, num_cpus=1)
        assert f":{port}" not in started, started
        assert ray.get(ray.remote(lambda: 42).remote()) == 42
        poll = ray.get(ray.remote(lambda: __import__("os").environ.get(ray_runtime.TRAIN_POLL_INTERVAL)).remote())
        assert (os.environ[ray_runtime.TRAIN_POLL_INTERVAL], poll) == ("0.5", "0.5"), poll

        # Nothing of it listens beyond this machine: the driver, GCS, raylet, agents, and the worker that ran the tasks.
        sockets = listening_addresses(descendants({os.getpid()}))
        assert len(sockets) >= 5, sockets
        assert all(is_loopback(address) for address, _ in sockets), sockets

        # ...and what listens there asks for the token (Ray's token authentication, a random token per start).
        api = os.environ["RAY_API_SERVER_ADDRESS"]
        try:
            urllib.request.urlopen(f"{api}/api/v0/actors", timeout=30)
            raise AssertionError("the private Ray's API answered a request without its token")
        except urllib.error.HTTPError as refused:
            assert refused.code == 401, refused
        token_file = Path(started.rsplit(" in ", 1)[1].rstrip(")"))
        token = token_file.read_text()
        assert len(token) == 64 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        private_root = token_file.parent
        assert session.parent.parent == private_root and private_root.stat().st_uid == os.getuid()
        assert stat.S_IMODE(private_root.stat().st_mode) == 0o700  # Ray's own folders inside are world-writable
        assert not any(token in p.read_text(errors="replace") for p in session.rglob("*.log")), "token in a log"
        # The token's settings are not left in this process's environment for other programs to inherit.
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys()
        print("STARTED", started)
        ray.shutdown()
    """)
    env = {key: value for key, value in os.environ.items() if key != TRAIN_POLL_INTERVAL}  # ours, not the user's
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STARTED started a private local Ray (1 CPUs, dashboard http://127.0.0.1:" in done.stdout
    token_file = Path(done.stdout.rsplit(" in ", 1)[1].strip().rstrip(")"))
    deadline = time.monotonic() + 15  # the watchdog deletes it once Ray's processes are gone (it polls every second)
    while token_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not token_file.exists(), f"{token_file} outlived its Ray"
