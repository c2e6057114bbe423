"""Quality per model call on the shipped model: held-out all-attribute accuracy of every sampler.

python scripts/eval_samplers.py [--n 200] [--out docs/figures]

For each sampler (and schedule) and each budget of 5, 8, 10, 15, 20, 30 and 50 model calls
(Heun makes 2N - 1 calls for N steps, so it gets the N whose calls fit), runs
`ldm.shapes.detector.evaluate` at guidance 7.5 with the same held-out prompts and seeds, and
writes OUT/eval_samplers.json, OUT/eval_samplers.md and OUT/eval_samplers.png.
"""

import argparse
import json
from pathlib import Path

from ldm.diffusion.registry import model_calls
from ldm.pipeline import LatentDiffusionPipeline
from ldm.shapes.detector import EvalSetting, evaluate

CALLS = (5, 8, 10, 15, 20, 30, 50)
SAMPLERS = (
    ("ddim", None),
    ("euler", "default"),
    ("euler", "karras"),
    ("euler_a", "default"),
    ("heun", "karras"),
    ("dpmpp_2m", "default"),
    ("dpmpp_2m", "karras"),
    ("dpmpp_2m_sde", "karras"),
    ("unipc", "default"),
    ("unipc", "karras"),
)


def steps_for(sampler: str, calls: int) -> int:
    return (calls + 1) // 2 if sampler == "heun" else calls


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        points = [(r["calls"], 100 * r["all"]) for r in rows if r["label"] == label]
        ax.plot(*zip(*points, strict=True), "o-", label=label, markersize=3)
    ax.set(xscale="log", xlabel="model calls", ylabel="all-attribute accuracy (%)")
    ax.set_xticks(CALLS, [str(c) for c in CALLS])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Held-out shapes, guidance 7.5, n = 200 per point")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a pipeline folder (default: the shipped model)")
    parser.add_argument("--n", type=int, default=200, help="images per setting (default: 200)")
    parser.add_argument("--out", default="docs/figures", help="(default: docs/figures)")
    parser.add_argument(
        "--only", nargs="*", help="labels to run, e.g. ddim 'dpmpp_2m karras' (default: all)"
    )
    parser.add_argument("--append", action="store_true", help="add to OUT/eval_samplers.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    json_path = out / "eval_samplers.json"
    rows = json.loads(json_path.read_text()) if args.append and json_path.exists() else []
    for sampler, sigmas in SAMPLERS:
        if args.only and (sampler if sigmas is None else f"{sampler} {sigmas}") not in args.only:
            continue
        for calls in CALLS:
            setting = EvalSetting(sampler, steps_for(sampler, calls), 7.5, sigmas)
            accuracy = evaluate(pipe, n=args.n, settings=[setting])[setting.name]
            label = sampler if sigmas is None else f"{sampler} {sigmas}"
            row = {"label": label, "steps": setting.num_steps}
            row |= {"calls": model_calls(sampler, setting.num_steps), **accuracy}
            rows.append(row)
            print(json.dumps(row), flush=True)
            json_path.write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| sampler | " + " | ".join(f"{c} calls" for c in CALLS) + " |"]
    lines.append("|---|" + "---:|" * len(CALLS))
    for label in dict.fromkeys(r["label"] for r in rows):
        cells = [f"{100 * r['all']:.1f}" for r in rows if r["label"] == label]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (out / "eval_samplers.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "eval_samplers.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
