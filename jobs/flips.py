"""`ray job submit --working-dir . -- python jobs/flips.py --config configs/flips.yaml [overrides]`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["flips", *sys.argv[1:]]))
