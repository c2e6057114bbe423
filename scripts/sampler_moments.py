"""How well DDPM and DDIM sample a Gaussian with the exact model: the table in docs/sampling.md.

Data x0 ~ N(mu, sigma^2) has a closed-form optimal denoiser (ldm.diffusion.analytic), so the error of
the sampled mean and standard deviation is the sampler's own. Prints a Markdown table.

    python scripts/sampler_moments.py [--samples 200000] [--schedule linear]
"""

import argparse

from ldm.diffusion.analytic import gaussian_sampler_errors
from ldm.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule

BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (0.0, 0.0)}
RUNS = [  # (sampler, num_steps, eta, spacing)
    ("ddpm", None, 1.0, "leading"),
    ("ddim", 500, 1.0, "leading"),
    ("ddim", 500, 0.0, "leading"),
    *[
        ("ddim", n, 0.0, spacing)
        for spacing in ("leading", "trailing")
        for n in (5, 10, 20, 50, 100)
    ],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--schedule", choices=BETA_SCHEDULES, default="linear")
    parser.add_argument("--mu", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=0.8)
    args = parser.parse_args()
    beta_start, beta_end = BETAS.get(args.schedule, BETAS["cosine"])
    schedule = NoiseSchedule(args.schedule, 1000, beta_start, beta_end)
    print(f"{schedule}, data N({args.mu}, {args.sigma}^2), {args.samples:,} samples\n")
    print("| sampler | steps | eta | spacing | abs(mean - mu) / sigma | std / sigma - 1 |")
    print("|---|---:|---:|---|---:|---:|")
    for sampler, steps, eta, spacing in RUNS:
        errors = gaussian_sampler_errors(
            schedule,
            args.mu,
            args.sigma,
            sampler=sampler,
            num_steps=steps,
            eta=eta,
            timestep_spacing=spacing,
            num_samples=args.samples,
        )
        shown_steps = steps or schedule.num_train_timesteps
        shown_eta = "-" if sampler == "ddpm" else eta
        print(
            f"| {sampler.upper()} | {shown_steps} | {shown_eta} | {spacing} | {errors.mean:.4f} | {errors.std:+.4f} |"
        )


if __name__ == "__main__":
    main()
