"""`ray job submit --working-dir . -- python jobs/breakdown.py --model smollm2-135m --bits 4 --out runs/breakdown [overrides]`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["breakdown", *sys.argv[1:]]))
