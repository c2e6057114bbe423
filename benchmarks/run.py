"""Benchmarks of ldm against diffusers, quoted in docs/benchmarks.md.

    python -m benchmarks.run unet [--preset sd15] [--batch 2] [--size 32] [--repeats 7] [--json out.json]
    python -m benchmarks.run conv
    python -m benchmarks.run pipeline
    python -m benchmarks.run train [--model default]
    python -m benchmarks.run generate-default
    python -m benchmarks.run samplers [--batch 8] [--steps 20]
    python -m benchmarks.run lora [--data data/icons/train] [--heldout data/icons/heldout]

`unet` times one forward pass of our U-Net and of diffusers' UNet2DConditionModel with
identical weights: on the CPU in fp32 at the given size, and, when CUDA is present, in fp16
and bf16 at batch 2 and 64x64 latents, eager and under torch.compile. `conv` shows where our
Conv2d's GEMM path beats torch's convolution on the CPU. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from benchmarks.adapters import benchmark_lora
from benchmarks.inference import (
    CONV_SHAPES,
    DEFAULT_MODEL_IMAGES,
    benchmark_conv,
    benchmark_default_generate,
    benchmark_pipeline,
    benchmark_sampler_overhead,
    benchmark_unet,
)
from benchmarks.timing import environment
from benchmarks.training import benchmark_train
from ldm.config import UNET_PRESETS, UNetConfig, expand_default_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="what", required=True)
    unet = sub.add_parser("unet", help="our U-Net against diffusers' UNet2DConditionModel")
    unet.add_argument("--preset", choices=UNET_PRESETS, default="sd15")
    unet.add_argument("--batch", type=int, default=2)
    unet.add_argument("--size", type=int, default=32, help="latent size on the CPU (default: 32)")
    unet.add_argument("--repeats", type=int, default=7)
    unet.add_argument("--json", help="also write the results to this JSON file")
    sub.add_parser("conv", help="GFLOP/s of our Conv2d against torch's on the CPU")
    train = sub.add_parser("train", help="ldm train against a diffusers-style training loop")
    train.add_argument("--repeats", type=int, default=9)
    train.add_argument("--steps", type=int, default=30)
    train.add_argument(
        "--size", choices=("small", "tiny"), default="small", help="components (default: small)"
    )
    train.add_argument(
        "--model",
        help="a pipeline folder to train instead, or 'default' for the shipped default model",
    )
    default = sub.add_parser(
        "generate-default",
        help=f"{DEFAULT_MODEL_IMAGES} images from the shipped model: load + sample + save",
    )
    default.add_argument("--repeats", type=int, default=5)
    samplers = sub.add_parser(
        "samplers", help="each sampler's own work per model call of the shipped model"
    )
    samplers.add_argument("--batch", type=int, default=8)
    samplers.add_argument("--steps", type=int, default=20)
    samplers.add_argument("--repeats", type=int, default=5)
    lora = sub.add_parser("lora", help="LoRA against full fine-tuning of the shipped model")
    lora.add_argument("--data", default="data/icons/train")
    lora.add_argument("--heldout", default="data/icons/heldout")
    lora.add_argument("--out", default="runs/bench-lora")
    lora.add_argument("--n", type=int, default=100, help="captions evaluated (default: 100)")
    pipeline = sub.add_parser("pipeline", help="our pipeline against diffusers' on tiny components")
    pipeline.add_argument("--repeats", type=int, default=9)
    return parser


def print_unet(result: dict) -> None:
    size = result["latent_size"]
    mode = f"{result['device']} {result['dtype']} batch {result['batch']} {size}x{size}"
    mode += " compiled" if result["compile"] else " eager"
    for name, t in result["timings"].items():
        print(f"| {mode} | {name} | {t['median_s']:.3f} | {t['spread']} |")
    print(
        f"| {mode} | ours / diffusers | {result['ratio']:.3f} "
        f"| max abs diff {result['max_abs_diff']:.1e} |"
    )


def run_unet(args: argparse.Namespace, env: dict[str, str]) -> None:
    config = UNetConfig.preset(args.preset)
    runs = [dict(batch=args.batch, size=args.size)]
    if torch.cuda.is_available():
        runs += [
            dict(batch=2, size=64, device="cuda", dtype=dtype, compile=compiled)
            for dtype in (torch.float16, torch.bfloat16)
            for compiled in (False, True)
        ]
    print("| run | model | median s | spread (min/max) |")
    print("|---|---|---:|---|")
    results = []
    for run in runs:
        results.append(benchmark_unet(config, repeats=args.repeats, **run))
        print_unet(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "preset": args.preset, "results": results}, f, indent=2)


def run_conv(args: argparse.Namespace, env: dict[str, str]) -> None:
    print("| C_in -> C_out | size | stride | GEMM path | torch GFLOP/s | ours GFLOP/s |")
    print("|---|---:|---:|---|---:|---:|")
    for r in benchmark_conv(CONV_SHAPES):
        print(
            f"| {r['c_in']} -> {r['c_out']} | {r['size']} | {r['stride']} | {r['gemm_path']} "
            f"| {r['torch_gflops']:.0f} | {r['ours_gflops']:.0f} |"
        )


def run_train(args: argparse.Namespace, env: dict[str, str]) -> None:
    model = expand_default_model(args.model)
    r = benchmark_train(steps=args.steps, repeats=args.repeats, size=args.size, model=model)
    print(
        f"{r['model']}, {r['resolution']} px, batch {r['batch']}, CPU; "
        f"median s/step of {args.repeats} runs"
    )
    print("| loop | s / step | runs |")
    print("|---|---:|---|")
    for name, median in r["seconds_per_step"].items():
        print(f"| {name} | {median:.4f} | {', '.join(f'{x:.4f}' for x in r['all'][name])} |")
    print(f"| steps/s, ours / reference | {r['ratio_steps_per_s']:.3f} | |")
    print(f"| steps/s, ours cached / reference | {r['ratio_steps_per_s_cached']:.3f} | |")
    print(f"| steps/s, ours with EMA / reference | {r['ratio_steps_per_s_ema']:.3f} | |")


def run_generate_default(args: argparse.Namespace, env: dict[str, str]) -> None:
    r = benchmark_default_generate(repeats=args.repeats)
    print(
        f"shipped default model, {r['images']} images, {r['sampler'].upper()} {r['steps']} steps, "
        f"guidance {r['guidance_scale']}, fresh process each run"
    )
    print("| what | median s | runs |")
    print("|---|---:|---|")
    for name, key in (
        ("import + load + sample + save", "load_sample_save_s"),
        (f"whole `ldm generate ... --n {r['images']}` command", "ldm_generate_s"),
    ):
        runs = ", ".join(f"{x:.2f}" for x in r[key])
        print(f"| {name} | {r['median_' + key]:.2f} | {runs} |")


def run_pipeline(args: argparse.Namespace, env: dict[str, str]) -> None:
    r = benchmark_pipeline(repeats=args.repeats)
    print(
        f"tiny SD components, {r['sampler'].upper()} {r['steps']} steps, "
        f"guidance {r['guidance_scale']}, batch {r['batch']}, CPU"
    )
    print("| pipeline | median s | spread (min/max) |")
    print("|---|---:|---|")
    for name, t in r["timings"].items():
        print(f"| {name} | {t['median_s']:.4f} | {t['spread']} |")
    print(f"| ours / diffusers | {r['ratio']:.3f} | max abs pixel diff {r['max_abs_diff']:.1e} |")


def run_samplers(args: argparse.Namespace, env: dict[str, str]) -> None:
    result = benchmark_sampler_overhead(batch=args.batch, steps=args.steps, repeats=args.repeats)
    call = result["model_call_s"]
    print(
        f"shipped model, batch {args.batch} with guidance ({2 * args.batch} U-Net rows), "
        f"{args.steps} steps; one model call {1000 * call:.1f} ms"
    )
    print("| sampler | sampler's own work per model call, ms | share of a model call |")
    print("|---|---:|---:|")
    for r in result["samplers"]:
        ms = 1000 * r["sampler_s_per_call"]
        print(f"| {r['sampler']} | {ms:.3f} | {r['overhead']:.2%} |")


def run_lora(args: argparse.Namespace, env: dict[str, str]) -> None:
    from pathlib import Path

    r = benchmark_lora(args.data, args.heldout, Path(args.out), n=args.n)
    base = r["base"]["own_rms"]
    print(f"shipped model fine-tuned on {args.data}; ldm eval on {args.n} training captions")
    print(
        "| run | steps/s | minutes | peak RSS, MiB | trainable parameters | exported file, MiB "
        "| RMS to own image |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| shipped model | | | | | | {base:.3f} |")
    for name in ("full fine-tune", "LoRA rank 4"):
        x = r[name]
        print(
            f"| {name} | {x['steps_per_s']:.2f} | {x['minutes']:.1f} | {x['peak_rss_mib']:.0f} "
            f"| {x['trainable_parameters']:,} | {x['exported_mib']:.2f} | {x['own_rms']:.3f} |"
        )
    share = r["LoRA rank 4"]["share_of_full_effect"]
    print(f"LoRA's move toward the data as a share of the full fine-tune's: {share:.0%}")


COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, str]], None]] = {
    "unet": run_unet,
    "conv": run_conv,
    "train": run_train,
    "generate-default": run_generate_default,
    "pipeline": run_pipeline,
    "samplers": run_samplers,
    "lora": run_lora,
}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    env = environment()
    print("# " + ", ".join(f"{k} {v}" for k, v in env.items()))
    COMMANDS[args.what](args, env)


if __name__ == "__main__":
    main()
