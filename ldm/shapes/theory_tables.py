"""The measured tables of docs/theory.md, in Markdown, from the numbers of
`ldm.shapes.theory.run_theory` (its ``results``, or the ``theory.json`` that
scripts/theory_figures.py writes)."""

from __future__ import annotations


def _method_label(key: str) -> str:
    """The row title in the page of an `ldm.shapes.theory.InversionResult` key: vae,
    inverted_K or noised_seed_S."""
    if key == "vae":
        return "none: VAE round trip"
    method, number = key.rsplit("_", 1)
    if method == "inverted":
        return "DDIM inversion" + (f", `fixed_point_iters={number}`" if number != "0" else "")
    return f"forward noise, seed {number}"


def format_tables(results: dict) -> str:
    """The measured tables of docs/theory.md, ready to paste, from the ``results`` of
    `ldm.shapes.theory.run_theory`: image-to-image by strength, DDIM from inverted against
    forward-noised x_T, and the other numbers the page quotes."""
    uncond, prompted = results["img2img"]["unconditional"], results["img2img"]["prompted"]
    lines = [
        "| strength | PSNR (dB) | attributes kept | all five kept "
        "| attributes kept, with the caption |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, strength in enumerate(uncond["strength"]):
        label = f"{strength:.1f}" + (" (VAE round trip)" if strength == 0 else "")
        lines.append(
            f"| {label} | {uncond['psnr_mean'][i]:.1f} | {uncond['kept_mean'][i]:.2f} "
            f"| {uncond['all_kept'][i]:.2f} | {prompted['kept_mean'][i]:.2f} |"
        )
    lines += [
        "",
        "| x_T, then DDIM | PSNR (dB) | attributes kept | all five kept | latent RMS to x_0 "
        "| std of x_T |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    inversion = results["inversion"]
    for key, row in inversion.items():
        if not isinstance(row, dict):
            continue
        std = "-" if row["x_T_std"] is None else f"{row['x_T_std']:.2f}"
        rms = "0" if key == "vae" else f"{row['latent_rms']['mean']:.3f}"
        lines.append(
            f"| {_method_label(key)} | {row['psnr']['mean']:.1f} | {row['kept_mean']:.2f} "
            f"| {row['all_kept']:.2f} | {rms} | {std} |"
        )
    lines += [
        "",
        f"- model {results['model']}, {results['n']} images, {results['num_steps']} steps",
        "- chance level (strength 1, scored against another input): "
        f"{uncond['kept_chance'][-1]:.2f}",
        f"- latent mean square P: {inversion['latent_power']:.2f}",
    ]
    return "\n".join(lines)
