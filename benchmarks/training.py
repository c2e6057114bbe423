"""Training benchmark: seconds per optimizer step of ``ldm train`` against a plain loop written
the way diffusers' train_text_to_image.py does it, on the same components and data."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ldm.config import DataConfig, TrainConfig

COLOURS = [
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
RUNS = {"ours": (False, 0.0), "ours, cached": (True, 0.0), "ours, EMA": (False, 0.999)}
"""name: (cache_latents, ema_decay)"""


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


def _model_folder(root: Path, model: str | Path | None, size: str) -> tuple[Path, int]:
    """The pipeline folder to train and its image resolution: ``model`` as given, or new
    `ldm.testing` components of ``size`` saved under ``root``."""
    from ldm.testing import SIZES, save_tiny_stable_diffusion

    if model is None:
        folder = save_tiny_stable_diffusion(root / "model", perturb=0.05, size=size)
        return Path(folder), SIZES[size]["image"]
    folder = Path(model)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    px = unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)
    return folder, px


def _write_images(folder: Path, images: int, px: int) -> None:
    """``images`` squares of eight colours on eight backgrounds, with captions, as an
    image folder (PNGs and metadata.jsonl)."""
    from PIL import Image

    folder.mkdir()
    rows = []
    for i in range(images):
        colour, background = COLOURS[i % 8], COLOURS[(i // 8 + 1 + i % 8) % 8]
        image = Image.new("RGB", (px, px), background)
        image.paste(colour, (px // 4, px // 4, 3 * px // 4, 3 * px // 4))
        image.save(folder / f"{i}.png")
        rows.append(
            {"file_name": f"{i}.png", "text": f"a square of colour {i % 8} on background {i // 8}"}
        )
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def _ours_seconds_per_step(
    model: Path, data: DataConfig, run: Path, *, steps: int, batch: int, cached: bool, ema: float
) -> float:
    """One ``ldm train`` run of ``steps`` + 2 steps into ``run``; the mean seconds per step
    after the first two, from its log."""
    from ldm.training.denoiser import train

    config = TrainConfig.from_dict(
        {
            "model": str(model),
            "output_dir": str(run),
            "data": {"path": data.path, "resolution": data.resolution},
            "train": {
                "max_steps": steps + 2,
                "batch_size": batch,
                "checkpoint_every": 10_000,
                "cache_latents": cached,
                "learning_rate": 1e-4,
                "ema_decay": ema,
            },
        }
    )
    train(config)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    elapsed = [rec["elapsed_s"] for rec in log]
    return (elapsed[-1] - elapsed[1]) / (len(elapsed) - 2)


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
    import tempfile

    from ldm.data import ImageCaptionDataset, scan

    results: dict[str, list[float]] = {name: [] for name in (*RUNS, "reference")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, px = _model_folder(root, model, size)
        _write_images(root / "data", images, px)
        data = DataConfig(str(root / "data"), resolution=px)
        dataset = ImageCaptionDataset(data, scan(data).samples)
        for r in range(repeats):
            for name, (cached, ema_decay) in RUNS.items():
                run = root / f"run-{r}-{cached}-{ema_decay}"
                results[name].append(
                    _ours_seconds_per_step(
                        folder, data, run, steps=steps, batch=batch, cached=cached, ema=ema_decay
                    )
                )
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
