"""Accuracy of the default model against training steps: every kept U-Net checkpoint of a
recipe run, scored on held-out prompts (DDIM 50 steps, guidance 7.5).

python scripts/eval_checkpoints.py [--run runs/default] [--n 100] [--every 2] [--out docs/figures]

Writes OUT/accuracy_vs_steps.json and OUT/accuracy_vs_steps.png.
"""

import argparse
import json
from pathlib import Path

from ldm.training.default_model import evaluate_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default", help="(default: runs/default)")
    parser.add_argument("--n", type=int, default=100, help="images per checkpoint (default: 100)")
    parser.add_argument("--every", type=int, default=1, help="every k-th checkpoint (default: 1)")
    parser.add_argument("--out", default="docs/figures", help="(default: docs/figures)")
    args = parser.parse_args()
    results = evaluate_checkpoints(args.run, n=args.n, every=args.every)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy_vs_steps.json").write_text(json.dumps(results, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(results)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for attribute in ("all", "shape", "color", "size", "position", "background"):
        style = "o-" if attribute == "all" else ".--"
        ax.plot(steps, [100 * results[s][attribute] for s in steps], style, label=attribute)
    ax.set(xlabel="U-Net training steps (batch 64)", ylabel="accuracy on held-out prompts (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_steps.png", dpi=100)
    for step in steps:
        print(step, {k: round(v, 3) for k, v in results[step].items()})


if __name__ == "__main__":
    main()
