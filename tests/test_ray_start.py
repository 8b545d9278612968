"""Starting the private local Ray: a dashboard port taken between choosing it and binding it (by another process, or
by one of Ray's own as they start) costs a retry on another port, not the user's run; Ray Train's poll interval is
shortened for the private Ray, in the driver and in every worker."""

import os
import subprocess
import sys
import textwrap

from ant_ray.stages.ray_runtime import TRAIN_POLL_INTERVAL


def test_the_private_ray_retries_a_taken_dashboard_port_and_polls_train_workers_often():
    code = textwrap.dedent("""
        import os
        import socket
        import ray
        from ant_ray.stages import ray_runtime

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
        print("STARTED", started)
        ray.shutdown()
    """)
    env = {key: value for key, value in os.environ.items() if key != TRAIN_POLL_INTERVAL}  # ours, not the user's
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STARTED started a private local Ray (1 CPUs, dashboard http://127.0.0.1:" in done.stdout
