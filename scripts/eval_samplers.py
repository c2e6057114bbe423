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
    ("heun", "default"),
    ("heun", "karras"),
    ("dpmpp_2m", "default"),
    ("dpmpp_2m", "karras"),
    ("dpmpp_2m", "exponential"),
    ("dpmpp_2m_sde", "default"),
    ("dpmpp_2m_sde", "karras"),
    ("unipc", "default"),
    ("unipc", "karras"),
)


GUIDANCE = 7.5  # the table's guidance scale, whatever the generation default is


def label_of(sampler: str, sigmas: str | None) -> str:
    return sampler if sigmas is None else f"{sampler} {sigmas}"


ORDER = [label_of(*s) for s in SAMPLERS]


def steps_for(sampler: str, calls: int) -> int:
    return (calls + 1) // 2 if sampler == "heun" else calls


def table(rows: list[dict]) -> str:
    """A markdown table of all-attribute accuracy (%), one column per budget that was run
    (Heun's 2N - 1 calls fall in the column of the budget they fit)."""
    budget = {(r["label"], min(c for c in CALLS if c >= r["calls"])): r["all"] for r in rows}
    columns = sorted({c for _, c in budget})
    lines = ["| sampler | " + " | ".join(f"{c} calls" for c in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for label in sorted({r["label"] for r in rows}, key=ORDER.index):
        cells = [f"{100 * budget[label, c]:.1f}" if (label, c) in budget else "" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    samplers = list(dict.fromkeys(sampler for sampler, _ in SAMPLERS))
    styles = {None: "-", "default": "-", "karras": "--", "exponential": ":"}
    for label in sorted({r["label"] for r in rows}, key=ORDER.index):
        sampler, sigmas = SAMPLERS[ORDER.index(label)]
        points = [(r["calls"], 100 * r["all"]) for r in rows if r["label"] == label]
        color = "black" if sampler == "ddim" else f"C{samplers.index(sampler)}"
        ax.plot(
            *zip(*points, strict=True),
            marker="o",
            linestyle=styles[sigmas],
            color=color,
            label=label,
            markersize=3,
        )
    ax.set(xscale="log", xlabel="model calls", ylabel="all-attribute accuracy (%)")
    ax.minorticks_off()
    ax.set_xticks(CALLS, [str(c) for c in CALLS])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Held-out shapes, guidance {GUIDANCE:g}, n = 200 per point")
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
    parser.add_argument(
        "--calls", nargs="*", type=int, default=CALLS, help="model-call budgets (default: all)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the held-out prompts' and images' seed (default: 0)"
    )
    parser.add_argument("--append", action="store_true", help="add to OUT/eval_samplers.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    json_path = out / "eval_samplers.json"
    rows = json.loads(json_path.read_text()) if args.append and json_path.exists() else []
    for sampler, sigmas in SAMPLERS:
        label = label_of(sampler, sigmas)
        if args.only and label not in args.only:
            continue
        for calls in args.calls:
            setting = EvalSetting(sampler, steps_for(sampler, calls), GUIDANCE, sigmas)
            accuracy = evaluate(pipe, n=args.n, settings=[setting], seed=args.seed)[setting.name]
            row = {"label": label, "steps": setting.num_steps, "seed": args.seed}
            row |= {"calls": model_calls(sampler, setting.num_steps), **accuracy}
            rows.append(row)
            print(json.dumps(row), flush=True)
            json_path.write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows)
    (out / "eval_samplers.md").write_text(text)
    plot(rows, out / "eval_samplers.png")
    print(text, end="")


if __name__ == "__main__":
    main()
