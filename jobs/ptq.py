"""`ray job submit --working-dir . -- python jobs/ptq.py --config configs/ptq.yaml --method awq [overrides]`

The node that runs the job needs the llm-compressor environment (scripts/setup_llmcompressor_venv.sh in
the image, or `--ptq.python=/path/to/its/python`)."""

import sys

from qdpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ptq", *sys.argv[1:]]))
