"""`LatentDiffusionPipeline`: text-to-image, image-to-image and DDIM inversion.

A pipeline is four parts: our U-Net, a frozen VAE, a frozen CLIP text encoder and a scheduler
config. The sampling loops live in `ldm.diffusion.samplers`; this module prepares their inputs,
runs them under classifier-free guidance and decodes the result. Reading and writing files is
`ldm.pipeline.loading`; the argument checks are `ldm.pipeline.checks`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ldm import images as imaging
from ldm.config import DEFAULT_MODEL, GENERATION, SchedulerConfig, UNetConfig
from ldm.config.names import SIGMA_SAMPLERS, OutputType, SigmaScheduleName
from ldm.diffusion.registry import img2img_start, resolve_sampler, run_sampler
from ldm.diffusion.samplers import guided_eps_fn, invert_ddim, randn_like
from ldm.diffusion.schedule import NoiseSchedule
from ldm.encoders.text import FrozenTextEncoder
from ldm.encoders.vae import FrozenVAE
from ldm.nn.unet import UNet
from ldm.pipeline.checks import (
    check_settings,
    check_size,
    check_strength,
    image_generators,
    prompt_lists,
)
from ldm.pipeline.loading import (
    PipelineParts,
    read_pipeline_folder,
    read_single_file,
    write_pipeline_folder,
    write_single_file,
)
from ldm.pipeline.lora import LoraAdapters
from ldm.pipeline.result import GenerationResult, as_output_type
from ldm.pipeline.textual_inversion import TextualInversion

Settings = tuple[int, float, str, float, str]  # (steps, guidance_scale, sampler, eta, sigmas)


class LatentDiffusionPipeline(LoraAdapters, TextualInversion):
    """Text-to-image latent diffusion: our U-Net, a frozen VAE and a frozen text encoder, with
    LoRA adapters (`ldm.pipeline.lora.LoraAdapters`: `load_lora`, `fuse_lora`, ...) and
    textual-inversion embeddings (`ldm.pipeline.textual_inversion.TextualInversion`:
    `load_textual_inversion`)."""

    def __init__(
        self,
        unet: UNet,
        vae: FrozenVAE,
        text_encoder: FrozenTextEncoder,
        scheduler_config: SchedulerConfig | None = None,
        *,
        name: str = "model",
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae, self.text_encoder = vae, text_encoder
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.name = name
        self._lora_scales = {}
        s = self.scheduler_config
        self.schedule = NoiseSchedule(
            s.beta_schedule,
            s.num_train_timesteps,
            s.beta_start,
            s.beta_end,
            rescale_betas_zero_snr=s.rescale_betas_zero_snr,
            prediction_type=s.prediction_type,
        )

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LatentDiffusionPipeline:
        """Load a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/,
        tokenizer/, scheduler/), such as `StableDiffusionPipeline.save_pretrained` writes.
        With no ``path``, the shipped default model (`ldm.DEFAULT_MODEL`)."""
        parts = read_pipeline_folder(path if path is not None else DEFAULT_MODEL)
        return cls(**parts._asdict()).to(device, dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        prediction_type: str | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        unet_config: UNetConfig | str | None = None,
        vae_config: dict | None = None,
        text_encoder_config: dict | None = None,
        unsafe_pickle: bool = False,
    ) -> LatentDiffusionPipeline:
        """Load an original Stable Diffusion 1.x/2.x checkpoint (``.safetensors`` or ``.ckpt``)
        with the configs shipped in the package (`ldm.formats.single_file.load_single_file_components`).

        An SD 2 checkpoint's prediction type cannot be read from its weights: 768-v models
        predict ``v_prediction``, 512-base models ``epsilon``. Say which with
        ``prediction_type``; SD 1.x defaults to ``epsilon``.
        """
        parts = read_single_file(
            path,
            prediction_type,
            unet_config=unet_config,
            vae_config=vae_config,
            text_encoder_config=text_encoder_config,
            unsafe_pickle=unsafe_pickle,
        )
        return cls(**parts._asdict()).to(device, dtype)

    def save_single_file(self, path: str | Path) -> None:
        """Write the weights as an original SD 1.x-style single file (``.safetensors``)."""
        write_single_file(path, self._parts())

    def save_pretrained(self, path: str | Path) -> None:
        """Write a folder that `from_pretrained` and diffusers' `StableDiffusionPipeline` load."""
        write_pipeline_folder(path, self._parts())

    def _parts(self) -> PipelineParts:
        if self._lora_scales:
            raise ValueError(
                f"LoRA adapters are loaded ({', '.join(self._lora_scales)}): fuse_lora() and "
                "then unload_lora() to save them into the weights, or unload_lora() first"
            )
        s = self
        return PipelineParts(s.unet, s.vae, s.text_encoder, s.scheduler_config, s.name)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LatentDiffusionPipeline:
        """Move to a device and the U-Net and text encoder to a dtype. A VAE that asks for it
        (``force_upcast``) decodes in float32."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def downscale_factor(self) -> int:
        return self.vae.downscale_factor

    def _settings(self, steps, guidance_scale, sampler, eta, sigmas, output_type) -> Settings:
        """The checked settings, with the sampler's name resolved (A1111's names too)."""
        check_settings(steps, guidance_scale, eta, output_type, self.schedule.num_train_timesteps)
        name, levels = resolve_sampler(sampler, sigmas)
        return steps, guidance_scale, name, eta, levels

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = GENERATION.negative_prompt,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = GENERATION.num_inference_steps,
        guidance_scale: float = GENERATION.guidance_scale,
        sampler: str = GENERATION.sampler,
        sigmas: SigmaScheduleName | None = GENERATION.sigmas,
        eta: float = GENERATION.eta,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: OutputType = "pil",
        progress: bool = True,
    ) -> GenerationResult:
        """Generate ``num_images_per_prompt`` images for each prompt.

        Image k of a call with ``seed=S`` uses seed S + k with its own generator, so any image
        can be reproduced alone; with no seed, one is drawn and recorded. ``latents``
        (B, C, h, w) replaces the initial noise (for example DDIM-inverted latents at guidance
        1). Returns a `GenerationResult`; ``output_type`` is ``pil``, ``np`` ((B, H, W, 3) in
        [0, 1]), ``pt`` ((B, 3, H, W) in [0, 1]) or ``latent``.
        """
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        height, width = check_size(
            height, width, self.unet.config.sample_size, self.downscale_factor
        )
        settings = self._settings(
            num_inference_steps, guidance_scale, sampler, eta, sigmas, output_type
        )
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        generators, seeds = image_generators(len(prompts), seed, generator)
        shape = (
            len(prompts),
            self.unet.config.in_channels,
            height // self.downscale_factor,
            width // self.downscale_factor,
        )
        if latents is None:
            x_T = randn_like(torch.empty(shape), generators).to(self.device)  # drawn on the CPU
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; expected {shape} for {len(prompts)} images of {height}x{width}"
            )
        else:
            x_T = latents.to(self.device, torch.float32)
        return self._generate(
            prompts, negatives, x_T, settings, generators, seeds, output_type, progress=progress
        )

    @torch.no_grad()
    def img2img(
        self,
        prompt: str | list[str],
        image: Image.Image | list[Image.Image] | Tensor,
        *,
        strength: float = GENERATION.strength,
        negative_prompt: str | list[str] | None = GENERATION.negative_prompt,
        num_inference_steps: int = GENERATION.num_inference_steps,
        guidance_scale: float = GENERATION.guidance_scale,
        sampler: str = GENERATION.sampler,
        sigmas: SigmaScheduleName | None = GENERATION.sigmas,
        eta: float = GENERATION.eta,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: OutputType = "pil",
        progress: bool = True,
    ) -> GenerationResult:
        """Image-to-image: noise the image's latents to the step that ``strength`` picks and
        sample from there (`ldm.diffusion.registry.img2img_start`). Strength 0 returns the input (up to the
        VAE round trip); 1 ignores it. One image per prompt, or one image for all prompts."""
        check_strength(strength)
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        settings = self._settings(
            num_inference_steps, guidance_scale, sampler, eta, sigmas, output_type
        )
        x0 = self.encode_images(image)
        if x0.shape[0] == 1 and len(prompts) > 1:
            x0 = x0.expand(len(prompts), -1, -1, -1)
        if x0.shape[0] != len(prompts):
            raise ValueError(
                f"got {x0.shape[0]} images for {len(prompts)} prompts; give one image, or one per prompt"
            )
        generators, seeds = image_generators(len(prompts), seed, generator)
        noise = randn_like(x0, generators)
        x_start, start = img2img_start(
            self.schedule,
            x0,
            noise,
            num_inference_steps,
            strength,
            sampler=settings[2],
            sigmas=settings[4],
            **self.scheduler_config.spacing,
        )
        return self._generate(
            prompts,
            negatives,
            x_start,
            settings,
            generators,
            seeds,
            output_type,
            start_step=start,
            strength=strength,
            progress=progress,
        )

    @torch.no_grad()
    def invert(
        self,
        prompt: str | list[str],
        image: Image.Image | list[Image.Image] | Tensor,
        *,
        num_inference_steps: int = GENERATION.num_inference_steps,
        fixed_point_iters: int = 0,
        progress: bool = True,
    ) -> Tensor:
        """DDIM inversion at guidance 1: the latents x_T (B, C, h, w) that ``__call__`` with
        ``latents=x_T``, ``guidance_scale=1``, ``sampler="ddim"``, ``eta=0`` and the same prompt
        and steps maps back to (about) the image. See `ldm.diffusion.samplers.invert_ddim`."""
        prompts, negatives = prompt_lists(prompt, None)
        self._settings(num_inference_steps, 1.0, "ddim", 0.0, None, "latent")
        x0 = self.encode_images(image)
        if x0.shape[0] != len(prompts):
            raise ValueError(
                f"got {x0.shape[0]} images for {len(prompts)} prompts; give one per prompt"
            )
        s = self.scheduler_config
        return invert_ddim(
            self._model_fn(prompts, negatives, 1.0),
            self.schedule,
            x0,
            num_inference_steps,
            progress=progress,
            **s.spacing,
            set_alpha_to_one=s.set_alpha_to_one,
            fixed_point_iters=fixed_point_iters,
        )

    def _generate(
        self,
        prompts: list[str],
        negatives: list[str],
        x_start: Tensor,
        settings: Settings,
        generators: list[torch.Generator],
        seeds: list[int],
        output_type: str,
        *,
        start_step: int = 0,
        strength: float | None = None,
        progress: bool = True,
    ) -> GenerationResult:
        """What text-to-image and image-to-image share: sample from ``x_start`` (at
        ``start_step``), decode, and record each image's settings."""
        steps, guidance_scale, sampler, eta, sigmas = settings
        x0 = run_sampler(
            sampler,
            self._model_fn(prompts, negatives, guidance_scale),
            self.schedule,
            x_start,
            steps,
            config=self.scheduler_config,
            sigmas=sigmas,
            eta=eta,
            generator=generators,
            progress=progress,
            start_step=start_step,
        )
        height, width = (d * self.downscale_factor for d in x_start.shape[-2:])
        sigmas = sigmas if sampler in SIGMA_SAMPLERS else None  # DDIM, DDPM: timesteps
        common = {"sampler": sampler, "sigmas": sigmas, "steps": steps}
        common |= {"guidance_scale": guidance_scale, "eta": eta}
        common |= {"width": width, "height": height, "strength": strength, "model": self.name}
        records = [
            {"prompt": p, "negative_prompt": n, "seed": seed} | common
            for p, n, seed in zip(prompts, negatives, seeds, strict=True)
        ]
        return GenerationResult(self._output(x0, output_type), seeds, records)

    def _model_fn(self, prompts: list[str], negatives: list[str], guidance_scale: float):
        context = self.text_encoder(prompts).to(self.dtype)  # (B, L, D)
        uncond = self.text_encoder(negatives).to(self.dtype) if guidance_scale != 1 else None

        def unet_fn(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
            return self.unet(x.to(self.dtype), t, c).float()  # sampler state stays float32

        return guided_eps_fn(unet_fn, context, uncond, guidance_scale)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) in [-1, 1]; a non-finite result is an error."""
        images = self.vae.decode(latents.to(self.vae.dtype), batch_size=8)
        if not torch.isfinite(images).all():
            raise FloatingPointError(
                "the decoded images contain NaN or infinite values (an overflow, often from fp16); "
                "nothing was saved. Try dtype=torch.float32 or bfloat16."
            )
        return images

    def _output(self, latents: Tensor, output_type: str):
        if output_type == "latent":
            return latents
        return as_output_type(self.decode(latents), output_type)

    def encode_images(
        self,
        image: Image.Image | list[Image.Image] | Tensor,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """PIL images (resized to height x width when given) or a tensor (B, 3, H, W) in [-1, 1]
        -> latents (B, C, h, w), the VAE posterior means."""
        if isinstance(image, Tensor):
            pixels = image
        else:
            batch = image if isinstance(image, list) else [image]
            size = (width, height) if height and width else None
            pixels = torch.cat([imaging.from_pil(im, size) for im in batch])
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).float()
