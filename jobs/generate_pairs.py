"""`ray job submit --working-dir . -- python jobs/generate_pairs.py --config configs/pairs.yaml [overrides]`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate-pairs", *sys.argv[1:]]))
