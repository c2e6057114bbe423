"""The ``ldm`` command line. Each sub-command parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from ldm import __version__
from ldm.config import UNET_PRESETS, TrainConfig, resolve_model
from ldm.sampling import TIMESTEP_SPACINGS, make_timesteps
from ldm.schedule import BETA_SCHEDULES, NoiseSchedule


def _schedule(args: argparse.Namespace) -> None:
    schedule = NoiseSchedule(
        args.beta_schedule,
        args.num_train_timesteps,
        args.beta_start,
        args.beta_end,
        rescale_betas_zero_snr=args.zero_snr,
        prediction_type="v_prediction" if args.zero_snr else "epsilon",
    )
    timesteps = make_timesteps(
        args.steps,
        schedule.num_train_timesteps,
        timestep_spacing=args.spacing,
        steps_offset=args.steps_offset,
    )
    print(f"# {schedule}")
    print(
        f"# {args.steps} steps, timestep_spacing={args.spacing!r}, steps_offset={args.steps_offset}"
    )
    print(f"{'step':>5} {'t':>5} {'alpha_bar':>12} {'sqrt(1-a)':>10} {'SNR':>12} {'log SNR':>8}")
    for i, t in enumerate(timesteps.tolist()):
        a = schedule.alphas_cumprod64[t].item()
        snr = a / (1 - a)
        log_snr = math.log(snr) if snr > 0 else -math.inf
        print(f"{i:>5} {t:>5} {a:>12.6g} {(1 - a) ** 0.5:>10.6f} {snr:>12.6g} {log_snr:>8.3f}")


DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _generate(args: argparse.Namespace) -> None:
    import torch

    from ldm.generate import GenerateRequest, generate_to_folder, read_prompts, resolve_model
    from ldm.pipeline import LatentDiffusionPipeline

    settings = dict(
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        sampler=args.sampler,
        eta=args.eta,
        seed=args.seed,
        n=args.n,
        height=args.height,
        width=args.width,
        init_image=args.init_image,
        strength=args.strength,
    )
    prompts = [args.prompt] if args.prompt else []
    if args.from_file:
        prompts += read_prompts(args.from_file)
    if args.from_png:
        request = GenerateRequest.from_png(args.from_png, **settings, prompts=prompts or None)
    elif prompts:
        request = GenerateRequest(prompts, **{k: v for k, v in settings.items() if v is not None})
    else:
        raise ValueError("give a prompt, --from-file PROMPTS.txt or --from-png IMAGE.png")
    if args.strength is not None and request.init_image is None:
        raise ValueError("--strength needs --init-image")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (
        getattr(torch, DTYPES[args.dtype])
        if args.dtype
        else (torch.float16 if device == "cuda" else torch.float32)
    )
    pipe = LatentDiffusionPipeline.from_pretrained(
        resolve_model(args.model), device=device, dtype=dtype
    )
    for path in generate_to_folder(pipe, request, args.out, grid=args.grid):
        print(path)


def _check_data(args: argparse.Namespace) -> None:
    from ldm.data import DataConfig, scan
    from ldm.text_encoder import build_clip_tokenizer, count_tokens

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

        from ldm.autoencoder import FrozenVAE
        from ldm.model_fit import measure_fit
        from ldm.text_encoder import load_tokenizer

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
    folder = resolve_model(model or "default")
    return folder, folder


def _train(args: argparse.Namespace) -> None:
    from ldm.config import TrainConfig
    from ldm.training import train

    config = TrainConfig.from_yaml(args.config, args.set)
    print(train(config, resume=args.resume))


def _convert(args: argparse.Namespace) -> None:
    from ldm.conversion import convert

    print(convert(args.source, args.target, config=args.config, unsafe_pickle=args.unsafe_pickle))


def _make_shapes(args: argparse.Namespace) -> None:
    from ldm.shapes import make_shapes

    print(make_shapes(args.n, args.out, seed=args.seed, split=args.split))


def _train_vae(args: argparse.Namespace) -> None:
    from ldm.config import VAETrainConfig
    from ldm.pretrain import train_vae

    print(train_vae(VAETrainConfig.from_yaml(args.config, args.set), resume=args.resume))


def _train_clip(args: argparse.Namespace) -> None:
    from ldm.config import CLIPTrainConfig
    from ldm.pretrain import train_clip

    print(train_clip(CLIPTrainConfig.from_yaml(args.config, args.set), resume=args.resume))


def _train_default(args: argparse.Namespace) -> None:
    from ldm.default_model import ship, train_default

    model = train_default(
        args.out, configs=args.configs, seed=args.seed, n_eval=args.n_eval, overrides=args.set
    )
    print(ship(model) if args.ship else model)


def _train_recipe(args: argparse.Namespace) -> None:
    from ldm.recipe import train_recipe

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


def _eval_shapes(args: argparse.Namespace) -> None:
    from ldm.evaluation import DEFAULT_SETTINGS, EvalSetting, evaluate, format_table
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    settings = (
        DEFAULT_SETTINGS
        if args.sweep
        else [EvalSetting(args.sampler, args.steps, args.guidance_scale)]
    )
    results = evaluate(pipe, n=args.n, settings=settings, seed=args.seed, out_dir=args.out)
    print(format_table(results))


def _eval(args: argparse.Namespace) -> None:
    from ldm.config import DataConfig
    from ldm.metrics import evaluate_on_data, format_results
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.pretrain import load_retrieval

    def data(path: str) -> DataConfig:
        return DataConfig(path, caption_column=args.caption_column, resolution=args.resolution)

    results = evaluate_on_data(
        LatentDiffusionPipeline.from_pretrained(resolve_model(args.model)),
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
    parser.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    schedule.set_defaults(func=_schedule)

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
    generate.set_defaults(func=_generate)

    train = commands.add_parser(
        "train",
        help="train or fine-tune a U-Net on image-caption data (Accelerate)",
        description="Train the U-Net of a latent diffusion model from a YAML config (see "
        "configs/finetune.yaml). Checkpoints go to OUTPUT_DIR/checkpoints, logs to "
        "OUTPUT_DIR/log.jsonl, the data report to OUTPUT_DIR/data_report.json, and the final "
        "pipeline to OUTPUT_DIR/model. Runs under `accelerate launch` for several processes.",
    )
    _add_run_arguments(train, "a YAML training config", "train.max_steps=200")
    train.set_defaults(func=_train)

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
    check.set_defaults(func=_check_data)

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
    convert.set_defaults(func=_convert)

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
    shapes.set_defaults(func=_make_shapes)

    for name, func, what in (
        ("train-vae", _train_vae, "the default model's VAE (AutoencoderKL) from scratch"),
        ("train-clip", _train_clip, "the default model's CLIP text encoder from scratch"),
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
    recipe.set_defaults(func=_train_recipe)
    default.add_argument(
        "--ship",
        action="store_true",
        help="copy the result into the package as the default model (ldm.DEFAULT_MODEL)",
    )
    default.set_defaults(func=_train_default)

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
    evaluation.set_defaults(func=_eval_shapes)

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
    on_data.set_defaults(func=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"ldm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console entry point: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
