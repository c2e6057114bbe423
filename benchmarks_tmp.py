"""Benchmarks against the reference implementation: interleaved repeats, medians and spread.

Each benchmark runs the candidates in turn within every repeat (ours, reference, ours, ...), so
that slow drifts of the machine (heat, other processes) hit both alike. It reports the median
of each candidate's times, their spread (min and max relative to the median) and the ratio
of medians. This module imports diffusers; the library proper never imports it.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.config import UNetConfig
from ldm.nn.layers import Conv2d
from ldm.nn.unet import UNet


@dataclass
class Timing:
    name: str
    median_s: float
    min_s: float
    max_s: float
    times_s: list[float]

    @property
    def spread(self) -> str:
        return f"-{1 - self.min_s / self.median_s:.1%}/+{self.max_s / self.median_s - 1:.1%}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    candidates: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 1,
    device: torch.device,
) -> dict[str, Timing]:
    """Time each candidate ``repeats`` times, interleaved, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: Timing(name, statistics.median(ts), min(ts), max(ts), ts)
        for name, ts in times.items()
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def environment() -> dict[str, str]:
    """Machine and versions, to print beside the figures."""
    import diffusers

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu": _cpu_name(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


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
    """One forward pass of our U-Net and diffusers' on identical weights and inputs."""
    dev = torch.device(device)
    ours, reference = twin_unets(config, dev, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(dev, dtype)
    t = torch.full((batch,), 500, device=dev)
    context_dim = config.per_level("cross_attention_dim")[0]
    context = torch.randn(batch, 77, context_dim, generator=g).to(dev, dtype)
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
        "timings": {
            name: asdict(timing) | {"spread": timing.spread} for name, timing in timings.items()
        },
    }


def benchmark_conv(
    shapes: list[tuple[int, int, int, int]], *, batch: int = 2, repeats: int = 9
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
    DDIM, guidance 7.5, images returned as numpy arrays."""
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
    prompts = ["a large red circle in the center on a blue background"] * batch
    latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    common = dict(
        negative_prompt=["a green square"] * batch,
        num_inference_steps=steps,
        guidance_scale=7.5,
        output_type="np",
    )

    def run_ours():
        return ours(prompts, latents=latents, progress=False, **common).images

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
        "max_abs_diff": max_abs_diff,
        "ratio": timings["ours"].median_s / timings["diffusers"].median_s,
        "timings": {
            name: asdict(timing) | {"spread": timing.spread} for name, timing in timings.items()
        },
    }


def _reference_training_steps(folder, dataset, steps: int, batch: int, seed: int = 0) -> float:
    """Seconds per step of a plain loop written the way diffusers' train_text_to_image.py does
    it (diffusers U-Net, VAE posterior sample, tokenizer + CLIP, DDPMScheduler.add_noise, MSE,
    AdamW, constant LR), on the same data. Whole steps are timed, data loading included, as
    ours are (from its log); the first two steps are not counted."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").requires_grad_(
        False
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    unet.train()
    ends, done = [time.perf_counter()], 0  # whole steps: data loading included, as in ours
    while done < steps + 2:
        for item in loader:
            latents = vae.encode(item["pixels"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = noise_scheduler.add_noise(latents, noise, t)
            ids = tokenizer(
                item["caption"],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            hidden = text_encoder(ids)[0]
            pred = unet(noisy, t, hidden).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ends.append(time.perf_counter())
            done += 1
            if done >= steps + 2:
                break
    return (ends[-1] - ends[2]) / (len(ends) - 3)  # the mean over steps 3..N, as for ours


def benchmark_train(
    *,
    steps: int = 30,
    batch: int = 16,
    repeats: int = 9,
    images: int = 64,
    size: str = "small",
    model: str | Path | None = None,
) -> dict:
    """Seconds per optimizer step of `ldm train` (logging, checkpoint at the end; with the EMA
    off, as in the reference, with and without the encoder cache; and with the EMA on) and of
    the reference loop, on `ldm.testing` components of the given size ("small":
    default-model-sized, 64 px; "tiny": 32 px), or on the pipeline folder ``model`` (such as the
    shipped default model) with images of its resolution."""
    import json
    import tempfile

    from PIL import Image

    from ldm.config import DataConfig, TrainConfig
    from ldm.data import ImageCaptionDataset, scan
    from ldm.testing import SIZES, save_tiny_stable_diffusion
    from ldm.training.denoiser import train

    colours = [
        (255, 0, 0),
        (0, 0, 255),
        (0, 200, 0),
        (250, 220, 0),
        (128, 0, 128),
        (255, 128, 0),
        (255, 255, 255),
        (0, 0, 0),
    ]
    # like for like: the plain loop keeps no EMA, so "ours" and "ours, cached" run with EMA off;
    # "ours, EMA" is the default ldm train (EMA 0.999), to show what the EMA costs
    runs = {"ours": (False, 0.0), "ours, cached": (True, 0.0), "ours, EMA": (False, 0.999)}
    results: dict[str, list[float]] = {name: [] for name in (*runs, "reference")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if model is None:
            folder = save_tiny_stable_diffusion(root / "model", perturb=0.05, size=size)
            px = SIZES[size]["image"]
        else:
            folder = Path(model)
            unet_config = json.loads((folder / "unet" / "config.json").read_text())
            vae_config = json.loads((folder / "vae" / "config.json").read_text())
            px = unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)
        (root / "data").mkdir()
        rows = []
        for i in range(images):
            colour, background = colours[i % 8], colours[(i // 8 + 1 + i % 8) % 8]
            image = Image.new("RGB", (px, px), background)
            image.paste(colour, (px // 4, px // 4, 3 * px // 4, 3 * px // 4))
            image.save(root / "data" / f"{i}.png")
            rows.append(
                {
                    "file_name": f"{i}.png",
                    "text": f"a square of colour {i % 8} on background {i // 8}",
                }
            )
        (root / "data" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        data = DataConfig(str(root / "data"), resolution=px)
        dataset = ImageCaptionDataset(data, scan(data).samples)
        for r in range(repeats):
            for name, (cached, ema_decay) in runs.items():
                run = root / f"run-{r}-{cached}-{ema_decay}"
                config = TrainConfig.from_dict(
                    {
                        "model": str(folder),
                        "output_dir": str(run),
                        "data": {"path": data.path, "resolution": px},
                        "train": {
                            "max_steps": steps + 2,
                            "batch_size": batch,
                            "checkpoint_every": 10_000,
                            "cache_latents": cached,
                            "learning_rate": 1e-4,
                            "ema_decay": ema_decay,
                        },
                    }
                )
                train(config)
                log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
                elapsed = [rec["elapsed_s"] for rec in log]
                results[name].append((elapsed[-1] - elapsed[1]) / (len(elapsed) - 2))
            results["reference"].append(_reference_training_steps(folder, dataset, steps, batch))
    medians = {name: statistics.median(v) for name, v in results.items()}
    return {
        "benchmark": "train",
        "steps": steps,
        "batch": batch,
        "resolution": px,
        "model": str(model) if model is not None else f"ldm.testing size {size}",
        "seconds_per_step": medians,
        "all": results,
        "ratio_steps_per_s": medians["reference"] / medians["ours"],
        "ratio_steps_per_s_cached": medians["reference"] / medians["ours, cached"],
        "ratio_steps_per_s_ema": medians["reference"] / medians["ours, EMA"],
    }


_GENERATE_IN_ONE_PROCESS = """
import sys, time
start = time.perf_counter()
from ldm.pipeline import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained()
result = pipe([sys.argv[1]] * 8, num_inference_steps=50, seed=0, progress=False)
for i, image in enumerate(result.images):
    image.save(f"{sys.argv[2]}/{i}.png")
print(time.perf_counter() - start)
"""


def benchmark_default_generate(*, repeats: int = 5) -> dict:
    """Wall-clock seconds, each in a fresh process, to load the shipped default model, sample 8
    images with DDIM 50 steps (guidance 7.5) and save them as PNGs: timed inside the process
    (import + load + sample + save) and for the whole ``ldm generate PROMPT --n 8`` command."""
    import subprocess
    import sys
    import tempfile

    prompt = "a large red circle in the center on a blue background"
    inside, command = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            run = [sys.executable, "-c", _GENERATE_IN_ONE_PROCESS, prompt, out]
            inside.append(
                float(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
            )
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run(
                ["ldm", "generate", prompt, "--n", "8", "--seed", "0", "--out", out],
                capture_output=True,
                check=True,
            )
            command.append(time.perf_counter() - start)
    return {
        "benchmark": "default-generate",
        "images": 8,
        "steps": 50,
        "load_sample_save_s": inside,
        "ldm_generate_s": command,
        "median_load_sample_save_s": statistics.median(inside),
        "median_ldm_generate_s": statistics.median(command),
    }
