"""``ldm train``, ``ldm train-vae``, ``ldm train-clip``, ``ldm train-recipe`` and
``ldm train-default``: train a model's parts from YAML configs, or a whole model from data."""

from __future__ import annotations

import argparse

from ldm.cli.options import DEFAULT, add_caption_column, add_resolution, add_seed
from ldm.config import CLIPTrainConfig, TrainConfig, VAETrainConfig


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train or fine-tune a U-Net on image-caption data (Accelerate)",
        description="Train the U-Net of a latent diffusion model from a YAML config (see "
        "configs/finetune.yaml). Checkpoints go to OUTPUT_DIR/checkpoints, logs to "
        "OUTPUT_DIR/log.jsonl, the data report to OUTPUT_DIR/data_report.json, and the final "
        "pipeline to OUTPUT_DIR/model; with a lora section the adapters to OUTPUT_DIR/lora "
        "(configs/lora.yaml), with textual_inversion the new token's vectors to "
        "OUTPUT_DIR/textual_inversion. Runs under `accelerate launch` for several processes.",
    )
    _add_run_arguments(train, "a YAML training config", "train.max_steps=200")
    train.set_defaults(func=train_command)
    for name, func, what in (
        ("train-vae", train_vae_command, "the default model's VAE (AutoencoderKL) from scratch"),
        ("train-clip", train_clip_command, "the default model's CLIP text encoder from scratch"),
    ):
        sub = subparsers.add_parser(
            name,
            help=f"train {what}",
            description=f"Train {what} on an image folder with metadata.jsonl, as a config like "
            f"ldm/configs/recipe/{name.removeprefix('train-')}.yaml says. Checkpoints go to OUTPUT_DIR/checkpoints, "
            "the log to OUTPUT_DIR/log.jsonl.",
        )
        _add_run_arguments(sub, "a YAML config", "max_steps=100")
        sub.set_defaults(func=func)
    _add_recipes(subparsers)


def _add_run_arguments(parser: argparse.ArgumentParser, config_help: str, example: str) -> None:
    """The arguments of every training command: CONFIG, --set KEY=VALUE and --resume."""
    parser.add_argument("config", help=config_help)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {example} (repeatable)",
    )
    parser.add_argument(
        "--resume",
        help="'latest' (the latest checkpoint in OUTPUT_DIR), 'auto' (it if there is one, "
        "else start) or a checkpoint-N folder",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUTPUT_DIR that holds a run: the old run is moved aside to "
        "OUTPUT_DIR.old-DATE, never deleted",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config changes what is trained (data, model, LR...)",
    )


def _add_recipes(subparsers: argparse._SubParsersAction) -> None:
    """``train-recipe`` and ``train-default``: every stage of a model, from data to evaluation."""
    recipe = subparsers.add_parser(
        "train-recipe",
        help="train a complete small model from scratch on any dataset: VAE, CLIP, U-Net",
        description="Train a complete text-to-image model from scratch on DATA (anything ldm "
        "train reads, or 'shapes'): check and write the data at RESOLUTION, train the VAE, build "
        "a tokenizer from the captions' words, train the CLIP text encoder, train the U-Net "
        "(ldm train), evaluate, and export OUT/unet/model. Run it again to resume: finished "
        "stages are skipped, the others continue from their checkpoints.",
    )
    recipe.add_argument("data", help="a dataset (folder, manifest, datasets folder) or 'shapes'")
    recipe.add_argument("--out", required=True, help="the run's folder")
    add_resolution(recipe)
    add_caption_column(recipe)
    recipe.add_argument(
        "--heldout",
        help="a dataset of held-out images (default: a seeded 10%% of DATA, at most 1000)",
    )
    recipe.add_argument(
        "--n-eval", type=int, default=100, help=f"training captions to evaluate {DEFAULT}"
    )
    default = subparsers.add_parser(
        "train-default",
        help="train the shipped default model from scratch: data, VAE, CLIP, U-Net, evaluation",
        description="Run the whole default-model recipe into OUT: make the shapes data, train "
        "the VAE, the CLIP text encoder and the U-Net (ldm train), then evaluate. Run it again "
        "to resume: finished stages are skipped, the others continue from their checkpoints.",
    )
    default.add_argument("--out", default="runs/default", help=DEFAULT)
    default.add_argument(
        "--n-eval", type=int, default=200, help=f"held-out images to evaluate {DEFAULT}"
    )
    for sub in (recipe, default):
        sub.add_argument(
            "--configs",
            default=None,
            help="the recipe's config folder (default: ldm/configs/recipe in the package)",
        )
        add_seed(sub)
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="STAGE.KEY=VALUE",
            help="override a stage's config value, e.g. vae.max_steps=500 or "
            "unet.train.batch_size=32 (repeatable)",
        )
    recipe.set_defaults(func=train_recipe_command)
    default.add_argument(
        "--ship",
        action="store_true",
        help="copy the result into the package as the default model (ldm.DEFAULT_MODEL)",
    )
    default.set_defaults(func=train_default_command)


def _run_config(config_class: type, args: argparse.Namespace):
    """A training command's config (CONFIG with its --set overrides), its OUTPUT_DIR checked
    against --resume and --overwrite before the slow imports."""
    from ldm.training.checkpoint import check_run

    config = config_class.from_yaml(args.config, args.set)
    check_run(config.output_dir, args.resume, overwrite=args.overwrite)
    return config


def _run_options(args: argparse.Namespace) -> dict:
    """A training command's --resume, --overwrite and --allow-config-change."""
    return dict(
        resume=args.resume,
        overwrite=args.overwrite,
        allow_config_change=args.allow_config_change,
    )


def train_command(args: argparse.Namespace) -> None:
    config = _run_config(TrainConfig, args)
    from ldm.training.denoiser import train

    print(train(config, **_run_options(args)))


def train_vae_command(args: argparse.Namespace) -> None:
    config = _run_config(VAETrainConfig, args)
    from ldm.training.pretrain import train_vae

    print(train_vae(config, **_run_options(args)))


def train_clip_command(args: argparse.Namespace) -> None:
    config = _run_config(CLIPTrainConfig, args)
    from ldm.training.pretrain import train_clip

    print(train_clip(config, **_run_options(args)))


def train_recipe_command(args: argparse.Namespace) -> None:
    from ldm.training.recipe import train_recipe

    model = train_recipe(
        args.data,
        args.out,
        resolution=args.resolution,
        caption_column=args.caption_column,
        heldout=args.heldout,
        seed=args.seed,
        configs=args.configs,
        overrides=args.set,
        n_eval=args.n_eval,
    )
    print(model)


def train_default_command(args: argparse.Namespace) -> None:
    from ldm.training.default_model import ship, train_default

    model = train_default(
        args.out, configs=args.configs, seed=args.seed, n_eval=args.n_eval, overrides=args.set
    )
    print(ship(model) if args.ship else model)
