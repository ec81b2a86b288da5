"""`ray job submit --working-dir . -- python jobs/judge.py --config configs/evaluate_judge.yaml [overrides]`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["judge", *sys.argv[1:]]))
