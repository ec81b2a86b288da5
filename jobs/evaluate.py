"""`ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml [overrides]`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
