"""``ldm schedule``, ``ldm generate`` and ``ldm convert``: sample from a model, show the
timesteps its sampler visits, convert its weights between formats."""

from __future__ import annotations

import argparse
import math

from ldm.cli.options import DEFAULT, add_lora
from ldm.config import GENERATION, UNET_PRESETS, SchedulerConfig
from ldm.config.generation import MAX_BATCH
from ldm.config.names import BETA_SCHEDULES, SAMPLER_NAMES, SIGMA_SCHEDULES, TIMESTEP_SPACINGS

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    _add_schedule(subparsers)
    _add_generate(subparsers)
    _add_convert(subparsers)


def _add_schedule(subparsers: argparse._SubParsersAction) -> None:
    schedule = subparsers.add_parser(
        "schedule",
        help="print the timesteps a sampler visits, with alpha_bar and SNR",
        description="Print the timesteps a DDIM/DDPM sampler visits for a noise schedule, "
        "with alpha_bar, the noise level sqrt(1 - alpha_bar) and the signal-to-noise ratio.",
    )
    schedule.add_argument("--steps", type=int, default=10, help=f"sampling steps {DEFAULT}")
    schedule.add_argument(
        "--spacing",
        choices=TIMESTEP_SPACINGS,
        default=SchedulerConfig.timestep_spacing,
        help=f"timestep spacing {DEFAULT}",
    )
    schedule.add_argument(
        "--steps-offset",
        type=int,
        default=SchedulerConfig.steps_offset,
        help=f"offset for leading spacing {DEFAULT}",
    )
    schedule.add_argument(
        "--beta-schedule",
        choices=BETA_SCHEDULES,
        default=SchedulerConfig.beta_schedule,
        help=DEFAULT,
    )
    schedule.add_argument(
        "--beta-start", type=float, default=SchedulerConfig.beta_start, help=DEFAULT
    )
    schedule.add_argument("--beta-end", type=float, default=SchedulerConfig.beta_end, help=DEFAULT)
    schedule.add_argument(
        "--num-train-timesteps",
        type=int,
        default=SchedulerConfig.num_train_timesteps,
        help=f"T {DEFAULT}",
    )
    schedule.add_argument(
        "--zero-snr",
        action="store_true",
        help="rescale betas to zero terminal SNR (Lin et al. 2024)",
    )
    schedule.set_defaults(func=schedule_command)


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    generate = subparsers.add_parser(
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
    _add_sampling_arguments(generate)
    generate.add_argument("--from-file", help="a text file of prompts, one per line")
    generate.add_argument("--init-image", help="start from this image (image-to-image)")
    generate.add_argument(
        "--strength",
        type=float,
        help=f"with --init-image: how much to change it, 0 to 1 (default: {GENERATION.strength:g})",
    )
    generate.add_argument(
        "--from-png",
        help="reuse the settings stored in a PNG made by ldm (flags given override them)",
    )
    add_lora(generate)
    _add_output_arguments(generate)
    generate.set_defaults(func=generate_command)


def _add_sampling_arguments(generate: argparse.ArgumentParser) -> None:
    """The settings of each image, None when not given: a request (`GenerateRequest`) fills in
    the defaults, and a PNG's settings (--from-png) are kept where a flag is not given."""
    negative = GENERATION.negative_prompt or "none"
    generate.add_argument(
        "--negative-prompt", help=f"what to steer away from (default: {negative})"
    )
    generate.add_argument(
        "--steps", type=int, help=f"sampling steps (default: {GENERATION.num_inference_steps})"
    )
    generate.add_argument(
        "--guidance-scale",
        type=float,
        help=f"classifier-free guidance scale; 1 = none (default: {GENERATION.guidance_scale:g})",
    )
    generate.add_argument(
        "--sampler",
        help=f'{", ".join(SAMPLER_NAMES)}, or A1111\'s name ("DPM++ 2M Karras", "Euler a") '
        f"(default: {GENERATION.sampler})",
    )
    generate.add_argument(
        "--sigmas",
        choices=SIGMA_SCHEDULES,
        help="noise levels of the sigma-space samplers (default: the sampler's own)",
    )
    generate.add_argument(
        "--eta",
        type=float,
        help=f"DDIM noise: 0 deterministic, 1 ancestral (default: {GENERATION.eta:g})",
    )
    generate.add_argument(
        "--seed", type=int, help="seed of the first image; image k gets seed + k (default: random)"
    )
    generate.add_argument("--n", type=int, help="images per prompt (default: 1)")
    generate.add_argument(
        "--height", type=int, help="image height in pixels (default: the model's)"
    )
    generate.add_argument("--width", type=int, help="image width in pixels (default: the model's)")


def _add_output_arguments(generate: argparse.ArgumentParser) -> None:
    generate.add_argument(
        "--batch-size",
        type=int,
        help="images sampled at once; each is written as its batch finishes (default: the "
        f"most that fits half the free memory, at most {MAX_BATCH})",
    )
    generate.add_argument(
        "--max-memory",
        help="refuse requests whose estimated working memory exceeds this, e.g. 4GB "
        "(default: the memory the device has free)",
    )
    generate.add_argument("--out", default="outputs", help=f"output folder {DEFAULT}")
    generate.add_argument(
        "--grid", action="store_true", help="also save a contact sheet of all images"
    )
    generate.add_argument(
        "--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)"
    )
    generate.add_argument(
        "--dtype", choices=sorted(DTYPES), help="(default: float16 on cuda, float32 otherwise)"
    )


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
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
    convert.set_defaults(func=convert_command)


def schedule_command(args: argparse.Namespace) -> None:
    if not 1 <= args.steps <= args.num_train_timesteps:
        raise ValueError(
            f"--steps {args.steps} is not allowed; use 1 to --num-train-timesteps "
            f"({args.num_train_timesteps})"
        )
    from ldm.diffusion.schedule import NoiseSchedule, make_timesteps

    schedule = NoiseSchedule(
        args.beta_schedule,
        args.num_train_timesteps,
        args.beta_start,
        args.beta_end,
        rescale_betas_zero_snr=args.zero_snr,
        prediction_type="v_prediction" if args.zero_snr else SchedulerConfig.prediction_type,
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


def generate_command(args: argparse.Namespace) -> None:
    from ldm.pipeline import folder as g

    settings = dict(
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        sampler=args.sampler,
        sigmas=args.sigmas,
        eta=args.eta,
        seed=args.seed,
        n=args.n,
        height=args.height,
        width=args.width,
        init_image=args.init_image,
        strength=args.strength,
        loras=[g.parse_lora_flag(text) for text in args.lora] if args.lora else None,
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


def convert_command(args: argparse.Namespace) -> None:
    from ldm.pipeline.convert import convert

    print(convert(args.source, args.target, config=args.config, unsafe_pickle=args.unsafe_pickle))
