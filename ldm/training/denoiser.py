"""Training and fine-tuning the U-Net: ``ldm train``.

    ldm train CONFIG.yaml [--set key=value ...] [--resume latest|PATH]

`train` loads the models and the data (checked once by `ldm.data.scan`, optionally encoded
once into a cache), and hands `ldm.training.loop.fit` the U-Net's objective: caption dropout, a
posterior sample of the VAE, the ε or v loss of `ldm.diffusion.losses`, and, when asked, the VAE decoder's
reconstruction loss and the text encoder's fine-tuning. Then it exports the EMA weights as a
pipeline folder. With a ``lora`` or ``textual_inversion`` section only the adapters of
`ldm.training.adapters` train, and they are exported as the files people share.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from ldm.config import DEFAULT_MODEL, SchedulerConfig, TrainConfig, TrainSettings, UNetConfig
from ldm.data import DataReport, ImageCaptionDataset, scan
from ldm.diffusion.losses import decoder_loss, diffusion_loss, loss_by_timestep_bucket
from ldm.images import make_grid
from ldm.nn.unet import UNet
from ldm.pipeline import LatentDiffusionPipeline
from ldm.seeds import generator_for
from ldm.training.cache import EncodedData, encode_dataset, fingerprint
from ldm.training.loop import fit, make_accelerator, prepare_run
from ldm.training.objective import Objective, Part, Step

logger = logging.getLogger(__name__)


def _load_models(config: TrainConfig) -> LatentDiffusionPipeline:
    if config.model is not None:
        pipe = LatentDiffusionPipeline.from_pretrained(config.model)
    else:
        from ldm.encoders.text import FrozenTextEncoder
        from ldm.encoders.vae import FrozenVAE

        unet_config = (
            UNetConfig.from_json(config.unet)
            if config.unet.endswith(".json")
            else UNetConfig.preset(config.unet)
        )
        pipe = LatentDiffusionPipeline(
            UNet(unet_config),
            FrozenVAE.from_pretrained(config.vae),
            FrozenTextEncoder.from_pretrained(config.text_encoder),
        )
    if (
        config.train.prediction_type is not None
        and config.train.prediction_type != pipe.scheduler_config.prediction_type
    ):
        scheduler = SchedulerConfig(
            **{**pipe.scheduler_config.__dict__, "prediction_type": config.train.prediction_type}
        )
        pipe = LatentDiffusionPipeline(
            pipe.unet, pipe.vae, pipe.text_encoder, scheduler, name=pipe.name
        )
    return pipe


def _unfreeze(
    pipe: LatentDiffusionPipeline, t: TrainSettings
) -> list[tuple[str, torch.nn.Module, list[torch.nn.Parameter], float]]:
    """The frozen parts that ``train.train_vae_decoder`` and ``train.train_text_encoder`` fine-tune:
    (name, module to checkpoint, its trained parameters, their learning rate). The VAE's encoder
    always stays frozen, so the latents the U-Net learns from keep their meaning."""
    extra = []
    if t.train_vae_decoder:
        vae = pipe.vae.vae
        params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        extra.append(("vae", pipe.vae, params, t.vae_learning_rate or t.learning_rate))
    if t.train_text_encoder:
        params = list(pipe.text_encoder.model.parameters())
        lr = t.text_encoder_learning_rate or t.learning_rate
        extra.append(("text_encoder", pipe.text_encoder, params, lr))
    for _, _, params, _ in extra:
        for p in params:
            p.requires_grad_(True)
    return extra


def train(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> Path:
    """Run a training job of the U-Net (and the parts ``train.train_vae_decoder`` and
    ``train.train_text_encoder`` name), of LoRA adapters (``lora``) or of a new token's vectors
    (``textual_inversion``); returns the folder of what it exported: the pipeline
    (``OUTPUT_DIR/model``), or ``OUTPUT_DIR/lora`` or ``OUTPUT_DIR/textual_inversion``. An
    ``output_dir`` that holds a run is refused unless ``resume`` or ``overwrite`` is given
    (`ldm.training.checkpoint.start_run`); SIGINT/SIGTERM save, then raise `TrainingInterrupted`."""
    t = config.train
    _check(config)
    out = Path(config.output_dir)
    accelerator = make_accelerator(t)
    settings = config.to_dict()
    options = dict(overwrite=overwrite, allow_config_change=allow_config_change)
    checkpoint = prepare_run(out, accelerator, resume, settings, carry=("cache",), **options)

    # 1. Models: the U-Net trains; the VAE's decoder and the text encoder only when asked.
    # With a lora or textual_inversion section, only the adapter trains (`ldm.training.adapters`).
    pipe = _load_models(config)
    unet, parts, rows = _trained_parts(pipe, config, accelerator.device)

    # 2. Data: every sample checked up front; the report lists what was skipped or converted.
    report = _scan(config, out, settings, accelerator.is_main_process)
    data_generator = generator_for(t.seed, "data", accelerator.process_index)
    samples = report.samples
    if config.textual_inversion is not None:  # every caption names the new token
        from ldm.training.adapters import templated

        samples = templated(samples, config.textual_inversion, config.data.path)
    dataset = ImageCaptionDataset(config.data, samples, generator=data_generator)

    # 3. Encoder cache: encode once; later epochs read the frozen encoders' outputs from disk.
    encoded = _cache(pipe, dataset, report, config, out, accelerator) if t.cache_latents else None

    # 4. Objective: a batch of latents and contexts, and its loss.
    text_trains = t.train_text_encoder or bool(config.lora and config.lora.text_encoder)
    text_trains = text_trains or rows is not None

    def loss(model, indices: list[int], generator: torch.Generator) -> Step:
        batch = _batch(
            pipe, dataset, encoded, t, indices, generator, accelerator.device, text_trains
        )
        return _step(model if model is not None else unet, pipe, t, batch, generator)

    trained = [p for part in parts for p in part.parameters]

    def validate(step: int) -> Image.Image:
        return _validate(pipe, unet, trained, config, out / "validation" / f"step-{step}.png")

    objective = Objective(
        "training",
        len(dataset),
        parts,
        loss,
        prepared=unet if rows is None else None,  # textual inversion: the U-Net is frozen
        validate=validate if config.validation.prompts else None,
        validate_every=config.validation.every,
        data_generator=data_generator,
    )

    # 5. The loop: steps, logs, checkpoints, validation (`ldm.training.loop.fit`).
    fit(objective, t, out, accelerator, resume=checkpoint, config=settings)

    # 6. Export the EMA weights (or the raw ones): LoRA files, or a pipeline folder.
    if config.lora is not None:
        return _export_lora(pipe, config, out, accelerator.is_main_process)
    if rows is not None:
        return _export_embedding(pipe, rows, config, out, accelerator.is_main_process)
    final = out / "model"
    if accelerator.is_main_process:
        LatentDiffusionPipeline(
            unet.eval(), pipe.vae, pipe.text_encoder, pipe.scheduler_config, name=out.name
        ).save_pretrained(final)
    return final


def _trained_parts(pipe: LatentDiffusionPipeline, config: TrainConfig, device):
    """(the U-Net in training mode, the trained `Part`s, the `NewTokenRows` of a textual
    inversion or None): the whole U-Net and the parts ``train`` names, or only the adapters
    of a ``lora`` or ``textual_inversion`` section (`ldm.training.adapters`)."""
    t, rows = config.train, None
    if config.lora is not None:
        from ldm.training.adapters import add_lora

        parts = add_lora(pipe, config.lora, t.seed)
    if config.textual_inversion is not None:
        from ldm.training.adapters import add_placeholder

        part, rows = add_placeholder(pipe, config.textual_inversion)
        parts = [part]
    adapters = config.lora is not None or rows is not None
    unet = _trainable_unet(pipe, t, device, whole=not adapters)
    if not adapters:
        parts = [Part(list(unet.parameters()), t.learning_rate)]
        parts += [Part(params, lr, module, name) for name, module, params, lr in _unfreeze(pipe, t)]
    return unet, parts, rows


def _check(config: TrainConfig) -> None:
    if config.train.cache_latents and (not config.data.center_crop or config.data.random_flip):
        raise ValueError(
            "train.cache_latents=true needs data.center_crop: true and data.random_flip: false: "
            "cached latents are of one fixed crop"
        )


def _export_lora(pipe: LatentDiffusionPipeline, config: TrainConfig, out: Path, main: bool) -> Path:
    """``OUTPUT_DIR/lora``: the adapters in diffusers' and kohya's layouts (`export_lora`)."""
    from ldm.training.adapters import export_lora

    folder = out / "lora"
    if main:
        files = export_lora(pipe, config.lora, folder, out.name)
        logger.info(
            "LoRA written to %s; try it: ldm generate --model %s --lora %s 'a prompt'",
            folder,
            "default" if config.model == str(DEFAULT_MODEL) else config.model,
            files[0],
        )
    return folder


def _export_embedding(pipe, rows, config: TrainConfig, out: Path, main: bool) -> Path:
    """``OUTPUT_DIR/textual_inversion``: the new token's vectors for diffusers and A1111."""
    from ldm.training.adapters import export_embedding, finish_placeholder

    finish_placeholder(pipe, rows)
    folder = out / "textual_inversion"
    if main:
        settings = config.textual_inversion
        files = export_embedding(pipe, settings, folder, config.train.max_steps)
        logger.info(
            "embedding written to %s; use it: pipe.load_textual_inversion(%r), then prompts "
            "with %s",
            folder,
            str(files[0]),
            settings.placeholder_token,
        )
    return folder


def _trainable_unet(pipe: LatentDiffusionPipeline, t: TrainSettings, device, whole: bool) -> UNet:
    """The U-Net in training mode, all of it trained when ``whole`` (else its adapters only);
    the frozen VAE and text encoder moved to ``device``."""
    unet = pipe.unet.train()
    if whole:
        unet.requires_grad_(True)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    return unet


def _scan(config: TrainConfig, out: Path, settings: dict, main: bool) -> DataReport:
    """`ldm.data.scan`, its report saved as ``data_report.json`` beside ``config.json``."""
    report = scan(config.data)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        report.save(out / "data_report.json")
        (out / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return report


def _cache(pipe, dataset, report, config: TrainConfig, out: Path, accelerator) -> EncodedData:
    """The encoder cache of ``dataset`` (written by the main process, then read by all)."""
    key = fingerprint(pipe.vae, pipe.text_encoder, report.samples, config.data)
    if accelerator.is_main_process:
        encode_dataset(pipe.vae, pipe.text_encoder, dataset, out / "cache", key)
    accelerator.wait_for_everyone()
    return encode_dataset(pipe.vae, pipe.text_encoder, dataset, out / "cache", key)


def _batch(
    pipe: LatentDiffusionPipeline,
    dataset: ImageCaptionDataset,
    encoded: EncodedData | None,
    t: TrainSettings,
    indices: list[int],
    generator: torch.Generator,
    device,
    text_trains: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch as (x0 (B, C, h, w), context (B, L, D), pixels (B, 3, H, W) or None): captions
    dropped at ``caption_dropout``, x0 a posterior sample of the VAE, from ``encoded`` if given.
    Pixels are loaded when the VAE decoder trains (or when nothing is cached). With
    ``text_trains`` the text encoder runs with gradients."""
    drop = torch.rand(len(indices), generator=generator) < t.caption_dropout  # (B,)
    if encoded is None:
        items = [dataset[i] for i in indices]
        pixels = torch.stack([item["pixels"] for item in items]).to(device)
        captions = ["" if d else it["caption"] for d, it in zip(drop.tolist(), items, strict=True)]
        x0 = pipe.vae.encode(pixels, generator=generator, sample=True).float()
        encode_text = pipe.text_encoder.embed if text_trains else pipe.text_encoder
        return x0, encode_text(captions).float(), pixels
    mean, std = encoded.means[indices], encoded.stds[indices]
    noise = torch.randn(mean.shape, generator=generator)
    x0 = (mean + std * noise).to(device)  # a posterior sample, as encode gives
    context = torch.where(drop[:, None, None], encoded.empty_context, encoded.contexts[indices])
    pixels = None
    if t.train_vae_decoder:
        pixels = torch.stack([dataset[i]["pixels"] for i in indices]).to(device)
    return x0, context.to(device), pixels


def _step(model, pipe: LatentDiffusionPipeline, t: TrainSettings, batch, generator) -> Step:
    """The ε or v loss of a batch (`diffusion_loss`), plus the VAE decoder's reconstruction
    loss when it trains; logged: the diffusion loss, the decoder MSE, the loss by timestep."""
    x0, context, pixels = batch
    result = diffusion_loss(
        model,
        pipe.schedule,
        x0,
        context,
        generator=generator,
        min_snr_gamma=t.min_snr_gamma,
        noise_offset=t.noise_offset,
    )
    figures, total = {}, result.loss
    if t.train_vae_decoder:  # its own objective; the latents stay the encoder's
        decoder_mse = decoder_loss(pipe.vae, x0, pixels)
        total = total + decoder_mse
        figures["decoder_mse"] = decoder_mse.item()
    figures["loss_by_t"] = loss_by_timestep_bucket(
        result.per_sample, result.t, pipe.schedule.num_train_timesteps
    )
    return Step(total, figures, logged=result.loss)


@torch.no_grad()
def _validate(
    pipe: LatentDiffusionPipeline,
    unet: UNet,
    parameters: list[torch.nn.Parameter],
    config: TrainConfig,
    path: Path,
) -> Image.Image:
    """Images from the fixed validation prompts and seeds, as one grid (saved to ``path`` and
    returned). `fit` calls it with the EMA weights in place."""
    v = config.validation
    unet.eval()
    try:
        viewer = LatentDiffusionPipeline(
            unet, pipe.vae, pipe.text_encoder, pipe.scheduler_config, name=pipe.name
        )
        images = []
        for prompt in v.prompts:
            result = viewer(
                prompt,
                num_images_per_prompt=len(v.seeds),
                seed=v.seeds,
                num_inference_steps=v.num_inference_steps,
                guidance_scale=v.guidance_scale,
                progress=False,
            )
            images += result.images
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = make_grid(images, cols=len(v.seeds))
        grid.save(path)
        return grid
    finally:
        unet.train()
        for p in parameters:  # the pipeline froze them for inference
            p.requires_grad_(True)
