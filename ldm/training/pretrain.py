"""Training the frozen parts of the default model from scratch: the VAE and the text encoder.

Both are small enough to train on two CPU cores in minutes. Each trainer reads an image folder
into memory once and hands its objective to the loop of ``ldm train`` (`ldm.training.loop.fit`):
seeded epochs of batches, warm-up and cosine decay, clipping, the NaN guard, the EMA (off
unless ``ema_decay`` is set), JSONL and TensorBoard logs, atomic rotated checkpoints that
resume exactly, and a checkpoint on SIGTERM. The result is a diffusers-layout folder:

- `train_vae`: ``vae/`` (`AutoencoderKL`, its ``scaling_factor`` = 1 / std of the training
  latents, stored in its config).
- `train_clip`: ``text_encoder/`` (a transformers `CLIPTextModel`, converted from the open_clip
  text tower), ``tokenizer/`` (a `CLIPTokenizer` with CLIP's BPE cut down to the words of the
  data's captions, plus a reserve of CLIP's most frequent merges) and ``open_clip/`` (the whole
  open_clip model, image tower included, which `ldm eval --clip` uses to rank captions).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from ldm.config import CLIPTrainConfig, VAETrainConfig
from ldm.encoders.text import (
    OPEN_CLIP_PAD_TOKEN,
    build_clip_tokenizer,
    clip_encode,
    load_tokenizer,
    open_clip_to_transformers,
)
from ldm.files import follow_umask
from ldm.images import make_grid, psnr, to_pil
from ldm.training.loop import fit, make_accelerator, prepare_run
from ldm.training.objective import Objective, Part, Step

logger = logging.getLogger(__name__)


def load_image_folder(folder: str | Path) -> tuple[Tensor, list[str]]:
    """All images of an image folder with ``metadata.jsonl`` as uint8 (N, H, W, 3), and captions."""
    metadata = Path(folder) / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(
            f"no {metadata}; an image folder with metadata.jsonl is needed (`ldm make-shapes` "
            "writes one; `ldm train-recipe` writes one from any dataset)"
        )
    rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    images = np.stack(
        [
            np.asarray(Image.open(metadata.parent / r["file_name"]).convert("RGB"))
            for r in tqdm(rows, desc=f"reading {metadata.parent.name}", unit="image")
        ]
    )
    return torch.from_numpy(images), [r["text"] for r in rows]


def to_model_range(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _finish(out: Path, name: str, save: Callable[[Path], None]) -> Path:
    """Write ``out/name`` through a temporary sibling folder and a rename."""
    final, tmp = out / name, out / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    follow_umask(tmp)  # safetensors writes 0600
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def build_vae(config: VAETrainConfig, resolution: int = 64) -> AutoencoderKL:
    """A fresh `AutoencoderKL` of the config's size (downscale 2 ** (levels - 1))."""
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=resolution,
    )


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> float:
    """The std of posterior samples over ``images`` (uint8), as SD's scaling factor was chosen."""
    generator = torch.Generator().manual_seed(0)
    samples = [
        vae.encode(to_model_range(images[i : i + batch_size])).latent_dist.sample(generator)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(samples).std().item()


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> float:
    """Mean PSNR (dB) of ``decode(mode(encode(x)))`` over uint8 ``images``."""
    values = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i : i + batch_size])
        x_hat = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        values.append(psnr(x_hat, x))
    return torch.cat(values).mean().item()


def train_vae(config: VAETrainConfig, *, resume: str | Path | None = None, **run: bool) -> Path:
    """Train the VAE; write ``output_dir/vae`` and return it. Logs PSNR on ``heldout``;
    validation grids show held-out images above their reconstructions. ``resume`` and ``run``
    (``overwrite``, ``allow_config_change``) as in `ldm.training.denoiser.train`."""
    settings, out, accelerator, checkpoint = _start(config, resume, **run)
    images, _ = load_image_folder(config.data)
    heldout = load_image_folder(config.heldout)[0] if config.heldout else None
    torch.manual_seed(config.seed)
    vae = build_vae(config, images.shape[1])
    device = accelerator.device
    vae.to(device).train()

    def loss(model, indices: list[int], generator: torch.Generator) -> Step:
        x = to_model_range(images[indices]).to(device)  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        x_hat = vae.decode(posterior.mean + posterior.std * noise).sample  # z ~ q(z|x)
        mse = F.mse_loss(x_hat, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
        psnr_db = psnr(x_hat.detach().clamp(-1, 1), x).mean().item()
        figures = {"mse": mse.item(), "kl": kl.item(), "psnr": psnr_db}
        return Step(mse + config.kl_weight * kl, figures)

    shown = to_model_range((heldout if heldout is not None else images)[:8]).to(device)

    def validate(step: int) -> Image.Image:
        vae.eval()
        with torch.no_grad():
            reconstructed = vae.decode(vae.encode(shown).latent_dist.mode()).sample.clamp(-1, 1)
            heldout_db = reconstruction_psnr(vae, heldout) if heldout is not None else None
        vae.train()
        grid = make_grid(to_pil(shown) + to_pil(reconstructed), cols=len(shown))
        (out / "validation").mkdir(parents=True, exist_ok=True)
        grid.save(out / "validation" / f"step-{step}.png")
        if heldout_db is not None:
            logger.info("VAE step %d: held-out PSNR %.2f dB", step, heldout_db)
            with open(out / "validation" / "heldout_psnr.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "heldout_psnr_db": heldout_db}) + "\n")
        return grid

    objective = Objective(
        "training the VAE",
        len(images),
        [Part(list(vae.parameters()), config.learning_rate, vae)],
        loss,
        validate=validate,
        validate_every=config.checkpoint_every,
        log_every=config.log_every,
    )
    _write_config(out, config)
    fit(objective, settings, out, accelerator, resume=checkpoint, config=config.to_dict())
    vae.eval()
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, images[:4096]))
    report = {"scaling_factor": vae.config.scaling_factor}
    if heldout is not None:
        report["heldout_psnr_db"] = reconstruction_psnr(vae, heldout)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("VAE: %s", report)
    return _finish(out, "vae", lambda folder: vae.save_pretrained(folder))


def _start(config: VAETrainConfig | CLIPTrainConfig, resume: str | Path | None, **run: bool):
    """The loop's settings, the run's folder, the accelerator and the checkpoint to resume,
    checked (`ldm.training.loop.prepare_run`) before any data is read."""
    settings, out = config.settings(), Path(config.output_dir)
    accelerator = make_accelerator(settings)
    return (
        settings,
        out,
        accelerator,
        prepare_run(out, accelerator, resume, config.to_dict(), **run),
    )


def _write_config(out: Path, config: VAETrainConfig | CLIPTrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def build_clip(
    config: CLIPTrainConfig, vocab_size: int, eos_id: int, image_size: int = 64
) -> open_clip.CLIP:
    """A small open_clip CLIP: a ViT over square images and a causal text transformer."""
    return open_clip.CLIP(
        config.embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            image_size=image_size,
            patch_size=config.patch_size,
            width=config.vision_width,
            layers=config.vision_layers,
            head_width=config.vision_width // 4,
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=config.context_length,
            vocab_size=vocab_size,
            width=config.text_width,
            heads=config.text_heads,
            layers=config.text_layers,
            pad_id=0,
            eos_id=eos_id,
        ),
    )


def train_clip(config: CLIPTrainConfig, *, resume: str | Path | None = None, **run: bool) -> Path:
    """Train CLIP contrastively; write ``output_dir/text_encoder`` and ``output_dir/tokenizer``
    (diffusers layout, read by `FrozenTextEncoder.from_pretrained`) and return ``output_dir``.
    ``resume`` and ``run`` as in `train_vae`."""
    settings, out, accelerator, checkpoint = _start(config, resume, **run)
    images, captions = load_image_folder(config.data)
    torch.manual_seed(config.seed)
    tokenizer = build_clip_tokenizer(
        pad_token=OPEN_CLIP_PAD_TOKEN,
        model_max_length=config.context_length,
        words=captions,
        reserve=config.vocab_reserve,
    )
    tokens = torch.tensor(
        clip_encode(tokenizer, captions, padding="max_length", truncation=True)["input_ids"]
    )  # (N, L); the end token has the highest id, where open_clip pools
    model = build_clip(config, len(tokenizer), tokenizer.eos_token_id, images.shape[1])
    loss_fn = open_clip.ClipLoss()
    device = accelerator.device
    model.to(device).train()
    tokens = tokens.to(device)

    def loss(_, indices: list[int], generator: torch.Generator) -> Step:
        image_features, text_features, logit_scale = model(
            to_model_range(images[indices]).to(device), tokens[indices]
        )
        with torch.no_grad():
            logits = image_features @ text_features.T  # (B, B)
            targets = torch.arange(len(indices), device=device)
            accuracy = (logits.argmax(1) == targets).float().mean().item()
        figures = {"image_to_text_top1": accuracy, "logit_scale": logit_scale.item()}
        return Step(loss_fn(image_features, text_features, logit_scale), figures)

    objective = Objective(
        "training CLIP",
        len(images),
        [Part(list(model.parameters()), config.learning_rate, model)],
        loss,
        log_every=config.log_every,
    )
    _write_config(out, config)
    fit(objective, settings, out, accelerator, resume=checkpoint, config=config.to_dict())
    model.eval()
    text_model = open_clip_to_transformers(
        model,
        drop_last_block=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    _finish(out, "text_encoder", lambda folder: text_model.save_pretrained(folder))
    _finish(out, "tokenizer", lambda folder: tokenizer.save_pretrained(folder))
    build = {"vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id}
    build["image_size"] = images.shape[1]
    _finish(out, "open_clip", lambda folder: save_clip(model, config, folder, **build))
    return out


def save_clip(model: open_clip.CLIP, config: CLIPTrainConfig, folder: Path, **build: int) -> None:
    """The whole open_clip model as ``model.safetensors`` and what `load_clip` needs to rebuild it
    (``config.json``: the training config and `build_clip`'s other arguments)."""
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), **build}, indent=2) + "\n")


def load_retrieval(folder: str | Path) -> tuple[open_clip.CLIP, CLIPTokenizer]:
    """The CLIP stage's output folder (``open_clip/`` and ``tokenizer/``) as the ``clip`` argument
    of `ldm.data.metrics.evaluate_on_data`: the whole CLIP model and its tokenizer."""
    return load_clip(Path(folder) / "open_clip"), load_tokenizer(Path(folder) / "tokenizer")


def load_clip(folder: str | Path) -> open_clip.CLIP:
    """The open_clip model that `save_clip` wrote, in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no CLIP model at {folder}: `ldm train-clip` writes one to OUTPUT_DIR/open_clip"
        )
    values = json.loads((folder / "config.json").read_text())
    build = {k: values.pop(k) for k in ("vocab_size", "eos_id", "image_size")}
    model = build_clip(CLIPTrainConfig(**values), **build)
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()
