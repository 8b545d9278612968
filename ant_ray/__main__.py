import sys

from ant_ray.cli import main

sys.exit(main())
