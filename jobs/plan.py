"""`ray job submit --working-dir . -- python jobs/plan.py --config configs/paper_vicuna7b_hh.yaml [--strict]`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
