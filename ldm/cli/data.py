"""``ldm check-data`` and ``ldm make-shapes``: check a dataset before training, write the
procedural shapes dataset."""

from __future__ import annotations

import argparse

from ldm.cli.options import DEFAULT, add_caption_column, add_resolution, add_seed
from ldm.config import TrainConfig, expand_default_model


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    _add_check_data(subparsers)
    _add_make_shapes(subparsers)


def _add_check_data(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check-data",
        help="check an image-caption dataset before training: bad files, sizes, long captions, "
        "model fit",
        description="Scan an image-caption dataset as training would read it: a folder with "
        "metadata.jsonl/metadata.csv (file_name + caption), images with same-name .txt captions, "
        "a JSONL/CSV manifest, or a datasets save_to_disk folder. Prints which files would be "
        "skipped (and why), which are converted, the image-size histogram, how many captions "
        "exceed the text encoder's token limit, and how well the model's frozen VAE and "
        "tokenizer fit the data (PSNR of VAE reconstructions, caption words the tokenizer "
        "splits), with a warning and what to do when they fit poorly.",
    )
    check.add_argument(
        "path", help="a training config (.yaml), or the dataset folder or manifest file"
    )
    add_caption_column(check)
    add_resolution(check, "training resolution")
    check.add_argument(
        "--max-tokens",
        type=int,
        help="the text encoder's token limit (default: the model tokenizer's, CLIP's with "
        "--model none)",
    )
    check.add_argument(
        "--model",
        help="measure how this model's VAE and tokenizer fit the data: a pipeline folder, "
        "'default' (the shipped model) or 'none' to skip (default: a training config's model, "
        "else 'default')",
    )
    check.add_argument(
        "--vae-sample",
        type=int,
        default=64,
        metavar="N",
        help=f"images (seeded sample) passed through the VAE to measure its PSNR {DEFAULT}",
    )
    check.add_argument(
        "--report", help="also write the report to this .json file (and a .txt beside it)"
    )
    check.set_defaults(func=check_data_command)


def _add_make_shapes(subparsers: argparse._SubParsersAction) -> None:
    shapes = subparsers.add_parser(
        "make-shapes",
        help="write the procedural shapes dataset (images + metadata.jsonl)",
        description="Render N 64x64 shapes images with captions into an image folder with "
        "metadata.jsonl (file_name, text and the attributes). The same seed gives the same "
        "files. --split heldout draws only the attribute combinations held out of training.",
    )
    shapes.add_argument("--n", type=int, required=True, help="how many images")
    shapes.add_argument("--out", required=True, help="a new or empty folder")
    add_seed(shapes)
    shapes.add_argument("--split", choices=("train", "heldout"), default="train", help=DEFAULT)
    shapes.set_defaults(func=make_shapes_command)


def check_data_command(args: argparse.Namespace) -> None:
    from ldm.data import DataConfig, scan
    from ldm.encoders.text import build_clip_tokenizer, count_tokens

    config = None
    if args.path.endswith((".yaml", ".yml")):  # a training config: check its data section
        config = TrainConfig.from_yaml(args.path)
        data = config.data
    else:
        data = DataConfig(args.path, caption_column=args.caption_column, resolution=args.resolution)
    report = scan(data)
    print(report.to_text())
    captions = [sample.caption for sample in report.samples]
    extra, extra_text, tokenizer = {}, "", None
    folders = _fit_folders(args.model, config)
    if folders is not None and report.samples:
        import torch

        from ldm.data.model_fit import measure_fit
        from ldm.encoders.text import load_tokenizer
        from ldm.encoders.vae import FrozenVAE

        vae = FrozenVAE.from_pretrained(folders[0])
        vae.to("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = load_tokenizer(folders[1])
        name = folders[0] if folders[0] == folders[1] else f"{folders[0]} + {folders[1]}"
        fit = measure_fit(
            vae, tokenizer, data, report.samples, model=name, vae_sample=args.vae_sample
        )
        extra_text = fit.to_text()
        extra["model_fit"] = fit.to_dict()
    if tokenizer is None:  # no model: CLIP's own vocabulary and limit
        tokenizer = build_clip_tokenizer()
    max_tokens = args.max_tokens or tokenizer.model_max_length
    too_long = sum(n > max_tokens for n in count_tokens(tokenizer, captions))
    extra_text += (
        f"captions over the text encoder's {max_tokens} tokens (truncated in training): "
        f"{too_long} of {len(captions)}\n"
    )
    extra["long_captions"] = {"max_tokens": max_tokens, "count": too_long}
    print(extra_text, end="")
    if args.report:
        json_path, text_path = report.save(args.report, extra=extra, extra_text=extra_text)
        print(f"report written to {json_path} and {text_path}")


def _fit_folders(model: str | None, config: TrainConfig | None) -> tuple[str, str] | None:
    """The (VAE, tokenizer) folders ``check-data`` measures: ``--model``, else a training
    config's model (or its ``vae`` and ``text_encoder``), else the shipped model; None for
    ``--model none``."""
    if model == "none":
        return None
    if model is None and config is not None:
        if config.model is not None:
            return config.model, config.model
        return config.vae, config.text_encoder
    folder = expand_default_model(model or "default")
    return folder, folder


def make_shapes_command(args: argparse.Namespace) -> None:
    from ldm.shapes.world import make_shapes

    print(make_shapes(args.n, args.out, seed=args.seed, split=args.split))
