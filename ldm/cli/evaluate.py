"""``ldm eval-shapes`` and ``ldm eval``: score a model on held-out shapes prompts, or on an
image-caption dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli.options import DEFAULT, add_caption_column, add_lora, add_resolution, add_seed
from ldm.config import GENERATION, expand_default_model
from ldm.config.names import SAMPLER_NAMES, SIGMA_SCHEDULES


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    _add_eval_shapes(subparsers)
    _add_eval(subparsers)


def _add_eval_shapes(subparsers: argparse._SubParsersAction) -> None:
    evaluation = subparsers.add_parser(
        "eval-shapes",
        help="score a model on held-out shapes prompts with a rule-based detector",
        description="Generate images for attribute combinations held out of training, read "
        "shape, colour, size, position and background from each with a detector (no learned "
        "model), and print per-attribute and all-attribute accuracy.",
    )
    evaluation.add_argument("--model", help="a pipeline folder (default: the shipped model)")
    evaluation.add_argument("--n", type=int, default=200, help=f"images per setting {DEFAULT}")
    add_seed(evaluation)
    evaluation.add_argument(
        "--sampler", default=GENERATION.sampler, help=f"{', '.join(SAMPLER_NAMES)} {DEFAULT}"
    )
    evaluation.add_argument(
        "--sigmas", choices=SIGMA_SCHEDULES, help="(default: the sampler's own)"
    )
    evaluation.add_argument(
        "--steps", type=int, default=GENERATION.num_inference_steps, help=DEFAULT
    )
    evaluation.add_argument(
        "--guidance-scale", type=float, default=GENERATION.guidance_scale, help=DEFAULT
    )
    evaluation.add_argument(
        "--sweep",
        action="store_true",
        help="all settings: the generation default; guidance 1, 3, 7.5 at DDIM 50; DDIM "
        "10/20/50/100; DDPM 1000",
    )
    evaluation.add_argument(
        "--out", help="also write results.json and an image grid per setting to this folder"
    )
    evaluation.set_defaults(func=eval_shapes_command)


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    on_data = subparsers.add_parser(
        "eval",
        help="score a model on an image-caption dataset: distances to the captions' own images",
        description="Generate one image per caption (the same seed for each) for N captions of "
        "a dataset and compare them with the dataset's images: the RMS distance to the caption's "
        "own image (and the VAE round trip's, its floor), how often it is nearer its own image "
        "than 19 random others, the nearest dataset image (a memorisation check), and the VAE's "
        "PSNR. Nothing is downloaded. Writes results.json and grid.png with --out.",
    )
    on_data.add_argument("model", help="a pipeline folder, or 'default' for the shipped model")
    on_data.add_argument("data", help="the dataset, in any form `ldm train` reads")
    on_data.add_argument("--heldout", help="held-out images for the VAE's PSNR")
    on_data.add_argument("--n", type=int, default=100, help=f"captions to generate {DEFAULT}")
    add_caption_column(on_data)
    add_resolution(on_data)
    on_data.add_argument("--steps", type=int, default=30, help=f"DDIM steps {DEFAULT}")
    on_data.add_argument(
        "--guidance-scale", type=float, default=GENERATION.guidance_scale, help=DEFAULT
    )
    add_seed(on_data)
    on_data.add_argument("--out", help="write results.json and grid.png to this folder")
    on_data.add_argument(
        "--clip",
        help="a CLIP stage's folder (ldm train-clip's OUTPUT_DIR, or a recipe's OUT/clip): rank "
        "each generated image's caption among others with its image and text towers",
    )
    add_lora(on_data)
    on_data.set_defaults(func=eval_command)


def eval_shapes_command(args: argparse.Namespace) -> None:
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.shapes.detector import DEFAULT_SETTINGS, EvalSetting, evaluate, format_table

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    settings = (
        DEFAULT_SETTINGS
        if args.sweep
        else [EvalSetting(args.sampler, args.steps, args.guidance_scale, args.sigmas)]
    )
    results = evaluate(pipe, n=args.n, settings=settings, seed=args.seed, out_dir=args.out)
    print(format_table(results))


def eval_command(args: argparse.Namespace) -> None:
    from ldm.config import DataConfig
    from ldm.data import HUB_NAME
    from ldm.data.metrics import evaluate_on_data, format_results
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.pipeline.request import parse_lora_flag
    from ldm.training.pretrain import load_retrieval

    def data(path: str) -> DataConfig:
        return DataConfig(path, caption_column=args.caption_column, resolution=args.resolution)

    for flag, path in (("DATA", args.data), ("--heldout", args.heldout), ("--clip", args.clip)):
        if path is not None and not Path(path).exists() and not HUB_NAME.match(path):
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")

    pipe = LatentDiffusionPipeline.from_pretrained(expand_default_model(args.model))
    for path, scale in map(parse_lora_flag, args.lora or []):
        pipe.load_lora(path, scale)
    results = evaluate_on_data(
        pipe,
        data(args.data),
        n=args.n,
        heldout=data(args.heldout) if args.heldout else None,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        out_dir=args.out,
        clip=load_retrieval(args.clip) if args.clip else None,
    )
    print(format_results(results))
