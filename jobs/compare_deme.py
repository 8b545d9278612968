"""Entry point for `ray job submit`: DeMe's comparison table (see `ant-ray compare-deme --help`).

    ray job submit --address http://HEAD:8265 --working-dir . --entrypoint-num-cpus 1 \
        -- python jobs/compare_deme.py search_spaces/deme_compare_digits.yaml \
        --set output_dir=/shared/ant_ray_runs --report /shared/deme_comparison.md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ant_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare-deme", *sys.argv[1:]]))
