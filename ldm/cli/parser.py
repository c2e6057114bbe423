"""The ``ldm`` argument parser: one sub-parser per command, each calling its function in
`ldm.cli.commands`."""

from __future__ import annotations

import argparse

from ldm import __version__
from ldm.cli import commands as run
from ldm.cli.commands import DTYPES
from ldm.config import UNET_PRESETS
from ldm.diffusion.samplers import TIMESTEP_SPACINGS
from ldm.diffusion.schedule import BETA_SCHEDULES


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


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line (no usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ldm",
        description="Conditional text-to-image latent diffusion: sampling, training, conversion.",
    )
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    schedule = commands.add_parser(
        "schedule",
        help="print the timesteps a sampler visits, with alpha_bar and SNR",
        description="Print the timesteps a DDIM/DDPM sampler visits for a noise schedule, "
        "with alpha_bar, the noise level sqrt(1 - alpha_bar) and the signal-to-noise ratio.",
    )
    schedule.add_argument("--steps", type=int, default=10, help="sampling steps (default: 10)")
    schedule.add_argument(
        "--spacing",
        choices=TIMESTEP_SPACINGS,
        default="leading",
        help="timestep spacing (default: leading)",
    )
    schedule.add_argument(
        "--steps-offset", type=int, default=1, help="offset for leading spacing (default: 1)"
    )
    schedule.add_argument(
        "--beta-schedule",
        choices=BETA_SCHEDULES,
        default="scaled_linear",
        help="(default: scaled_linear)",
    )
    schedule.add_argument("--beta-start", type=float, default=0.00085, help="(default: 0.00085)")
    schedule.add_argument("--beta-end", type=float, default=0.012, help="(default: 0.012)")
    schedule.add_argument("--num-train-timesteps", type=int, default=1000, help="T (default: 1000)")
    schedule.add_argument(
        "--zero-snr",
        action="store_true",
        help="rescale betas to zero terminal SNR (Lin et al. 2024)",
    )
    schedule.set_defaults(func=run.schedule_command)

    generate = commands.add_parser(
        "generate",
        help="generate images from a prompt and save them as PNGs with their settings",
        description="Generate images with a latent diffusion model and write them to --out as "
        "PNGs (settings in a 'parameters' text chunk) with one line each in manifest.jsonl. "
        "Existing files are never overwritten.",
    )
    generate.add_argument("prompt", nargs="?", help="what to draw")
    generate.add_argument(
        "--model", help="a diffusers-format model folder (default: the shipped model)"
    )
    generate.add_argument("--negative-prompt", help="what to steer away from (default: none)")
    generate.add_argument("--steps", type=int, help="sampling steps (default: 50)")
    generate.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance scale; 1 = none (default: 7.5)",
    )
    generate.add_argument("--sampler", choices=("ddim", "ddpm"), help="(default: ddim)")
    generate.add_argument(
        "--eta", type=float, help="DDIM noise: 0 deterministic, 1 ancestral (default: 0)"
    )
    generate.add_argument(
        "--seed", type=int, help="seed of the first image; image k gets seed + k (default: random)"
    )
    generate.add_argument("--n", type=int, help="images per prompt (default: 1)")
    generate.add_argument(
        "--height", type=int, help="image height in pixels (default: the model's)"
    )
    generate.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    generate.add_argument("--from-file", help="a text file of prompts, one per line")
    generate.add_argument("--init-image", help="start from this image (image-to-image)")
    generate.add_argument(
        "--strength",
        type=float,
        help="with --init-image: how much to change it, 0 to 1 (default: 0.8)",
    )
    generate.add_argument(
        "--from-png",
        help="reuse the settings stored in a PNG made by ldm (flags given override them)",
    )
    generate.add_argument(
        "--batch-size",
        type=int,
        help="images sampled at once; each is written as its batch finishes (default: the "
        "most that fits half the free memory, at most 8)",
    )
    generate.add_argument(
        "--max-memory",
        help="refuse requests whose estimated working memory exceeds this, e.g. 4GB "
        "(default: the memory the device has free)",
    )
    generate.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    generate.add_argument(
        "--grid", action="store_true", help="also save a contact sheet of all images"
    )
    generate.add_argument(
        "--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)"
    )
    generate.add_argument(
        "--dtype", choices=sorted(DTYPES), help="(default: float16 on cuda, float32 otherwise)"
    )
    generate.set_defaults(func=run.generate_command)

    train = commands.add_parser(
        "train",
        help="train or fine-tune a U-Net on image-caption data (Accelerate)",
        description="Train the U-Net of a latent diffusion model from a YAML config (see "
        "configs/finetune.yaml). Checkpoints go to OUTPUT_DIR/checkpoints, logs to "
        "OUTPUT_DIR/log.jsonl, the data report to OUTPUT_DIR/data_report.json, and the final "
        "pipeline to OUTPUT_DIR/model. Runs under `accelerate launch` for several processes.",
    )
    _add_run_arguments(train, "a YAML training config", "train.max_steps=200")
    train.set_defaults(func=run.train_command)

    check = commands.add_parser(
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
    check.add_argument("--caption-column", default="text", help="(default: text)")
    check.add_argument(
        "--resolution", type=int, default=64, help="training resolution (default: 64)"
    )
    check.add_argument(
        "--max-tokens",
        type=int,
        help="the text encoder's token limit (default: the model tokenizer's, 77 with --model none)",
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
        help="images (seeded sample) passed through the VAE to measure its PSNR (default: 64)",
    )
    check.add_argument(
        "--report", help="also write the report to this .json file (and a .txt beside it)"
    )
    check.set_defaults(func=run.check_data_command)

    convert = commands.add_parser(
        "convert",
        help="convert weights: SD single file <-> diffusers folder, .ckpt -> .safetensors",
        description="Convert weights between formats, chosen from the paths. "
        "SOURCE.ckpt TARGET.safetensors: the same tensors without pickle. "
        "SOURCE.safetensors|.ckpt TARGET_DIR: an original Stable Diffusion 1.x/2.x checkpoint as a "
        "diffusers pipeline folder (or, for a file with only U-Net weights, a diffusers U-Net folder). "
        "SOURCE_DIR TARGET.safetensors: a diffusers pipeline (or U-Net) folder as an SD single file. "
        "Existing files are never overwritten.",
    )
    convert.add_argument(
        "source", help="a .safetensors/.ckpt file, or a diffusers pipeline or U-Net folder"
    )
    convert.add_argument("target", help="a new .safetensors file or a new (or empty) folder")
    convert.add_argument(
        "--config",
        choices=UNET_PRESETS,
        help="U-Net config of a single file (default: SD 1.x or 2.x, read from the weights)",
    )
    convert.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="unpickle arbitrary objects in a .ckpt (runs code from the file: only for files you trust)",
    )
    convert.set_defaults(func=run.convert_command)

    shapes = commands.add_parser(
        "make-shapes",
        help="write the procedural shapes dataset (images + metadata.jsonl)",
        description="Render N 64x64 shapes images with captions into an image folder with "
        "metadata.jsonl (file_name, text and the attributes). The same seed gives the same "
        "files. --split heldout draws only the attribute combinations held out of training.",
    )
    shapes.add_argument("--n", type=int, required=True, help="how many images")
    shapes.add_argument("--out", required=True, help="a new or empty folder")
    shapes.add_argument("--seed", type=int, default=0, help="(default: 0)")
    shapes.add_argument(
        "--split", choices=("train", "heldout"), default="train", help="(default: train)"
    )
    shapes.set_defaults(func=run.make_shapes_command)

    for name, func, what in (
        (
            "train-vae",
            run.train_vae_command,
            "the default model's VAE (AutoencoderKL) from scratch",
        ),
        (
            "train-clip",
            run.train_clip_command,
            "the default model's CLIP text encoder from scratch",
        ),
    ):
        sub = commands.add_parser(
            name,
            help=f"train {what}",
            description=f"Train {what} on an image folder with metadata.jsonl, as a config like "
            f"ldm/configs/recipe/{name.removeprefix('train-')}.yaml says. Checkpoints go to OUTPUT_DIR/checkpoints, "
            "the log to OUTPUT_DIR/log.jsonl.",
        )
        _add_run_arguments(sub, "a YAML config", "max_steps=100")
        sub.set_defaults(func=func)

    recipe = commands.add_parser(
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
    recipe.add_argument("--resolution", type=int, default=64, help="(default: 64)")
    recipe.add_argument("--caption-column", default="text", help="(default: text)")
    recipe.add_argument(
        "--heldout",
        help="a dataset of held-out images (default: a seeded 10%% of DATA, at most 1000)",
    )
    recipe.add_argument(
        "--n-eval", type=int, default=100, help="training captions to evaluate (default: 100)"
    )

    default = commands.add_parser(
        "train-default",
        help="train the shipped default model from scratch: data, VAE, CLIP, U-Net, evaluation",
        description="Run the whole default-model recipe into OUT: make the shapes data, train "
        "the VAE, the CLIP text encoder and the U-Net (ldm train), then evaluate. Run it again "
        "to resume: finished stages are skipped, the others continue from their checkpoints.",
    )
    default.add_argument("--out", default="runs/default", help="(default: runs/default)")
    default.add_argument(
        "--n-eval", type=int, default=200, help="held-out images to evaluate (default: 200)"
    )
    for sub in (recipe, default):
        sub.add_argument(
            "--configs",
            default=None,
            help="the recipe's config folder (default: ldm/configs/recipe in the package)",
        )
        sub.add_argument("--seed", type=int, default=0, help="(default: 0)")
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="STAGE.KEY=VALUE",
            help="override a stage's config value, e.g. vae.max_steps=500 or "
            "unet.train.batch_size=32 (repeatable)",
        )
    recipe.set_defaults(func=run.train_recipe_command)
    default.add_argument(
        "--ship",
        action="store_true",
        help="copy the result into the package as the default model (ldm.DEFAULT_MODEL)",
    )
    default.set_defaults(func=run.train_default_command)

    evaluation = commands.add_parser(
        "eval-shapes",
        help="score a model on held-out shapes prompts with a rule-based detector",
        description="Generate images for attribute combinations held out of training, read "
        "shape, colour, size, position and background from each with a detector (no learned "
        "model), and print per-attribute and all-attribute accuracy.",
    )
    evaluation.add_argument("--model", help="a pipeline folder (default: the shipped model)")
    evaluation.add_argument("--n", type=int, default=200, help="images per setting (default: 200)")
    evaluation.add_argument("--seed", type=int, default=0, help="(default: 0)")
    evaluation.add_argument(
        "--sampler", choices=("ddim", "ddpm"), default="ddim", help="(default: ddim)"
    )
    evaluation.add_argument("--steps", type=int, default=50, help="(default: 50)")
    evaluation.add_argument("--guidance-scale", type=float, default=7.5, help="(default: 7.5)")
    evaluation.add_argument(
        "--sweep",
        action="store_true",
        help="all settings: guidance 1, 3, 7.5 at DDIM 50; DDIM 10/20/50/100; DDPM 1000",
    )
    evaluation.add_argument(
        "--out", help="also write results.json and an image grid per setting to this folder"
    )
    evaluation.set_defaults(func=run.eval_shapes_command)

    on_data = commands.add_parser(
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
    on_data.add_argument("--n", type=int, default=100, help="captions to generate (default: 100)")
    on_data.add_argument("--caption-column", default="text", help="(default: text)")
    on_data.add_argument("--resolution", type=int, default=64, help="(default: 64)")
    on_data.add_argument("--steps", type=int, default=30, help="DDIM steps (default: 30)")
    on_data.add_argument("--guidance-scale", type=float, default=7.5, help="(default: 7.5)")
    on_data.add_argument("--seed", type=int, default=0, help="(default: 0)")
    on_data.add_argument("--out", help="write results.json and grid.png to this folder")
    on_data.add_argument(
        "--clip",
        help="a CLIP stage's folder (ldm train-clip's OUTPUT_DIR, or a recipe's OUT/clip): rank "
        "each generated image's caption among others with its image and text towers",
    )
    on_data.set_defaults(func=run.eval_command)
    return parser
