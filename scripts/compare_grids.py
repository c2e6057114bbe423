"""Stack the grids of several `ldm eval --out` folders into one figure (docs/own_images.md).

python scripts/compare_grids.py OUT.png EVAL_DIR [EVAL_DIR ...] [--blocks 2]

Each EVAL_DIR/grid.png has rows of dataset images above rows of generated ones. The figure shows,
for each block of eight captions, the dataset images once, then each model's images below them.
"""

import argparse
from pathlib import Path

from PIL import Image

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("evals", nargs="+")
    parser.add_argument("--blocks", type=int, default=2, help="blocks of 8 captions (default: 2)")
    args = parser.parse_args()
    grids = [Image.open(Path(e) / "grid.png") for e in args.evals]
    width, row = grids[0].width, grids[0].width // 8  # eight square images a row
    figure = Image.new("RGB", (width, row * args.blocks * (1 + len(grids))), "white")
    y = 0
    for block in range(args.blocks):
        own = grids[0].crop((0, 2 * block * row, width, (2 * block + 1) * row))
        figure.paste(own, (0, y))
        y += row
        for grid in grids:
            figure.paste(
                grid.crop((0, (2 * block + 1) * row, width, (2 * block + 2) * row)), (0, y)
            )
            y += row
    figure.save(args.out)
    print(args.out)
