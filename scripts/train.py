"""Train or fine-tune a U-Net: the same as `ldm train` (see `ldm train --help`).

python scripts/train.py configs/finetune.yaml --set train.max_steps=200 [--resume latest]
accelerate launch --num_processes 2 scripts/train.py configs/finetune.yaml
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
