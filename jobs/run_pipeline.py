"""Entry point for `ray job submit`: runs the pipeline from a YAML in search_spaces/ on the cluster it runs in.

    ray job submit --address http://HEAD:8265 --working-dir . --entrypoint-num-cpus 1 \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://MLFLOW:5000"}}' \
        -- python jobs/run_pipeline.py search_spaces/cifar10_ddpm.yaml --set output_dir=/shared/ant_ray_runs

Under `ray job submit` the working directory is a temporary copy: give output_dir an absolute path on shared
storage (and MLFLOW_TRACKING_URI, in the job's env_vars, a real server) so results outlive the job. The job's runtime
env is used as given (ant_ray joins the cluster without one of its own). Any `ant-ray run` flag works here.
"""

import sys
from pathlib import Path

# The uploaded working directory holds the package; Ray puts it on the workers' path, this puts it on ours.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ant_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
