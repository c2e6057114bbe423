"""An image-caption dataset from an installed icon theme (docs/own_images.md).

apt-get install oxygen-icon-theme
python scripts/make_icons.py [--theme /usr/share/icons/oxygen] [--size 64] [--out data/icons]

Writes OUT/train and OUT/heldout (PNG icons with metadata.jsonl; captions from the file names,
"media-playback-start.png" -> "media playback start"), which `ldm train` reads.
"""

import argparse

from ldm.data.icon_theme import DEFAULT_CONTEXTS, make_icon_dataset

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--theme", default="/usr/share/icons/oxygen")
    parser.add_argument("--size", type=int, default=64, help="icon size in px (default: 64)")
    parser.add_argument("--out", default="data/icons")
    parser.add_argument("--contexts", nargs="+", default=list(DEFAULT_CONTEXTS))
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = make_icon_dataset(
        args.theme,
        args.out,
        size=args.size,
        contexts=tuple(args.contexts),
        heldout_fraction=args.heldout_fraction,
        seed=args.seed,
    )
    print(f"{args.out}: {counts['train']} training and {counts['heldout']} held-out icons")
