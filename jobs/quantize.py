"""`ray job submit --working-dir . -- python jobs/quantize.py --config configs/quantize.yaml [overrides]`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
