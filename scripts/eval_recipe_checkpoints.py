"""Figures against training steps for an `ldm train-recipe` run: each kept U-Net checkpoint (its
EMA weights, as exported) scored by `ldm.data.metrics.evaluate_on_data` on training captions.

python scripts/eval_recipe_checkpoints.py RUN [--n 100] [--every 1]

Prints one line per checkpoint and writes RUN/eval/by_step.json.
"""

import argparse
import json
from pathlib import Path

from ldm.config import DataConfig
from ldm.data.metrics import evaluate_on_data
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training.checkpoint import checkpoints
from ldm.training.default_model import load_checkpoint_ema
from ldm.training.pretrain import load_retrieval

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--every", type=int, default=1, help="every k-th checkpoint (default: 1)")
    args = parser.parse_args()
    pipe = LatentDiffusionPipeline.from_pretrained(args.run / "unet" / "model")
    clip = load_retrieval(args.run / "clip")
    data = DataConfig(str(args.run / "data" / "train"))
    found = checkpoints(args.run / "unet" / "checkpoints")[::-1][:: args.every][::-1]
    by_step = {}
    for folder in found:
        load_checkpoint_ema(pipe, folder)
        r = evaluate_on_data(pipe, data, n=args.n, clip=clip)
        step = int(folder.name.removeprefix("checkpoint-"))
        keys = ("own_rms", "nearer_than_distractors", "nearest_is_own", "caption_top1")
        by_step[step] = {k: r[k] for k in keys}
        print(step, {k: round(v, 3) for k, v in by_step[step].items()}, flush=True)
    (args.run / "eval" / "by_step.json").write_text(json.dumps(by_step, indent=2) + "\n")
