"""What each ``ldm`` sub-command does: parse-free functions of an `argparse.Namespace` that
check what the flags say and call one library function (`ldm.cli.parser` wires them to flags)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ldm.config import TrainConfig, expand_default_model
from ldm.diffusion.samplers import make_timesteps
from ldm.diffusion.schedule import NoiseSchedule
from ldm.training.checkpoint import check_run


def schedule_command(args: argparse.Namespace) -> None:
    if not 1 <= args.steps <= args.num_train_timesteps:
        raise ValueError(
            f"--steps {args.steps} is not allowed; use 1 to --num-train-timesteps "
            f"({args.num_train_timesteps})"
        )
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


def generate_command(args: argparse.Namespace) -> None:
    from ldm.pipeline import folder as g

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
    prompts = [args.prompt] if args.prompt is not None else []  # "": the unconditional prompt
    if args.from_file:
        prompts += g.read_prompts(args.from_file)
    if args.from_png:
        request = g.GenerateRequest.from_png(args.from_png, **settings, prompts=prompts or None)
    elif prompts:
        request = g.GenerateRequest(prompts, **{k: v for k, v in settings.items() if v is not None})
    else:
        raise ValueError("give a prompt, --from-file PROMPTS.txt or --from-png IMAGE.png")
    request.check()  # every check that needs no model, before anything loads
    budget = g.parse_memory(args.max_memory) if args.max_memory else None
    device = g.check_device(args.device)
    folder = g.find_model_folder(args.model)
    facts = g.ModelFacts.read(folder)
    import torch

    dtype = (
        getattr(torch, DTYPES[args.dtype])
        if args.dtype
        else (torch.float16 if device.startswith("cuda") else torch.float32)
    )
    height, width, batch = g.plan_batches(
        request,
        facts,
        budget=budget or g.available_memory(device),
        batch_size=args.batch_size,
        itemsize=dtype.itemsize,
    )
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(folder, device=device, dtype=dtype)
    paths = g.generate_to_folder(
        pipe, request, args.out, grid=args.grid, batch_size=batch, size=(height, width)
    )
    for path in paths:
        print(path)


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


def _run_options(args: argparse.Namespace) -> dict:
    """A training command's --resume, --overwrite and --allow-config-change."""
    return dict(
        resume=args.resume,
        overwrite=args.overwrite,
        allow_config_change=args.allow_config_change,
    )


def train_command(args: argparse.Namespace) -> None:
    from ldm.config import TrainConfig

    config = TrainConfig.from_yaml(args.config, args.set)
    check_run(config.output_dir, args.resume, overwrite=args.overwrite)  # before slow imports
    from ldm.training.denoiser import train

    print(train(config, **_run_options(args)))


def convert_command(args: argparse.Namespace) -> None:
    from ldm.pipeline.convert import convert

    print(convert(args.source, args.target, config=args.config, unsafe_pickle=args.unsafe_pickle))


def make_shapes_command(args: argparse.Namespace) -> None:
    from ldm.shapes.world import make_shapes

    print(make_shapes(args.n, args.out, seed=args.seed, split=args.split))


def train_vae_command(args: argparse.Namespace) -> None:
    from ldm.config import VAETrainConfig

    config = VAETrainConfig.from_yaml(args.config, args.set)
    check_run(config.output_dir, args.resume, overwrite=args.overwrite)
    from ldm.training.pretrain import train_vae

    print(train_vae(config, **_run_options(args)))


def train_clip_command(args: argparse.Namespace) -> None:
    from ldm.config import CLIPTrainConfig

    config = CLIPTrainConfig.from_yaml(args.config, args.set)
    check_run(config.output_dir, args.resume, overwrite=args.overwrite)
    from ldm.training.pretrain import train_clip

    print(train_clip(config, **_run_options(args)))


def train_default_command(args: argparse.Namespace) -> None:
    from ldm.training.default_model import ship, train_default

    model = train_default(
        args.out, configs=args.configs, seed=args.seed, n_eval=args.n_eval, overrides=args.set
    )
    print(ship(model) if args.ship else model)


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


def eval_shapes_command(args: argparse.Namespace) -> None:
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.shapes.detector import DEFAULT_SETTINGS, EvalSetting, evaluate, format_table

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    settings = (
        DEFAULT_SETTINGS
        if args.sweep
        else [EvalSetting(args.sampler, args.steps, args.guidance_scale)]
    )
    results = evaluate(pipe, n=args.n, settings=settings, seed=args.seed, out_dir=args.out)
    print(format_table(results))


def eval_command(args: argparse.Namespace) -> None:
    from ldm.config import DataConfig
    from ldm.data import HUB_NAME
    from ldm.data.metrics import evaluate_on_data, format_results
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.training.pretrain import load_retrieval

    def data(path: str) -> DataConfig:
        return DataConfig(path, caption_column=args.caption_column, resolution=args.resolution)

    for flag, path in (("DATA", args.data), ("--heldout", args.heldout), ("--clip", args.clip)):
        if path is not None and not Path(path).exists() and not HUB_NAME.match(path):
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")

    results = evaluate_on_data(
        LatentDiffusionPipeline.from_pretrained(expand_default_model(args.model)),
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
