"""The figures and numbers of docs/theory.md: noise schedules, image-to-image against strength,
DDIM inversion against forward noising.

python scripts/theory_figures.py [--model PATH] [--out docs/figures] [--n 64] [--steps 50]

Runs `ldm.shapes.theory.run_theory`: image-to-image at strengths 0, 0.1, ..., 1 (empty prompt at
guidance 1, and the captions at guidance 7.5) and DDIM inversion against forward noising, on N
ground-truth shapes renders. Writes OUT/theory_schedules.png, OUT/theory_img2img.png,
OUT/theory_img2img_prompted.png, OUT/theory_img2img_curves.png, OUT/theory_inversion.png,
OUT/theory.json (the numbers docs/theory.md quotes) and OUT/theory_tables.md (its tables).
"""

import argparse
import json
from pathlib import Path

from ldm.diffusion.schedule import NoiseSchedule
from ldm.images import make_grid
from ldm.pipeline import LatentDiffusionPipeline
from ldm.shapes.theory import SCHEDULES, STRENGTHS, format_tables, run_theory
from ldm.shapes.world import render

COLUMN_TITLES = {  # InversionResult keys for the default fixed_point_iters and noise_seeds
    "vae": "VAE",
    "inverted_0": "inverted",
    "inverted_2": "inverted k=2",
    "noised_seed_0": "noised s=0",
    "noised_seed_1": "noised s=1",
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, axes, path: Path) -> None:
    """Grid lines and legends on ``axes``, then the figure to ``path``."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def plot_schedules(starts: list[tuple[float, int | None, float]], steps: int, path: Path) -> None:
    """sqrt(alpha_bar_t) and SNR(t) of each schedule; dots at the (strength, t, SNR) starts."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, kwargs in SCHEDULES.items():
        ab = NoiseSchedule(**kwargs).alphas_cumprod64
        left.plot(ab.sqrt(), label=name)
        right.semilogy(ab / (1 - ab), label=name)
    starts = [(s, t, snr) for s, t, snr in starts if t is not None]
    right.plot([t for _, t, _ in starts], [snr for *_, snr in starts], "k.")
    for s, t, snr in starts:
        right.annotate(f"{s:g}", (t, snr), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set(xlabel="timestep t", ylabel="signal left, sqrt(alpha_bar_t)")
    right.set(xlabel="timestep t", ylabel="SNR(t)", ylim=(1e-6, 1e5))
    right.set_title(f"dots: where image-to-image starts, by strength ({steps} steps)", fontsize=9)
    save_plot(fig, (left, right), path)


def labelled_grid(columns: dict[str, list], path: Path, title: str) -> None:
    """Images in rows, one column per key of ``columns`` (its label on top)."""
    plt = pyplot()
    rows = len(next(iter(columns.values())))
    grid = make_grid([col[r] for r in range(rows) for col in columns.values()], len(columns))
    size = grid.width / len(columns)
    fig, ax = plt.subplots(figsize=(1 + 0.85 * len(columns), 0.8 + 0.85 * rows))
    ax.imshow(grid)
    ax.set_xticks([size * (i + 0.5) for i in range(len(columns))], list(columns), fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(uncond: dict, prompted: dict, vae_psnr: float, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    s = uncond["strength"]
    left.plot(s, uncond["psnr_mean"], "o-", label="empty prompt, guidance 1")
    left.plot(s, prompted["psnr_mean"], "s--", label="caption, guidance 7.5")
    left.axhline(vae_psnr, color="gray", linestyle=":", label="VAE round trip")
    left.set(xlabel="strength", ylabel="PSNR to the input (dB)")
    right.plot(s, uncond["kept_mean"], "o-", label="attributes kept (empty prompt)")
    right.plot(s, uncond["all_kept"], "^-", label="all five kept (empty prompt)")
    right.plot(s, prompted["kept_mean"], "s--", label="attributes kept (caption)")
    right.plot(s, uncond["kept_chance"], "k:", label="chance (another image's)")
    right.set(xlabel="strength", ylabel="share (detector)", ylim=(0, 1.02))
    save_plot(fig, (left, right), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a pipeline folder (default: the shipped model)")
    parser.add_argument("--out", default="docs/figures", help="(default: docs/figures)")
    parser.add_argument("--n", type=int, default=64, help="images measured (default: 64)")
    parser.add_argument("--rows", type=int, default=4, help="images shown (default: 4)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    run = run_theory(pipe, n=args.n, num_steps=args.steps, seed=args.seed)
    results, uncond, inversion = run.results, run.unconditional, run.inversion
    inputs = [render(spec) for spec in run.specs[: args.rows]]
    (out / "theory.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    plot_schedules(
        list(zip(STRENGTHS, uncond.start_timesteps, uncond.snr, strict=True)),
        args.steps,
        out / "theory_schedules.png",
    )
    for sweep, name, what in (
        (uncond, "", "empty prompt, guidance 1"),
        (run.prompted, "_prompted", "caption, guidance 7.5"),
    ):
        columns = {"input": inputs}
        for strength, images in zip(STRENGTHS, sweep.images, strict=True):
            columns[f"{strength:g}"] = images[: args.rows]
        labelled_grid(columns, out / f"theory_img2img{name}.png", f"image-to-image, {what}")
    plot_curves(
        results["img2img"]["unconditional"],
        results["img2img"]["prompted"],
        float(inversion.psnr["vae"].mean()),
        out / "theory_img2img_curves.png",
    )
    columns = {"input": inputs}
    for key, images in inversion.images.items():
        columns[COLUMN_TITLES.get(key, key)] = images[: args.rows]
    labelled_grid(columns, out / "theory_inversion.png", "DDIM from inverted vs noised x_T")
    tables = format_tables(results)
    (out / "theory_tables.md").write_text(tables + "\n")
    print(tables)


if __name__ == "__main__":
    main()
