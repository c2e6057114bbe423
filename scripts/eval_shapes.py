"""The default model's accuracy on held-out shapes prompts: the table and plot in docs/.

python scripts/eval_shapes.py [--model PATH] [--n 200] [--out docs/figures]

Runs `ldm.shapes.detector.evaluate` over guidance scales 1, 3, 7.5 (DDIM 50 steps) and samplers
DDIM 10/20/50/100 and DDPM 1000 (guidance 7.5), then writes OUT/eval_shapes.json,
OUT/eval_shapes.md (the table) and OUT/eval_shapes.png (the plot).
"""

import argparse
import json
from pathlib import Path

from ldm.pipeline import LatentDiffusionPipeline
from ldm.shapes.detector import DEFAULT_SETTINGS, evaluate, format_table


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {tuple(name.split(", ")): acc["all"] * 100 for name, acc in results.items()}
    guidance = sorted(
        (float(g.removeprefix("guidance ")), v)
        for (s, g), v in rows.items()
        if s == "ddim 50 steps"
    )
    ddim = sorted(
        (int(s.split()[1]), v)
        for (s, g), v in rows.items()
        if s.startswith("ddim") and g == "guidance 7.5"
    )
    ddpm = [v for (s, g), v in rows.items() if s.startswith("ddpm")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(*zip(*guidance, strict=True), "o-")
    left.set(xlabel="guidance scale (DDIM 50 steps)", ylabel="all-attribute accuracy (%)")
    right.plot(*zip(*ddim, strict=True), "o-", label="DDIM, guidance 7.5")
    if ddpm:
        right.axhline(ddpm[0], color="C1", linestyle="--", label="DDPM 1000 steps")
    right.set(xscale="log", xlabel="sampling steps", ylabel="all-attribute accuracy (%)")
    right.legend()
    for ax in (left, right):
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    fig.suptitle("Held-out attribute combinations, detector-scored")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a pipeline folder (default: the shipped model)")
    parser.add_argument("--n", type=int, default=200, help="images per setting (default: 200)")
    parser.add_argument("--out", default="docs/figures", help="(default: docs/figures)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    results = evaluate(pipe, n=args.n, settings=DEFAULT_SETTINGS, out_dir=out / "eval_shapes")
    (out / "eval_shapes.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "eval_shapes.md").write_text(format_table(results) + "\n")
    plot(results, out / "eval_shapes.png")
    print(format_table(results))


if __name__ == "__main__":
    main()
