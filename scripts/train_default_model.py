"""Train the shipped default model from scratch: the same as `ldm train-default`.

python scripts/train_default_model.py [--out runs/default] [--seed 0] [--ship]

Run it again to resume: finished stages are skipped, the others continue from checkpoints.
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-default", *sys.argv[1:]]))
