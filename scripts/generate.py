"""Generate images from a prompt: the same as `ldm generate` (see `ldm generate --help`).

python scripts/generate.py "a large red circle in the center on a blue background" --seed 1
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
