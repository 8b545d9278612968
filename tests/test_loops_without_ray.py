"""The training loops and the GPU check run where Ray, MLflow and Optuna cannot be imported, as on the lent GPU
machine (its image has torch but none of them; benchmarks/gpu_check.sh carries only the wheels of
benchmarks/gpu_wheels.txt). One subprocess, with those imports made to fail, runs an ANT loop (and its resume from
the in-process session's checkpoint), a DeMe loop and every row of `gpu_check --smoke`, and lists what it imported."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The top-level modules the GPU machine's image has (KINDS.md of the device tool), the carried wheels' modules, and
# the standard library's: anything else the check imports would fail there.
ON_THE_IMAGE = {"torch", "torchvision", "numpy", "scipy", "sklearn", "pandas", "matplotlib", "safetensors", "PIL",
                "yaml", "requests", "huggingface_hub", "filelock", "regex", "tqdm", "packaging", "fsspec", "jinja2",
                "markupsafe", "sympy", "mpmath", "networkx", "urllib3", "certifi", "idna", "charset_normalizer",
                "httpx", "httpcore", "anyio", "h11", "sniffio", "dateutil", "pytz", "tzdata", "six", "joblib",
                "threadpoolctl", "kiwisolver", "cycler", "pyparsing", "fontTools", "contourpy", "zipp", "triton",
                "hf_xet", "click", "typer", "shellingham", "rich", "markdown_it", "mdurl", "pygments", "psutil",
                "optree", "functorch", "torchgen", "mpl_toolkits", "pylab", "cuda", "nvidia", "google", "pkg_resources",
                "setuptools", "_distutils_hack", "distutils", "annotated_doc", "jaraco", "more_itertools", "tomli",
                "opt_einsum", "cloudpickle", "narwhals", "pyarrow",
                "cython_runtime"}  # made by Cython's extension modules (scipy, scikit-learn), not a package
# huggingface_hub 2.x here (a dependency of diffusers) brings its own HTTP stack; the image's huggingface_hub 1.x
# uses httpx, which it has.
HUB_2_HERE = {"httpx2", "httpcore2", "truststore"}
CARRIED = {"diffusers", "importlib_metadata", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
           "typing_extensions", "cleanfid"}

SCRIPT = r'''
import importlib.abc, json, sys

class NotOnTheGPUMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "optuna"):
            raise ImportError(f"{name} is not installed on the GPU machine")

sys.meta_path.insert(0, NotOnTheGPUMachine())

if __name__ == "__main__":  # the GPU check's gloo ranks are spawned processes that import this file again
    import tempfile
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from ant_ray.ant.train import train_ant
    from ant_ray.config import load_config
    from ant_ray.deme.finetune import train_diffusion
    from ant_ray.training import LocalSession, run_in_process
    from benchmarks import gpu_check

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(None, ["device=cpu", "ant.k=2", "ant.steps=2", "ant.batch_size=8", "ant.log_every=1",
                                 "ant.checkpoint_every=1", "ant.method=pcgrad", f"output_dir={tmp}"])
        loop = {"pipeline": cfg.worker_dump(), "intervals": [[0, 500], [500, 1000]], "init_model": None,
                "output_dir": str(tmp / "ant"), "tracking": None, "seed": 0, "name": "ant"}
        result, session = run_in_process(train_ant, loop, LocalSession(tmp / "ant-checkpoints"))
        out["ant"] = {"reports": session.reports, "result": result,
                      "checkpoint": session.last_checkpoint.name if session.last_checkpoint else None}
        # A second run of the same session resumes from its last checkpoint: nothing left to train.
        again, _ = run_in_process(train_ant, loop, session)
        out["ant_resumed"] = again
        cfg = load_config(None, ["device=cpu", "finetune.steps=1", "finetune.batch_size=8", "finetune.log_every=1",
                                 f"output_dir={tmp}"])
        spec = {"range": [0, 500], "init_model": None, "teacher_model": None, "output_model": str(tmp / "deme"),
                "tracking": None, "seed": 1}
        _, session = run_in_process(train_diffusion, {"pipeline": cfg.worker_dump(), "section": "finetune",
                                                      "name": "deme", "models": [spec], "evaluation": None})
        out["deme"] = session.reports
        out["deme_saved"] = (tmp / "deme" / "diffusion_pytorch_model.safetensors").is_file()
    out["gpu_check"] = gpu_check.main(["--smoke"])
    out["modules"] = sorted({name.split(".")[0] for name in sys.modules})
    print("RESULT " + json.dumps(out, default=str))
'''


@pytest.fixture(scope="module")
def blocked_run(tmp_path_factory):
    script = tmp_path_factory.mktemp("blocked") / "without_ray.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), done.stdout


def test_the_ant_loop_runs_and_resumes_without_ray_or_mlflow(blocked_run):
    out, _ = blocked_run
    ant = out["ant"]
    assert [r["step"] for r in ant["reports"]] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in ant["reports"])  # finite, positive
    assert ant["checkpoint"] == "checkpoint_000002"  # each report carried a checkpoint; the last is kept
    assert ant["result"]["steps"] == 2 and ant["result"]["start_step"] == 0
    assert out["ant_resumed"]["start_step"] == 2  # continued from the session's checkpoint, not from scratch


def test_the_deme_loop_runs_without_ray_or_mlflow(blocked_run):
    out, _ = blocked_run
    assert [r["step"] for r in out["deme"]] == [1]
    assert out["deme_saved"]


def test_every_row_of_the_gpu_check_runs_without_ray_or_mlflow(blocked_run):
    out, stdout = blocked_run
    rows = out["gpu_check"]
    failed = [row for row in rows if row[0].startswith(("FAILED", "SKIPPED"))]
    assert not failed, failed
    names = [row[0] for row in rows]
    for part in ("sampling", "FID", "ANT step", "DeMe finetune", "merge", "PCGrad combine", "DiT-XL/2",
                 "SD v1.x UNet", "fp32 vs bf16"):
        assert any(name.startswith(part) for name in names), (part, names)
    assert sum(name.startswith("ANT step") for name in names) == 4  # vanilla, UW, PCGrad, Nash-MTL
    assert any(row[1] == "equal" for row in rows if row[0].startswith("PCGrad combine")), rows
    assert "| what (CPU smoke run, toy sizes: not figures) | figure | note | peak memory |" in stdout


def test_nothing_is_imported_that_the_gpu_machine_lacks(blocked_run):
    out, _ = blocked_run
    third_party = {m for m in out["modules"] if m not in sys.stdlib_module_names and not m.startswith("_")
                   and m not in ("ant_ray", "benchmarks", "__main__", "__mp_main__")}
    assert not {"ray", "mlflow", "optuna"} & third_party
    missing = third_party - ON_THE_IMAGE - CARRIED - HUB_2_HERE
    assert not missing, f"imported, but neither on the GPU machine's image nor carried: {sorted(missing)}"


def test_the_carried_wheels_are_the_versions_tested_here():
    """benchmarks/gpu_wheels.txt pins what fetch_gpu_wheels.sh downloads: the versions this suite runs with."""
    lines = [line.split("==") for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {name: pinned for name, pinned in lines} == {name: version(name) for name, _ in lines}


def test_without_a_gpu_the_real_check_says_so_and_does_nothing(capsys):
    from benchmarks import gpu_check

    if gpu_check.torch.cuda.is_available():
        return  # on a GPU machine the real check is benchmarks/gpu_check.sh itself
    assert gpu_check.main([]) == []
    assert "no CUDA GPU found" in capsys.readouterr().out
