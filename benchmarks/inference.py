"""Inference benchmarks against diffusers: one U-Net forward pass, single convolutions, a whole
text-to-image call of the pipeline, and generation with the shipped default model."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.timing import interleaved
from ldm.config import GENERATION, UNetConfig
from ldm.encoders.tokenizer import CLIP_MAX_LENGTH
from ldm.nn.layers import Conv2d
from ldm.nn.unet import UNet

PROMPT = "a large red circle in the center on a blue background"

CONV_SHAPES = [  # (C_in, C_out, size, stride): the SD 1.5 U-Net's 3x3 convolutions at 32x32 latents
    (320, 320, 32, 1),
    (640, 640, 16, 1),
    (640, 1280, 8, 1),
    (1280, 1280, 8, 1),
    (1280, 1280, 8, 2),
    (1280, 1280, 4, 1),
    (2560, 1280, 4, 1),
    (2560, 1280, 8, 1),
    (1920, 1280, 8, 1),
    (1920, 640, 16, 1),
]

# diffusers' pipeline samples with the scheduler that `ldm.testing` saves (DDIM), so ours is
# pinned to the same sampler rather than following GENERATION.sampler
PIPELINE_SAMPLER = "ddim"

DEFAULT_MODEL_IMAGES = 8  # images per run of `benchmark_default_generate`


def twin_unets(config: UNetConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """diffusers' UNet2DConditionModel and ours with identical (random) weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    reference = UNet2DConditionModel(**kwargs).eval()
    ours = UNet(config).eval()
    ours.load_weights(reference.state_dict())
    if device.type == "cpu" and dtype == torch.float32:  # as built; .to() would warn for nothing
        return ours, reference
    return ours.to(device, dtype), reference.to(device, dtype)


def benchmark_unet(
    config: UNetConfig,
    *,
    batch: int = 2,
    size: int = 32,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    repeats: int = 7,
) -> dict:
    """One forward pass of our U-Net and diffusers' on identical weights and inputs, with
    CLIP's context length (`CLIP_MAX_LENGTH` tokens)."""
    dev = torch.device(device)
    ours, reference = twin_unets(config, dev, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(dev, dtype)
    t = torch.full((batch,), 500, device=dev)
    context_dim = config.per_level("cross_attention_dim")[0]
    context = torch.randn(batch, CLIP_MAX_LENGTH, context_dim, generator=g).to(dev, dtype)
    ours_fn, reference_fn = ours, reference
    if compile:
        ours_fn, reference_fn = torch.compile(ours), torch.compile(reference)
    with torch.inference_mode():
        max_abs_diff = (
            (ours_fn(x, t, context) - reference_fn(x, t, context).sample).abs().max().item()
        )
        timings = interleaved(
            {
                "ours": lambda: ours_fn(x, t, context),
                "diffusers": lambda: reference_fn(x, t, context).sample,
            },
            repeats=repeats,
            warmup=2 if compile else 1,
            device=dev,
        )
    return {
        "benchmark": "unet",
        "parameters": sum(p.numel() for p in ours.parameters()),
        "batch": batch,
        "latent_size": size,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": compile,
        "max_abs_diff": max_abs_diff,
        "ratio": timings["ours"].median_s / timings["diffusers"].median_s,
        "timings": {name: timing.as_dict() for name, timing in timings.items()},
    }


def benchmark_conv(
    shapes: list[tuple[int, int, int, int]] = CONV_SHAPES, *, batch: int = 2, repeats: int = 9
) -> list[dict]:
    """GFLOP/s of torch's convolution and of ours (`ldm.nn.layers.Conv2d`) on the CPU for
    (C_in, C_out, size, stride) 3x3 convolutions."""
    rows = []
    with torch.inference_mode():
        for c_in, c_out, size, stride in shapes:
            ours = Conv2d(c_in, c_out, 3, stride=stride, padding=1)
            x = torch.randn(batch, c_in, size, size)
            out_size = (size - 1) // stride + 1
            flops = 2 * batch * c_in * c_out * 9 * out_size * out_size
            timings = interleaved(
                {
                    "ours": lambda ours=ours, x=x: ours(x),
                    "torch": lambda ours=ours, x=x, s=stride: F.conv2d(
                        x, ours.weight, ours.bias, s, 1
                    ),
                },
                repeats=repeats,
                device=torch.device("cpu"),
            )
            rows.append(
                {
                    "c_in": c_in,
                    "c_out": c_out,
                    "size": size,
                    "stride": stride,
                    "gemm_path": c_in * c_out >= Conv2d.GEMM_MIN_WEIGHT
                    and batch * out_size**2 <= Conv2d.GEMM_MAX_COLUMNS,
                    "torch_gflops": flops / timings["torch"].median_s / 1e9,
                    "ours_gflops": flops / timings["ours"].median_s / 1e9,
                }
            )
    return rows


def benchmark_pipeline(*, steps: int = 10, batch: int = 2, repeats: int = 9) -> dict:
    """A whole text-to-image call of our pipeline and of diffusers' `StableDiffusionPipeline`
    on the same tiny components (`ldm.testing`), prompts, negative prompts and initial latents:
    DDIM (`PIPELINE_SAMPLER`), guidance `GENERATION.guidance_scale`, images returned as numpy
    arrays."""
    import tempfile

    import numpy as np
    from diffusers import StableDiffusionPipeline

    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.testing import save_tiny_stable_diffusion

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_stable_diffusion(f"{tmp}/tiny", perturb=0.05)
        ours = LatentDiffusionPipeline.from_pretrained(folder)
        reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    prompts = [PROMPT] * batch
    latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    common = dict(
        negative_prompt=["a green square"] * batch,
        num_inference_steps=steps,
        guidance_scale=GENERATION.guidance_scale,
        output_type="np",
    )

    def run_ours():
        return ours(
            prompts, latents=latents, sampler=PIPELINE_SAMPLER, progress=False, **common
        ).images

    def run_reference():
        return reference(prompts, latents=latents, **common).images

    max_abs_diff = float(np.abs(run_ours() - run_reference()).max())
    timings = interleaved(
        {"ours": run_ours, "diffusers": run_reference},
        repeats=repeats,
        warmup=2,
        device=torch.device("cpu"),
    )
    return {
        "benchmark": "pipeline",
        "steps": steps,
        "batch": batch,
        "guidance_scale": GENERATION.guidance_scale,
        "sampler": PIPELINE_SAMPLER,
        "max_abs_diff": max_abs_diff,
        "ratio": timings["ours"].median_s / timings["diffusers"].median_s,
        "timings": {name: timing.as_dict() for name, timing in timings.items()},
    }


_GENERATE_IN_ONE_PROCESS = f"""
import sys, time
start = time.perf_counter()
from ldm.pipeline import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained()
result = pipe(
    [sys.argv[1]] * {DEFAULT_MODEL_IMAGES},
    num_inference_steps={GENERATION.num_inference_steps},
    seed=0,
    progress=False,
)
for i, image in enumerate(result.images):
    image.save(f"{{sys.argv[2]}}/{{i}}.png")
print(time.perf_counter() - start)
"""


def benchmark_default_generate(*, repeats: int = 5) -> dict:
    """Wall-clock seconds, each in a fresh process, to load the shipped default model, sample
    `DEFAULT_MODEL_IMAGES` images with the generation defaults (`GENERATION`'s sampler, steps
    and guidance) and save them as PNGs: timed inside the process (import + load + sample +
    save) and for the whole ``ldm generate PROMPT --n 8`` command."""
    import subprocess
    import sys
    import tempfile

    inside, command = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            run = [sys.executable, "-c", _GENERATE_IN_ONE_PROCESS, PROMPT, out]
            inside.append(
                float(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
            )
        with tempfile.TemporaryDirectory() as out:
            n = str(DEFAULT_MODEL_IMAGES)
            start = time.perf_counter()
            subprocess.run(
                ["ldm", "generate", PROMPT, "--n", n, "--seed", "0", "--out", out],
                capture_output=True,
                check=True,
            )
            command.append(time.perf_counter() - start)
    return {
        "benchmark": "default-generate",
        "images": DEFAULT_MODEL_IMAGES,
        "steps": GENERATION.num_inference_steps,
        "sampler": GENERATION.sampler,
        "guidance_scale": GENERATION.guidance_scale,
        "load_sample_save_s": inside,
        "ldm_generate_s": command,
        "median_load_sample_save_s": statistics.median(inside),
        "median_ldm_generate_s": statistics.median(command),
    }


def benchmark_sampler_overhead(*, batch: int = 8, steps: int = 20, repeats: int = 5) -> dict:
    """The samplers' own work (everything but the model calls) against one model call of the
    shipped model: its U-Net with classifier-free guidance (2 x ``batch`` rows) at guidance
    `GENERATION.guidance_scale`. Each sampler runs ``steps`` steps with a model callable that
    returns a stored output of the real one, so what is timed is the sampler alone; its time per
    model call is divided by the real call's. Returns ``model_call_s`` and a row per sampler."""
    from ldm.diffusion.registry import SAMPLERS, model_calls, run_sampler
    from ldm.diffusion.samplers import guided_eps_fn
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained()
    context = pipe.text_encoder([PROMPT] * batch)
    uncond = pipe.text_encoder([""] * batch)
    model_fn = guided_eps_fn(pipe.unet, context, uncond, GENERATION.guidance_scale)
    size = pipe.unet.config.sample_size
    x_T = torch.randn(batch, pipe.unet.config.in_channels, size, size)
    t = torch.full((batch,), 500)
    with torch.inference_mode():
        stored = model_fn(x_T, t)
        call = interleaved({"call": lambda: model_fn(x_T, t)}, repeats=repeats, device=x_T.device)

        def replay(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return stored

        def run(name: str) -> torch.Tensor:
            generators = [torch.Generator().manual_seed(k) for k in range(batch)]
            return run_sampler(
                name,
                replay,
                pipe.schedule,
                x_T,
                steps,
                config=pipe.scheduler_config,
                generator=generators,
            )

        model_call_s = call["call"].median_s
        rows = []
        for name in SAMPLERS:
            timing = interleaved(
                {name: lambda name=name: run(name)}, repeats=repeats, device=x_T.device
            )[name]
            per_call = timing.median_s / model_calls(name, steps)
            rows.append(
                {
                    "sampler": name,
                    "steps": steps,
                    "batch": batch,
                    "sampler_s_per_call": per_call,
                    "overhead": per_call / model_call_s,
                }
            )
    return {"model_call_s": model_call_s, "samplers": rows}
