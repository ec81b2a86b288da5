"""`ray job submit --working-dir . -- python jobs/convert.py --model lmsys/vicuna-7b-v1.5 --out models/vicuna-7b-v1.5`"""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
