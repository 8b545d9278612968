"""start_ray's choice between joining a cluster and starting a private Ray, without starting either."""

import ray

from ant_ray.stages.ray_runtime import start_ray
from ant_ray.tracking import tracking_env


def _record_init(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


def test_inside_a_job_it_joins_without_a_runtime_env_of_its_own(monkeypatch):
    # A `ray job submit` entrypoint gets RAY_ADDRESS from the job supervisor, and the job's runtime env through Ray;
    # ray.init(runtime_env=...) with env_vars of its own would fail to merge with the job's.
    calls = _record_init(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert start_ray(None, num_cpus=4, env=tracking_env("sqlite:////tmp/x.db")) == "joined Ray at 10.0.0.1:6379"
    assert len(calls) == 1 and calls[0]["address"] == "10.0.0.1:6379"
    assert "runtime_env" not in calls[0] and "num_cpus" not in calls[0]


def test_an_explicit_address_wins_over_ray_address(monkeypatch):
    calls = _record_init(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    start_ray("10.0.0.2:6379", env=tracking_env("sqlite:////tmp/x.db"))
    assert calls[0]["address"] == "10.0.0.2:6379" and "runtime_env" not in calls[0]


def test_the_private_instance_gets_the_env_and_a_pinned_api_server(monkeypatch):
    calls = _record_init(monkeypatch)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # start_ray writes these two into os.environ: set them here so that monkeypatch puts them back afterwards
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    start_ray(None, num_cpus=4, env={"MLFLOW_TRACKING_URI": "sqlite:////tmp/x.db"})
    (call,) = calls
    assert call["address"] == "local" and call["num_cpus"] == 4
    env_vars = call["runtime_env"]["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/x.db"
    assert env_vars["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{call['dashboard_port']}"
