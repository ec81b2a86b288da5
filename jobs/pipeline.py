"""`ray job submit --working-dir . -- python jobs/pipeline.py --config configs/default.yaml [overrides]`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
