"""Starting the private local Ray: a dashboard port taken between choosing it and binding it (by another process, or
by one of Ray's own as they start) costs a retry on another port, not the user's run."""

import subprocess
import sys
import textwrap


def test_a_taken_dashboard_port_is_retried_on_another():
    code = textwrap.dedent("""
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
        print("STARTED", started)
        ray.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STARTED started a private local Ray (1 CPUs, dashboard http://127.0.0.1:" in done.stdout
